"""TRMPuzzleModel: a Tiny Recursive Model for grid puzzles (Sudoku, Maze, ARC) on the shared `trm_lm.core`.

Architecture (official TRM, arXiv:2510.04871 and SamsungSAILMontreal/TinyRecursiveModels; see
docs/reference notes §2):

    x = sqrt(D) * [puzzle prefix ; token embeddings]      # (B, P + L, D), P = puzzle_emb_len
        prefix = one learned vector per puzzle identifier (zero-initialised) + P - 1 zero positions
    y, z <- TRMCore.supervision_step(x, y, z)             # T cycles of (n z-updates, 1 y-update), the
                                                          # first T-1 under no_grad, non-causal mixer
    logits = lm_head(y[:, P:])                            # (B, L, V): one answer token per cell
    q_halt = halt_head(y[:, 0])                           # (B,): "this grid is already right", prefix 0

The mixer is bidirectional attention (TRM-Att, RoPE) or an MLP over the sequence axis (TRM-MLP).
`recursion="direct"` is the no-recursion baseline: the same tiny network applied once to x
(no y/z recursion, no deep supervision); with more `net_layers` it is a deeper one-pass network.

Deep supervision with a persistent carry (official `pretrain.py` + `trm.py`): ONE call of `forward`
is ONE supervision step on a fixed set of B *slots*. A slot whose previous step halted is reset to the
initial (y, z) and takes its row of the new batch; a slot that did not halt keeps its own data and
carried (y, z), and the batch row landing on it is dropped. The returned carry is detached, so a
backward pass never reaches an earlier step. Halting in training: steps >= supervision_steps or
q_halt > 0; with probability halt_exploration_prob a slot must first run randint(2, supervision_steps)
steps. In evaluation every slot runs all supervision_steps (`predict` records every step).

Loss of one step: mean over slots of (cell cross-entropy averaged over the slot's labelled cells) +
halt_loss_weight * BCE(q_halt, whole grid correct). Cross-entropy is softmax or stablemax (float64).
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_trm import TRMConfig
from .core import IGNORE_INDEX, TRMCore
from .modeling_trm import TRMPreTrainedModel

_LOSS_TYPES = ("softmax", "stablemax")
_RECURSIONS = ("trm", "direct")
DATA_KEYS = ("inputs", "labels", "puzzle_identifiers")  # what a batch (PuzzleExampleDataset) holds
REMOTE_CODE_MODULE = "modeling_trm_puzzle"  # this file, as saved next to the weights
REMOTE_CODE_DEPENDENCIES = ("configuration_trm.py", "core.py", "modeling_trm.py")  # the trm_lm files it imports


OFFICIAL_HALT_PROBABILITY = 0.5  # the official halting rule: q_halt > 0


class PuzzleTRMConfig(TRMConfig):
    """TRMConfig for fixed-size grids. Paper/official names: T = cycles (H_cycles), n = latent_steps
    (L_cycles), N_sup = supervision_steps (halt_max_steps), net_layers = L_layers, mixer "mlp" = mlp_t.

    `sequence_length` and `max_position_embeddings` are derived: num_cells + puzzle_emb_len. An unset
    `intermediate_size` follows the official rule (a multiple of 256: 1536 for D=512), not the LM's.

    `halt_threshold` is a P(halt) threshold, as for text: at inference (evaluation's `exact_accuracy_at_halt`,
    `puzzles.solve`, the app) a grid stops once P(halt) = sigmoid(q_halt) exceeds it. None = the official 0.5
    (q_halt > 0), with halting off by default in the solver (so is 0, "off", as everywhere); a value = halting on
    by default, at it.
    Training always halts slots at the official q_halt > 0.
    """

    model_type = "trm_puzzle"
    _auto_class = None  # not via register_for_auto_class: save_pretrained writes its own remote code (write_remote_code)

    vocab_size: int = 11
    hidden_size: int = 512
    num_attention_heads: int = 8
    latent_steps: int = 6
    cycles: int = 3
    supervision_steps: int = 16
    causal: bool = False
    tie_word_embeddings: bool = False  # official: tying the input embedding and the head hurts a lot
    use_cache: bool = False
    num_cells: int = 81  # grid cells per example (the dataset's seq_len)
    num_puzzle_identifiers: int = 1  # rows of the puzzle-embedding table (0 = the blank identifier)
    puzzle_emb_len: int = 16  # prefix positions: 1 learned vector + (puzzle_emb_len - 1) zeros
    halt_exploration_prob: float = 0.1
    loss_type: str = "stablemax"
    recursion: str = "trm"  # "direct": the network applied once (baseline), needs supervision_steps=1

    @property
    def halt_probability(self) -> float:
        """The P(halt) at which inference stops a grid (None = the official 0.5)."""
        return float(self.halt_threshold) if self.halt_threshold else OFFICIAL_HALT_PROBABILITY

    def __post_init__(self, **kwargs):
        for name in ("num_cells", "num_puzzle_identifiers", "puzzle_emb_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PuzzleTRMConfig.{name} must be a positive integer, got {value!r} "
                                 "(the halting head reads prefix position 0, so puzzle_emb_len >= 1)")
        self.sequence_length = self.num_cells + self.puzzle_emb_len
        self.max_position_embeddings = self.sequence_length
        if self.intermediate_size is None:  # official layers.py: 4 * D * 2/3 rounded up to a multiple of 256
            self.intermediate_size = -(-round(4 * self.hidden_size * 2 / 3) // 256) * 256
        if self.causal:
            raise ValueError("grid puzzles are solved as a whole: PuzzleTRMConfig needs causal=False")
        if self.loss_type not in _LOSS_TYPES:
            raise ValueError(f"PuzzleTRMConfig.loss_type must be one of {_LOSS_TYPES}, got {self.loss_type!r}")
        if self.recursion not in _RECURSIONS:
            raise ValueError(f"PuzzleTRMConfig.recursion must be one of {_RECURSIONS}, got {self.recursion!r}")
        if self.recursion == "direct" and self.supervision_steps != 1:
            raise ValueError("recursion='direct' applies the network once, without deep supervision: "
                             f"set supervision_steps=1 (got {self.supervision_steps})")
        if not 0.0 <= float(self.halt_exploration_prob) <= 1.0:
            raise ValueError(f"halt_exploration_prob must be in [0, 1], got {self.halt_exploration_prob!r}")
        super().__post_init__(**kwargs)


# ---- losses --------------------------------------------------------------------------------------------------

def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of stablemax (Prieto et al. 2025): s(x) = x + 1 for x >= 0, 1 / (1 - x) below; p = s / sum(s).

    Each branch is evaluated on its own half-line, so the unused one never produces inf/nan gradients.
    """
    s = torch.where(logits >= 0, logits.clamp(min=0) + 1, 1 / (1 - logits.clamp(max=0)))
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(B, L) loss of every cell in float64 (0 where labels == -100); logits (B, L, V)."""
    logits = logits.double()
    logprobs = log_stablemax(logits) if loss_type == "stablemax" else torch.log_softmax(logits, dim=-1)
    valid = labels != IGNORE_INDEX
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0.0)


# ---- carry and outputs ---------------------------------------------------------------------------------------

@dataclass
class TRMPuzzleCarry:
    """State of B slots between supervision steps. All tensors are detached.

    y, z: (B, P + L, D) answer / latent states; steps: (B,) steps run on the slot's current puzzle;
    halted: (B,) the slot finished its puzzle at the last step (reset and reloaded at the next call);
    data: the slot's current example, {"inputs": (B, L), "labels": (B, L), "puzzle_identifiers": (B,)}.
    """

    y: torch.Tensor
    z: torch.Tensor
    steps: torch.Tensor
    halted: torch.Tensor
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.steps.shape[0])

    def to(self, device) -> "TRMPuzzleCarry":
        return TRMPuzzleCarry(self.y.to(device), self.z.to(device), self.steps.to(device), self.halted.to(device),
                              {k: v.to(device) for k, v in self.data.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"y": self.y, "z": self.z, "steps": self.steps, "halted": self.halted,
                **{f"data.{k}": v for k, v in self.data.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "TRMPuzzleCarry":
        data = {k.removeprefix("data."): v for k, v in state.items() if k.startswith("data.")}
        return cls(state["y"], state["z"], state["steps"], state["halted"], data)


@dataclass
class TRMPuzzleOutput(ModelOutput):
    """One supervision step. loss/lm_loss/halt_loss only when the batch has labels.

    logits: (B, L, V) cell logits; q_halt_logits: (B,) halting logit (> 0 = "halt");
    is_correct: (B,) every labelled cell right (argmax; True for a row without labels); carry: what the next call continues from
    (carry.data holds the example each slot worked on in this step, carry.steps its step count).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    q_halt_logits: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    halt_loss: torch.FloatTensor | None = None
    is_correct: torch.BoolTensor | None = None
    carry: TRMPuzzleCarry | None = None


# ---- the model -----------------------------------------------------------------------------------------------

class PuzzleEmbedding(nn.Embedding):
    """Per-puzzle-identifier vector, zero-initialised (official), trained with its own lr/decay
    (see puzzles.train_task.PuzzleTask.parameter_groups)."""


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> broadcastable against `like` (B, ...)."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


class TRMPuzzleModel(TRMPreTrainedModel):
    config_class = PuzzleTRMConfig
    base_model_prefix = "trm_puzzle"
    _auto_class = None

    def __init__(self, config: PuzzleTRMConfig):
        super().__init__(config)
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.embed_scale = math.sqrt(D)  # unit-scale inputs, as the official code
        self.puzzle_emb = PuzzleEmbedding(config.num_puzzle_identifiers, D)
        if config.position_encoding == "learned":
            self.embed_positions = nn.Embedding(config.sequence_length, D)
        self.core = TRMCore(config)
        self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
        self.register_buffer("position_ids", torch.arange(config.sequence_length)[None], persistent=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """save_pretrained, plus the remote code (`write_remote_code`) that config.json's auto_map names."""
        self.config.auto_map = {"AutoConfig": f"{REMOTE_CODE_MODULE}.PuzzleTRMConfig",
                                "AutoModel": f"{REMOTE_CODE_MODULE}.TRMPuzzleModel"}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)

    def _init_weights(self, module):
        if isinstance(module, PuzzleEmbedding):
            init.zeros_(module.weight)
        elif module is self:
            init.copy_(self.position_ids, torch.arange(self.config.sequence_length)[None])
        else:
            super()._init_weights(module)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    # ----- pieces -------------------------------------------------------------------------------------------
    def embed(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens + (B,) identifiers -> x (B, P + L, D)."""
        cfg = self.config
        if inputs.shape[-1] != cfg.num_cells:
            raise ValueError(f"inputs have {inputs.shape[-1]} cells, the model was built for {cfg.num_cells}")
        if inputs.numel() and (inputs.min() < 0 or inputs.max() >= cfg.vocab_size):
            raise ValueError(f"input tokens must be in [0, {cfg.vocab_size}), got [{int(inputs.min())}, "
                             f"{int(inputs.max())}]")
        if puzzle_identifiers.numel() and (puzzle_identifiers.min() < 0
                                           or puzzle_identifiers.max() >= cfg.num_puzzle_identifiers):
            raise ValueError(f"puzzle identifiers must be in [0, {cfg.num_puzzle_identifiers}), got "
                             f"[{int(puzzle_identifiers.min())}, {int(puzzle_identifiers.max())}]")
        tokens = self.embed_tokens(inputs)  # (B, L, D)
        prefix = self.puzzle_emb(puzzle_identifiers)[:, None]  # (B, 1, D): the learned position
        prefix = F.pad(prefix, (0, 0, 0, cfg.puzzle_emb_len - 1))  # (B, P, D): then P - 1 zero positions
        x = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (B, P + L, D)
        if cfg.position_encoding == "learned":
            x = 0.707106781 * (x + self.embed_positions(self.position_ids))  # keep the variance of a sum at ~1
        return self.embed_scale * x

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> TRMPuzzleCarry:
        """Every slot 'halted', so the first call loads the whole batch and starts from the initial state."""
        inputs = batch["inputs"]
        B, device = inputs.shape[0], inputs.device
        y, z = self.core.initial_state(B, self.config.sequence_length)
        return TRMPuzzleCarry(y=y.to(device), z=z.to(device), steps=torch.zeros(B, dtype=torch.long, device=device),
                              halted=torch.ones(B, dtype=torch.bool, device=device),
                              data={k: torch.zeros_like(v) for k, v in batch.items() if k in DATA_KEYS})

    # ----- one supervision step -------------------------------------------------------------------------------
    def forward(self, carry: TRMPuzzleCarry | None = None, batch: dict[str, torch.Tensor] | None = None,
                supervision_steps: int | None = None, **kwargs) -> TRMPuzzleOutput:
        """One supervision step on the slots of `carry` (None: a fresh carry loading all of `batch`).

        batch: {"inputs": (B, L) long, "puzzle_identifiers": (B,) long, optional "labels": (B, L) long with
        -100 = unsupervised}. supervision_steps (the official halt_max_steps): evaluation override of the
        config's N_sup, after which a slot halts (run longer or shorter than trained; training always uses the
        config's value).
        """
        cfg = self.config
        if batch is None or "inputs" not in batch or "puzzle_identifiers" not in batch:
            raise ValueError("batch must be a dict with 'inputs' (B, L) and 'puzzle_identifiers' (B,) "
                             "(and 'labels' to get a loss)")
        if carry is None:
            carry = self.initial_carry(batch)
        if carry.batch_size != batch["inputs"].shape[0]:
            raise ValueError(f"the carry holds {carry.batch_size} slots but the batch has "
                             f"{batch['inputs'].shape[0]} rows: pad the batch or start a new carry")
        max_steps = cfg.supervision_steps if supervision_steps is None or self.training else int(supervision_steps)
        if max_steps < 1:
            raise ValueError(f"supervision_steps must be >= 1, got {supervision_steps}")

        # 1. Halted slots start over on new data; the others continue where they stopped.
        reset = carry.halted  # (B,)
        data = {k: torch.where(_rows(reset, batch[k]), batch[k], carry.data[k]) for k in DATA_KEYS
                if k in batch and k in carry.data}
        B, S = reset.shape[0], cfg.sequence_length
        y0, z0 = self.core.initial_state(B, S)
        y = torch.where(reset[:, None, None], y0.to(carry.y.device), carry.y)  # (B, S, D)
        z = torch.where(reset[:, None, None], z0.to(carry.z.device), carry.z)
        steps = torch.where(reset, 0, carry.steps) + 1

        # 2. The recursion (shared core).
        x = self.embed(data["inputs"], data["puzzle_identifiers"])  # (B, S, D)
        rotary = self.core.rotary(self.position_ids) if self.core.rotary is not None else None
        if cfg.recursion == "direct":
            y = self.core.net(x, 0, rotary=rotary)  # one pass of the tiny network, no y/z recursion
        else:
            y, z = self.core.supervision_step(x, y.to(x.dtype), z.to(x.dtype), rotary=rotary)
        logits = self.lm_head(y[:, cfg.puzzle_emb_len:]).float()  # (B, L, V)
        q_halt = self.core.halt_logits(y)[:, 0]  # (B,) read at prefix position 0

        # 3. Loss: per-slot mean cell CE + weighted halting BCE against "whole grid correct".
        loss = lm_loss = halt_loss = is_correct = None
        labels = data.get("labels")
        if labels is not None:
            labelled = labels != IGNORE_INDEX
            counts = labelled.sum(-1)  # (B,)
            cell_loss = token_cross_entropy(logits, labels, cfg.loss_type)  # (B, L) float64
            lm_loss = (cell_loss.sum(-1) / counts.clamp(min=1)).mean().float()
            with torch.no_grad():  # as official: every labelled cell right, so a row with none (padding) is "right"
                is_correct = ((logits.argmax(-1) == labels) | ~labelled).all(-1)
            halt_loss = F.binary_cross_entropy_with_logits(q_halt, is_correct.float())
            loss = lm_loss + cfg.halt_loss_weight * halt_loss

        # 4. Halting decides which slots take new data at the next call.
        with torch.no_grad():
            halted = steps >= max_steps
            if self.training and max_steps > 1:
                halted = halted | (q_halt > 0)
                explore = torch.rand(B, device=steps.device) < cfg.halt_exploration_prob
                min_steps = torch.where(explore, torch.randint_like(steps, 2, max_steps + 1), 0)
                halted = halted & (steps >= min_steps)
        new_carry = TRMPuzzleCarry(y=y.detach(), z=z.detach(), steps=steps, halted=halted, data=data)
        return TRMPuzzleOutput(loss=loss, logits=logits, q_halt_logits=q_halt, lm_loss=lm_loss,
                               halt_loss=halt_loss, is_correct=is_correct, carry=new_carry)

    # ----- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor],
                supervision_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `supervision_steps` steps (default: the config's) on every row, no early halting.

        Returns (step_preds (S, B, L) argmax tokens after each step, step_q_halt (S, B) halting logits).
        """
        steps = self.config.supervision_steps if supervision_steps is None else int(supervision_steps)
        if steps < 1:
            raise ValueError(f"supervision_steps must be >= 1, got {supervision_steps}")
        was_training = self.training
        self.eval()
        inputs = {k: v for k, v in batch.items() if k in ("inputs", "puzzle_identifiers")}
        carry, preds, q_halt = None, [], []
        for _ in range(steps):
            out = self(carry, inputs, supervision_steps=steps)
            carry = out.carry
            preds.append(out.logits.argmax(-1))
            q_halt.append(out.q_halt_logits.float())
        self.train(was_training)
        return torch.stack(preds), torch.stack(q_halt)


def write_remote_code(folder: str | Path) -> None:
    """The modeling code next to saved weights, as the LM ships it: this file as `modeling_trm_puzzle.py` with its
    `trm_lm` imports made relative, beside trm_lm's configuration_trm.py, core.py and modeling_trm.py, so that
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` runs without this package installed."""
    # trm_lm's folder, or for a remote copy its own folder (the dependencies lie beside it)
    folder, sources = Path(folder), Path(sys.modules[TRMConfig.__module__].__file__).resolve().parent
    for name in REMOTE_CODE_DEPENDENCIES:
        if (sources / name).resolve() != (folder / name).resolve():
            shutil.copyfile(sources / name, folder / name)
    source = re.sub(r"^from trm_lm\.(\w+) import ", r"from .\1 import ", Path(__file__).read_text(encoding="utf-8"),
                    flags=re.M)
    (folder / f"{REMOTE_CODE_MODULE}.py").write_text(source, encoding="utf-8")


AutoConfig.register(PuzzleTRMConfig.model_type, PuzzleTRMConfig, exist_ok=True)
AutoModel.register(PuzzleTRMConfig, TRMPuzzleModel, exist_ok=True)

__all__ = ["PuzzleTRMConfig", "TRMPuzzleModel", "TRMPuzzleCarry", "TRMPuzzleOutput", "log_stablemax",
           "token_cross_entropy"]
