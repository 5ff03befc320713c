"""TRMForCausalLM: a Tiny Recursive Model as a Hugging Face causal language model.

Per token, as in the paper: x = the token's embedding, y (answer) and z (latent) start from fixed
vectors; every supervision step runs the core recursion (trm_lm/core.py) and the LM head reads y.
All attention is causal, so position t only ever sees tokens <= t at every virtual layer.

Training (labels given): all `supervision_steps` run; the carry (y, z) is detached between steps;
loss = mean over steps of [token cross-entropy + halt_loss_weight * per-token halting BCE], the halt
target being "this position's argmax is already the next token". The logits returned are those of
the final step, i.e. exactly what generation uses.

Inference: `halt_threshold` (argument or config) turns on per-token exit: after each step, positions
whose P(halt) >= threshold freeze (see core.py for the KV copy-forward). `halt_criterion="entropy"|"kl"`
swaps the trained head for a training-free rule (next-token entropy, or KL between successive steps).
`generate()` works with the stock DynamicCache, one slot per virtual layer (config.num_hidden_layers of them;
with config.step_context="first_step" only the first step's, which the later steps read: see core.py).

Relative imports only: this file and its siblings are copied next to saved weights as remote code.
"""

import inspect
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_trm import TRMConfig
from .core import IGNORE_INDEX, RecursionCache, SelfAttention, TRMCore, init_trm_weights


TOKEN_DECODE_KWARGS = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class StepPrediction:
    """The top-k next-token predictions after one supervision step."""

    step: int  # 1-based
    top_ids: list[int]
    top_probs: list[float]
    top_tokens: list[str] | None = None  # decoded, when a tokenizer was given


@dataclass(frozen=True)
class TokenTrace:
    """One generated token and the supervision steps that produced it (what `inspect()` returns)."""

    position: int  # index in the row's own tokens, prompt included (a prompt's BOS is position 0)
    token_id: int
    steps_used: int  # < the steps run when the token exited early (ACT)
    step_predictions: list[StepPrediction]  # one per step the token ran
    token: str | None = None  # decoded on its own, when a tokenizer was given (a byte of a multi-byte
    #                           character shows as U+FFFD)

    @classmethod
    def from_output(cls, out, row: int, column: int, token_id: int, position: int, tokenizer=None,
                    top_k: int | None = None) -> "TokenTrace":
        """The trace of `token_id`, predicted by `column` of row `row` of a forward pass run with
        `output_step_topk` (the one place that reads `steps_used` and `step_top_*` for a token); top_k keeps
        fewer predictions than the pass computed."""
        used = int(out.steps_used[row, column])
        predictions = [StepPrediction(step=s + 1, top_ids=out.step_top_ids[s, row, column, :top_k].tolist(),
                                      top_probs=out.step_top_probs[s, row, column, :top_k].tolist())
                       for s in range(used)]
        trace = cls(position=position, token_id=token_id, steps_used=used, step_predictions=predictions)
        return trace.decoded(tokenizer) if tokenizer is not None else trace

    def decoded(self, tokenizer) -> "TokenTrace":
        """This trace with its token and every prediction decoded, each id on its own."""
        def decode(token_id):
            return tokenizer.decode([token_id], **TOKEN_DECODE_KWARGS)

        return replace(self, token=decode(self.token_id),
                       step_predictions=[replace(p, top_tokens=[decode(i) for i in p.top_ids])
                                         for p in self.step_predictions])


def resolve_halt_threshold(value, config, training: bool, criterion: str = "head"):
    """One meaning everywhere (forward, generation settings, CLI, app): None = use the config's, 0 = off.

    The config's threshold is a P(halt), so only the "head" criterion takes it, and training runs every step.
    Returns the threshold to apply, or None for off (False is not read as 0)."""
    if value is None and criterion == "head" and not training:
        value = config.halt_threshold
    is_zero = isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    return None if value is None or is_zero else value


# transformers 5.24 renamed the KV cache from `past_key_values` to `cache` in generate()'s model inputs, in
# the model outputs and in the mask helpers. The names the installed version uses, so that every 5.x in the
# supported range gets the cache back (an unread keyword would silently restart the cache at every step).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _ensure_cache_slots(cache, slots: int) -> None:
    """Give a DynamicCache sized by the config (trained steps) the slots of a deeper run; every call of one
    decoding must use the same number of steps, as generate() does."""
    if len(cache.layers) >= slots:
        return
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"this {type(cache).__name__} has {len(cache.layers)} layer slots but {slots} are needed for "
                         "that many supervision steps; use a DynamicCache (the default) to run more steps than trained")
    cache.layers.extend(DynamicLayer() for _ in range(slots - len(cache.layers)))


def _one_cache(cache, past_key_values):
    """The cache passed under either name (the current `cache` or the pre-5.24 `past_key_values`).

    Where the installed transformers already says `cache`, the old name is announced as deprecated, as the
    library's own models do; before 5.24 it is what generate() passes, so it is taken silently.
    """
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` (or `past_key_values` before transformers 5.24)")
    if CACHE_FIELD == "cache":
        warnings.warn("`past_key_values` is deprecated since transformers 5.24: pass the KV cache as `cache`",
                      FutureWarning, stacklevel=3)
    return past_key_values


@dataclass
class TRMCausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus what the recursion did.

    steps_used: (B, T) supervision steps each position actually ran (all of them unless ACT halted it).
    step_losses: (S,) detached per-step total loss, training diagnostics.
    step_top_ids / step_top_probs: (S, B, T', k) top-k next-token predictions after every step, when
        `output_step_topk=k` was asked for (T' = positions kept by `logits_to_keep`).
    """

    steps_used: torch.LongTensor | None = None
    step_losses: torch.FloatTensor | None = None
    step_top_ids: torch.LongTensor | None = None
    step_top_probs: torch.FloatTensor | None = None


@contextmanager
def recorded_outputs(model: "TRMModel", hidden_states: bool, attentions: bool):
    """Record the input x and every virtual layer's block output, and/or attention weights, while the model runs.

    Yields a dict that, after the block, holds "hidden_states" (x, then one per virtual layer: 1 +
    config.num_hidden_layers when every step runs) and/or "attentions" (one per virtual layer).
    Hooks are added for the call only, and only when asked for. A virtual layer that a fully halted chunk skipped
    (ACT copy-forward) repeats what the same layer of the previous step recorded, as its keys/values do.
    The attention weights are recomputed from the layer's own query and its keys (cache included), with the
    mask SDPA used, so `output_attentions` needs no separate eager code path.
    """
    core = model.core
    records = {"hidden_states": {}, "attentions": {}}
    inputs = []
    handles = []
    if hidden_states:
        def keep_block_output(module, args, kwargs, output):
            records["hidden_states"][kwargs["layer_idx"]] = output
        handles += [block.register_forward_hook(keep_block_output, with_kwargs=True) for block in core.blocks]
        handles.append(model.embed_dropout.register_forward_hook(lambda module, args, output: inputs.append(output)))
    if attentions:
        def keep_attention(module, args, output):
            hidden, rotary, attention_mask, cache, layer_idx = args[:5]
            records["attentions"][layer_idx] = attention_weights(module, hidden, rotary, attention_mask, cache,
                                                                 layer_idx)
        handles += [block.mixer.register_forward_hook(keep_attention) for block in core.blocks
                    if isinstance(block.mixer, SelfAttention)]
    result = {}
    if handles:  # a record has one entry per batch row: halted rows keep being computed while recording
        core.halted_rows_leave = False
    try:
        yield result
    finally:
        core.halted_rows_leave = True
        for handle in handles:
            handle.remove()
    stride = core.layers_per_step
    for name, by_layer in records.items():
        if not by_layer:
            continue
        filled = inputs[-1:] if name == "hidden_states" else []
        offset = len(filled)
        for idx in range(max(by_layer) + 1):
            filled.append(by_layer[idx] if idx in by_layer else filled[offset + idx - stride])
        result[name] = tuple(filled)


def attention_weights(attention: SelfAttention, hidden, rotary, attention_mask, cache, layer_idx):
    """softmax(q k^T / sqrt(d) + mask) of one attention call: (B, heads, T, keys)."""
    T = hidden.shape[1]
    q, k, _ = attention.project(hidden, rotary)
    if isinstance(cache, RecursionCache) and cache.reads_context(layer_idx):
        context_keys = cache.context(layer_idx)[0]
        attention_mask = cache.context_attention_mask(attention_mask, T, context_keys.shape[2])
        k = torch.cat([context_keys, k], dim=2)  # the context, then its own
    elif cache is not None:  # after this call's update: past + this chunk (copied-forward included)
        k = cache.layers[cache.slot(layer_idx) if isinstance(cache, RecursionCache) else layer_idx].keys
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(attention.head_dim)  # (B, nh, T, K)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool \
            else scores + attention_mask.float()
    elif attention.causal and T > 1:  # upper-left aligned, as SDPA's is_causal (see SelfAttention.forward)
        future = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).to(q.dtype)


def _output_flags(config, kwargs):
    """(output_hidden_states, output_attentions, return_dict) from the call, else the config."""
    def flag(name, default):
        value = kwargs.pop(name, None)
        return getattr(config, name, default) if value is None else bool(value)
    return flag("output_hidden_states", False), flag("output_attentions", False), flag("return_dict", True)


class TRMPreTrainedModel(PreTrainedModel):
    config_class = TRMConfig
    base_model_prefix = "model"
    _no_split_modules = ["TRMBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module):
        init_trm_weights(module, self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Safetensors only: pickle checkpoints can run arbitrary code when loaded, so they are refused.

        Weights load in float32 unless `dtype` is given (a bf16 checkpoint computed in bf16 rounds
        differently with and without the KV cache, so greedy text would depend on `use_cache`); pass
        `dtype="auto"` or `torch.bfloat16` to compute in the stored precision on an accelerator.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("trm-lm loads safetensors checkpoints only (use_safetensors=False is not supported)")
        kwargs["use_safetensors"] = True
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        if pretrained_model_name_or_path is None:  # weights from `state_dict=`, config from `config=`
            return super().from_pretrained(None, *args, **kwargs)
        where = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(where):
            files = os.listdir(where)
            pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
            if pickles and not any(f.endswith(".safetensors") for f in files):
                raise ValueError(f"{where} holds only pickle checkpoint(s) {pickles}; trm-lm loads safetensors only "
                                 "(pickle can execute code). Convert with model.save_pretrained() in a trusted "
                                 "environment.")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise ValueError(f"{where}: the safetensors checkpoint is corrupt or truncated ({error})") from error


def halt_rule(criterion, threshold, lm_head=None):
    """The per-token stopping rule for `threshold` under `criterion` (None = run every step; resolve "use the
    config" and "0 = off" first with `resolve_halt_threshold`).

    Returns None or rule(y, halt_logits) -> (B, T) bool. "entropy" and "kl" read next-token distributions,
    so they need the model's `lm_head`.
    """
    if criterion not in ("head", "entropy", "kl"):
        raise ValueError(f"halt_criterion must be 'head', 'entropy' or 'kl', got {criterion!r}")
    if threshold is None:
        return None
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"halt_threshold must be a number or None, got {threshold!r}") from None
    if criterion == "head":
        if not 0 < threshold <= 1:  # also catches NaN
            raise ValueError(f"halt_threshold is a probability: in (0, 1], or 0 = off, got {threshold!r}")
        return lambda y, logits: torch.sigmoid(logits) >= threshold
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"halt_threshold for halt_criterion={criterion!r} is in nats and must be finite and "
                         f">= 0, got {threshold!r}")
    if lm_head is None:
        raise ValueError(f"halt_criterion={criterion!r} reads next-token predictions: it needs the LM head")
    previous = {}

    def rule(y, halt_logits):
        log_probs = torch.log_softmax(lm_head(y).float(), dim=-1)  # (B, T, V)
        if criterion == "entropy":
            return -(log_probs.exp() * log_probs).sum(-1) <= threshold
        before, previous["log_probs"] = previous.get("log_probs"), log_probs
        if before is None:  # nothing to compare with after the first step
            return torch.zeros(log_probs.shape[:2], dtype=torch.bool, device=y.device)
        return (log_probs.exp() * (log_probs - before)).sum(-1) <= threshold

    return rule


class TRMModel(TRMPreTrainedModel):
    """Token embedding + the recursive core; `recurse` yields the answer state y after every supervision step."""

    def __init__(self, config: TRMConfig):
        super().__init__(config)
        if not config.causal or config.mixer != "attention":
            raise ValueError("a causal language model needs causal=True and mixer='attention' "
                             f"(got causal={config.causal}, mixer={config.mixer!r})")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_scale = math.sqrt(config.hidden_size)  # unit-scale x, as the official code
        if config.position_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.core = TRMCore(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def recurse(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, supervision_steps=None, halt_rule=None, share_step_cache=False):
        """Run the supervision steps; yield (step, y, halt_logits, steps_used) after each.

        y: (B, T, D) answer state after the step (with grad in training; the carry into the next step is
        detached). halt_logits: (B, T). steps_used: (B, T) steps run so far by each position.
        halt_rule(y, halt_logits) -> (B, T) bool: positions that stop after this step (inference only).
        share_step_cache: the supervision steps share one step's cache slots (see RecursionCache).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        steps = cfg.supervision_steps if supervision_steps is None else supervision_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"supervision_steps must be a positive integer, got {supervision_steps!r}")
        if share_step_cache and self.training:
            raise ValueError("share_step_cache is an inference-time setting (it overwrites cache entries in place)")
        first_step_context = cfg.step_context == "first_step"
        if cache is not None and not (share_step_cache or first_step_context):
            _ensure_cache_slots(cache, steps * self.core.layers_per_step)  # test-time depth: extra slots
        if inputs_embeds is None:
            # On CPU the range check is free and turns an opaque IndexError into a clear message; on an
            # accelerator it would sync every decoding step, and under torch.compile/export it is data-dependent.
            if (input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling()
                    and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size)):
                raise ValueError(f"input_ids must be in [0, {cfg.vocab_size}), got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds * self.embed_scale  # (B, T, D)
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if torch.compiler.is_compiling():
            # a StaticCache's length is a tensor there, and reading it is data-dependent: the compiled decoder
            # (trm_lm/compiled.py) checks the length itself and passes the positions
            if position_ids is None:
                raise ValueError("a compiled forward needs position_ids")
        else:
            past = int(past)
            if past + T > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {past + T} exceeds max_position_embeddings="
                                 f"{cfg.max_position_embeddings}; truncate the prompt (keep its end)")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0).expand(B, -1)
        if cfg.position_encoding == "learned":
            x = x + 0.707106781 * self.embed_positions(position_ids)
        x = self.embed_dropout(x)
        rotary = self.core.rotary(position_ids) if self.core.rotary is not None else None
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=attention_mask,
                                  position_ids=position_ids, **{_MASK_CACHE_KWARG: cache})

        if cache is None and first_step_context:  # the later steps read the first step's keys/values from it
            cache = DynamicCache(config=cfg)
        slots = (RecursionCache(cache, self.core.layers_per_step, past, share_step_cache, first_step_context)
                 if cache is not None else None)
        y, z = self.core.initial_state(B, T, x.dtype)
        halted = None  # (B, T) bool once ACT froze something
        steps_used = torch.zeros(B, T, dtype=torch.long, device=x.device)
        for step in range(steps):
            steps_used += 1 if halted is None else (~halted).long()
            y, z = self.core.supervision_step(x, y, z, step, rotary=rotary, attention_mask=mask,
                                              cache=slots, frozen=halted)
            halt_logits = self.core.halt_logits(y)
            yield step, y, halt_logits, steps_used
            y, z = y.detach(), z.detach()  # deep supervision: the carry holds no graph
            if halt_rule is not None and step < steps - 1:
                now = halt_rule(y, halt_logits)
                halted = now if halted is None else halted | now

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, supervision_steps=None, halt_threshold=None,
                share_step_cache=False, past_key_values=None, **kwargs):
        """The answer state y after the last step. halt_threshold: as TRMForCausalLM's (head rule only)."""
        cache = _one_cache(cache, past_key_values)
        halt_threshold = resolve_halt_threshold(halt_threshold, self.config, self.training)
        want_hidden, want_attentions, return_dict = _output_flags(self.config, kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        rule = halt_rule("head", halt_threshold)  # no LM head here, so only the trained halt head can stop
        if (use_cache or rule is not None) and cache is None:
            cache = DynamicCache(config=self.config)
        y = None
        with recorded_outputs(self, want_hidden, want_attentions) as recorded:
            for _, y, _, _ in self.recurse(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                           supervision_steps, rule, share_step_cache):
                pass
        out = BaseModelOutputWithPast(last_hidden_state=y, **{CACHE_FIELD: cache if use_cache else None},
                                      hidden_states=recorded.get("hidden_states"),
                                      attentions=recorded.get("attentions"))
        return out if return_dict else out.to_tuple()


class TRMForCausalLM(TRMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TRMConfig):
        super().__init__(config)
        self.model = TRMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, supervision_steps=None,
                halt_threshold=None, halt_criterion="head", output_step_topk=0, share_step_cache=False,
                past_key_values=None, **kwargs) -> TRMCausalLMOutputWithPast:
        """Standard causal-LM forward, plus TRM controls.

        supervision_steps: run only the first k steps (inference; default all).
        halt_threshold: per-token early exit; None = config.halt_threshold (ignored in training, which runs
            every step), 0 = off, as in GenerationSettings, the CLIs and the app.
        halt_criterion: what the threshold applies to, after each step:
            "head"    the trained halt head: stop when P(halt) >= threshold (in (0, 1]);
            "entropy" training-free: stop when the next-token entropy (nats) <= threshold;
            "kl"      training-free: stop when KL(p_step || p_previous_step) (nats) <= threshold.
        output_step_topk: return the top-k next-token predictions after every step (inspection).
        share_step_cache: with a cache, the supervision steps share one step's K/V slots: KV memory / N_sup,
            earlier tokens seen at their last computed step; not exact (the default, False, is).
        cache: the KV cache (`past_key_values` before transformers 5.24; either name is read).
        """
        cfg = self.config
        cache = _one_cache(cache, past_key_values)
        want_hidden, want_attentions, return_dict = _output_flags(cfg, kwargs)
        # off in training: a checkpoint whose config sets a threshold can still be fine-tuned
        halt_threshold = resolve_halt_threshold(halt_threshold, cfg, self.training, halt_criterion)
        rule = halt_rule(halt_criterion, halt_threshold, self.lm_head)
        if rule is not None and self.training:
            raise ValueError("halt_threshold is an inference-time setting; training runs every supervision step")
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.training and labels is not None:
            use_cache = False
        if cache is None and (use_cache or rule is not None):
            cache = DynamicCache(config=cfg)  # ACT copies K/V forward even without use_cache
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep must be 0 when labels are given")

        num_items = kwargs.pop("num_items_in_batch", None)
        steps = cfg.supervision_steps if supervision_steps is None else supervision_steps
        losses, top_ids, top_probs = [], [], []
        logits = steps_used = None
        with recorded_outputs(self.model, want_hidden, want_attentions) as recorded:
            for step, y, halt_logits, steps_used in self.model.recurse(
                    input_ids, attention_mask, position_ids, cache, inputs_embeds, supervision_steps, rule,
                    share_step_cache):
                last = step == steps - 1
                if not (last or labels is not None or output_step_topk):
                    continue
                logits = self.lm_head(y[:, keep])  # (B, T', V)
                if labels is not None:
                    losses.append(self._step_loss(logits, halt_logits, labels, num_items, **kwargs))
                if output_step_topk:
                    probs, ids = torch.softmax(logits.float(), dim=-1).topk(output_step_topk, dim=-1)
                    top_ids.append(ids)
                    top_probs.append(probs)

        loss = step_losses = None
        if labels is not None:
            stacked = torch.stack(losses)
            loss, step_losses = stacked.mean(), stacked.detach()
        out = TRMCausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None}, steps_used=steps_used,
            hidden_states=recorded.get("hidden_states"),
            attentions=recorded.get("attentions"), step_losses=step_losses,
            step_top_ids=torch.stack(top_ids) if top_ids else None,
            step_top_probs=torch.stack(top_probs) if top_probs else None,
        )
        return out if return_dict else out.to_tuple()

    def _step_loss(self, logits, halt_logits, labels, num_items, **kwargs):
        """Token CE (the library's loss: shifts labels, ignores -100, honours num_items_in_batch) + halting BCE."""
        ce = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                num_items_in_batch=num_items, **kwargs)
        if self.config.halt_loss_weight == 0:
            return ce
        targets = kwargs.get("shift_labels")  # (B, T): position t's target, as the library's loss reads it
        if targets is None:  # position t predicts token t + 1; the last position has no target
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        valid = targets != IGNORE_INDEX
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).float()  # per token, not batch-mean
        bce = F.binary_cross_entropy_with_logits(halt_logits, correct, reduction="none")
        denominator = num_items if num_items is not None else valid.sum().clamp(min=1)
        halt = (bce * valid).sum() / denominator
        return ce + self.config.halt_loss_weight * halt.to(ce.dtype)

    # ----- inspection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def inspect(self, input_ids, tokenizer=None, top_k: int = 3, halt_threshold=None, supervision_steps=None,
                halt_criterion="head", **generate_kwargs) -> list[TokenTrace]:
        """Generate, then report for every generated token of the first sequence what the recursion did.

        Returns one TokenTrace per generated token: its id, the supervision steps it ran (fewer than all
        when it exited early) and the top-k predictions after each of them; given a tokenizer, the tokens
        are decoded too. Uses one uncached forward over prompt + generation, which the cache tests show
        equals the cached decoding. Sampling follows `generate_kwargs` (trm_lm.generation builds them,
        with a per-call torch.Generator for seeded sampling).
        """
        if input_ids.shape[0] != 1:
            raise ValueError("inspect() takes one prompt at a time (batch size 1)")
        control = dict(halt_threshold=halt_threshold, supervision_steps=supervision_steps,
                       halt_criterion=halt_criterion)
        sequences = self.generate(input_ids, **control, **generate_kwargs)
        sequences = sequences.sequences if hasattr(sequences, "sequences") else sequences
        return self.step_traces(sequences[:1], input_ids.shape[1], tokenizer=tokenizer, top_k=top_k, **control)[0]

    @torch.no_grad()
    def step_traces(self, sequences, prompt_lengths, tokenizer=None, top_k: int = 3, halt_threshold=None,
                    supervision_steps=None, halt_criterion="head", attention_mask=None) -> list[list[TokenTrace]]:
        """inspect()'s traces for sequences already generated, one list per row.

        sequences: (B, T) ids, left-padded where rows differ in length (attention_mask (B, T) marks the real
        tokens); prompt_lengths: one per row (or one int for all), counted in real tokens. One uncached
        forward over the whole batch. Positions are 0-based in the row's own tokens.
        """
        B, T = sequences.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(sequences)
        lengths = attention_mask.sum(-1).tolist()  # real tokens per row
        if isinstance(prompt_lengths, int):
            prompt_lengths = [prompt_lengths] * B
        if len(prompt_lengths) != B or not all(0 < p <= n for p, n in zip(prompt_lengths, lengths)):
            raise ValueError(f"step_traces needs one prompt length in [1, the row's length] per row; got "
                             f"{list(prompt_lengths)} for rows of {lengths} tokens")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self(sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   output_step_topk=top_k, halt_threshold=halt_threshold, supervision_steps=supervision_steps,
                   halt_criterion=halt_criterion)
        batch = []
        for row, (prompt_length, length) in enumerate(zip(prompt_lengths, lengths)):
            pad = T - length
            # the token at `position` was predicted by the output of the column before it
            batch.append([TokenTrace.from_output(out, row, pad + position - 1, int(sequences[row, pad + position]),
                                                 position, tokenizer)
                          for position in range(prompt_length, length)])
        return batch


__all__ = ["TRMForCausalLM", "TRMModel", "TRMPreTrainedModel", "TRMCausalLMOutputWithPast", "TokenTrace",
           "StepPrediction"]
