"""TRMConfig: the hyper-parameters of a Tiny Recursive Model (Jolicoeur-Martineau 2025, arXiv:2510.04871).

Paper names -> config fields:
    n      latent_steps        z <- net(z + y + x), n times per cycle
    T      cycles              T cycles per supervision step, the first T-1 without gradient
                               (unless backprop_all_cycles: the paper's "full recursion" gradient ablation)
    N_sup  supervision_steps   deep-supervision steps, (y, z) carried (detached) from one to the next
    L      net_layers          blocks in the one tiny network

One supervision step applies the network T * (n + 1) times; a token that runs every step goes through
`net_applications = supervision_steps * cycles * (latent_steps + 1)` network applications, i.e.
`net_applications * net_layers` virtual layers. Every virtual layer owns a KV-cache slot, which is why
`num_hidden_layers` (what `generate()` sizes its cache with) is derived, never set by hand (with
step_context="first_step" only the first step's virtual layers keep keys/values: N_sup times fewer).
"""

import math

from transformers import PreTrainedConfig

_NORM_POSITIONS = ("post", "pre")
_INJECTIONS = ("add", "concat")
_MIXERS = ("attention", "mlp")
_POSITION_ENCODINGS = ("rope", "learned", "none")
_STEP_CONTEXTS = ("every_step", "first_step")


class TRMConfig(PreTrainedConfig):
    model_type = "trm_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 4096
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int | None = None  # SwiGLU width; None = 4 * hidden * 2/3 rounded up to 64
    net_layers: int = 2
    latent_steps: int = 2
    cycles: int = 2
    supervision_steps: int = 2
    backprop_all_cycles: bool = False  # official: only the last of the T cycles has gradient
    halt_threshold: float | None = None  # inference-time per-token exit at P(halt) >= it; None or 0 = off
    halt_loss_weight: float = 0.5  # official ACTLossHead weight of the halting BCE
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    norm_position: str = "post"  # official TRM blocks are post-norm
    input_injection: str = "add"  # official: z = net(z + y + x); "concat" = seed 004's cat + Linear
    mixer: str = "attention"  # "mlp" = MLP over the sequence axis (TRM-MLP, fixed-length grids only)
    causal: bool = True
    position_encoding: str = "rope"
    sequence_length: int | None = None  # required by mixer="mlp"
    sequence_mlp_size: int | None = None  # TRM-MLP token-mixer width; None = 4 * L * 2/3 rounded up to 256 (official)
    initializer_range: float | None = None  # None = 1/sqrt(fan_in) truncated normal, as official
    embedding_dropout: float = 0.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # What a supervision step's attention reads of the earlier tokens. "every_step" (official, exact): the same
    # step of theirs, so the KV cache keeps every virtual layer. "first_step": after the first step, their
    # first-step keys/values (plus the token's own current ones), so the cache keeps one step's virtual layers
    # (KV memory / N_sup) and is still exact, because the model is trained that way; test-time depth and
    # early exit then need no extra slots or copies.
    step_context: str = "every_step"
    num_hidden_layers: int | None = None  # derived: KV-cache slots = virtual layers that keep keys/values

    def __post_init__(self, **kwargs):
        self._validate()
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(int(4 * self.hidden_size * 2 / 3), 64)
        if self.mixer == "mlp" and self.sequence_mlp_size is None:
            self.sequence_mlp_size = _round_up(round(4 * self.sequence_length * 2 / 3), 256)  # official layers.py
        self.num_hidden_layers = self.cached_applications * self.net_layers
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def net_applications(self) -> int:
        """Applications of the tiny network per token when every supervision step runs."""
        return self.supervision_steps * self.cycles * (self.latent_steps + 1)

    @property
    def cached_applications(self) -> int:
        """Network applications whose keys/values the KV cache keeps for later tokens (see step_context)."""
        per_step = self.cycles * (self.latent_steps + 1)
        return per_step if self.step_context == "first_step" else self.supervision_steps * per_step

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "net_layers", "latent_steps", "cycles",
                     "supervision_steps", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TRMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"TRMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.position_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"rotary position encoding needs an even head_dim, got {self.head_dim}")
        for name in ("intermediate_size", "sequence_mlp_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TRMConfig.{name} must be a positive integer or None, got {value!r}")
        for name, allowed in (("norm_position", _NORM_POSITIONS), ("input_injection", _INJECTIONS),
                              ("mixer", _MIXERS), ("position_encoding", _POSITION_ENCODINGS),
                              ("step_context", _STEP_CONTEXTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TRMConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.mixer == "mlp":
            if self.causal:
                raise ValueError("mixer='mlp' mixes the whole sequence at once and cannot be causal: "
                                 "use mixer='attention' for language modelling")
            if not isinstance(self.sequence_length, int) or self.sequence_length < 1:
                raise ValueError("mixer='mlp' needs a fixed sequence_length (a positive integer)")
        if self.step_context == "first_step" and not (self.causal and self.mixer == "attention"):
            raise ValueError("step_context='first_step' is a KV-cache setting for causal attention "
                             "(causal=True, mixer='attention')")
        halt = self.halt_threshold
        if halt is not None and not (_is_number(halt) and 0.0 <= halt <= 1.0):
            raise ValueError(f"TRMConfig.halt_threshold must be in (0, 1], or 0 / None = off, got {self.halt_threshold!r}")
        if not (_is_number(self.embedding_dropout) and 0.0 <= self.embedding_dropout < 1.0):
            raise ValueError(f"TRMConfig.embedding_dropout must be in [0, 1), got {self.embedding_dropout!r}")
        if not (_is_number(self.halt_loss_weight) and 0 <= self.halt_loss_weight < math.inf):
            raise ValueError(f"TRMConfig.halt_loss_weight must be >= 0, got {self.halt_loss_weight!r}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 < value < math.inf) and not (name == "initializer_range" and value is None):
                raise ValueError(f"TRMConfig.{name} must be a positive finite number, got {value!r}")
        for name in ("causal", "tie_word_embeddings", "use_cache", "backprop_all_cycles"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TRMConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(self, name)
            for token_id in ids if isinstance(ids, list) else [ids]:
                if token_id is not None and not (isinstance(token_id, int) and not isinstance(token_id, bool)
                                                 and 0 <= token_id < self.vocab_size):
                    raise ValueError(f"TRMConfig.{name} must be None or a token id in [0, {self.vocab_size}), "
                                     f"got {ids!r}")


def _is_number(value) -> bool:
    """A real number given as one (a JSON string or a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


__all__ = ["TRMConfig"]
