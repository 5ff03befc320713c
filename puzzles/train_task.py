"""The grid-puzzle task for the one training loop (trm_lm.training): data, model, per-step loss, evaluation.

Deep supervision with a persistent carry (as the official pretrain.py, not as the paper's pseudocode):
every optimizer step runs ONE supervision step (`TRMPuzzleModel.forward`) on a fixed set of B slots
held by the task in `self.carry`. Slots that halted at the previous step are reset to the initial
(y, z) and take their row of the new batch; the other slots keep their puzzle and their (detached)
y, z and run their next step, and the batch rows landing on them are not used. A slot halts after
`supervision_steps` steps or earlier when its halting logit says "already right" (with exploration,
see puzzles/model.py). So one puzzle is supervised over up to N_sup consecutive optimizer steps, the
gradient never crosses a step boundary, and the carry is checkpointed with the rest of the training
state (`state_dict`), which keeps resumed runs exact. A short last batch is padded with unlabelled rows.

Optimizer: the loop's AdamW, decaying every weight (the halting-head bias too), as the official code.
The puzzle-identifier embedding gets its own parameter group (`--puzzle_emb_lr`,
`--puzzle_emb_weight_decay`) instead of the official separate SignSGD optimizer (the loop owns one
optimizer; AdamW normalises each coordinate much as sign(g) does). Unlike SignSGD, AdamW's decoupled
decay touches every row at every step, not only the rows in the batch: with many identifiers (ARC) use
a much smaller puzzle_emb_weight_decay (train/configs/puzzle-arc*.yaml use 0). The EMA leaves the table
out, as the official one. Every difference to the official code and why: docs/puzzles.md.

Data order: examples are drawn uniformly (the official loader draws one version per original puzzle
group); `--num_aug N` adds N on-the-fly Sudoku versions per puzzle (the builder's augmentation, computed
when read: example j of the virtual length N_puzzles * (N + 1) is a deterministic function of (seed, j)).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import Dataset

from trm_lm.arguments import TrainingArguments, parse_args
from trm_lm.training import TrainingTask, init_weights_from, run_training

from . import sudoku
from .evaluate import (PuzzleScorer, arc_voter, check_task, flat_metrics, model_predictor, score_predictor)
from .grids import IGNORE_INDEX, PuzzleExampleDataset, load_split
from .model import PuzzleTRMConfig, TRMPuzzleCarry, TRMPuzzleModel

logger = logging.getLogger(__name__)


@dataclass
class PuzzleDataArguments:
    task: Literal["sudoku", "maze", "arc1", "arc2"] = field(
        default=None, metadata={"help": "Which puzzle family: sets the metrics (and the default --config)."})
    data_dir: str = field(default=None, metadata={"help": "Dataset folder built by `python -m puzzles.build`."})
    num_aug: int = field(
        default=0, metadata={"help": "Sudoku only: random validity-preserving versions per training puzzle, "
                                     "made on the fly (0 = use the examples as stored)."})
    puzzle_emb_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the puzzle-identifier embedding (default: learning_rate)."})
    puzzle_emb_weight_decay: float | None = field(
        default=None, metadata={"help": "Its AdamW decay (default: weight_decay)."})
    init_from: str | None = field(
        default=None, metadata={"help": "A saved puzzle model folder whose weights start the run (fine-tuning); "
                                        "the configured architecture must have the same shapes."})
    eval_split: Literal["test", "val"] = field(
        default="test", metadata={"help": "The split scored during training; 'val' (puzzles.build --num_val) keeps "
                                          "checkpoint selection (--metric_for_best_model) off the test split."})
    eval_max_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples of --eval_split (default: all)."})
    eval_supervision_steps: int | None = field(
        default=None, metadata={"help": "Supervision steps run at evaluation (default: supervision_steps)."})


def _config_field(name: str, help: str = ""):
    """A PuzzleTRMConfig field as a flag: unset (None) = the config's default, declared once, there."""
    default = getattr(PuzzleTRMConfig, name)
    shown = "the official rule" if default is None else repr(default)
    return field(default=None, metadata={"help": f"{help} Default: PuzzleTRMConfig's, {shown}.".strip()})


@dataclass
class PuzzleModelArguments:
    """PuzzleTRMConfig fields; unset ones keep the config's defaults (the official TRM: D=512, T=3, n=6,
    N_sup=16; the Sudoku-Extreme TRM-MLP sets mixer=mlp)."""

    hidden_size: int | None = _config_field("hidden_size", "D: the width of the network.")
    num_attention_heads: int | None = _config_field("num_attention_heads")
    intermediate_size: int | None = _config_field("intermediate_size", "SwiGLU width (official: 1536 for D=512).")
    net_layers: int | None = _config_field("net_layers", "Blocks in the one tiny network.")
    latent_steps: int | None = _config_field("latent_steps", "n: latent updates per cycle.")
    cycles: int | None = _config_field("cycles", "T: cycles per supervision step (T-1 without grad).")
    supervision_steps: int | None = _config_field("supervision_steps", "N_sup (official halt_max_steps).")
    mixer: Literal["attention", "mlp"] | None = _config_field("mixer")
    sequence_mlp_size: int | None = _config_field(
        "sequence_mlp_size", "mixer=mlp: token-mixer width (official: 4*L*2/3 rounded up to 256).")
    position_encoding: Literal["rope", "learned", "none"] | None = _config_field("position_encoding")
    puzzle_emb_len: int | None = _config_field("puzzle_emb_len", "Prefix positions: 1 learned + the rest zeros.")
    halt_exploration_prob: float | None = _config_field("halt_exploration_prob")
    halt_loss_weight: float | None = _config_field("halt_loss_weight")
    loss_type: Literal["stablemax", "softmax"] | None = _config_field("loss_type")
    recursion: Literal["trm", "direct"] | None = _config_field(
        "recursion", "'direct' = the network applied once (baseline; needs supervision_steps=1).")


class AugmentedSudokuDataset(Dataset):
    """Virtual length len(base) * (num_aug + 1): item j is example j % len(base), as stored for j < len(base),
    else under a random Sudoku transform drawn from (seed, j), so any worker or resumed run sees the same."""

    def __init__(self, base: PuzzleExampleDataset, num_aug: int, seed: int):
        self.base, self.num_aug, self.seed = base, num_aug, seed
        self.shape = sudoku.SudokuShape.from_num_cells(base.split.metadata.seq_len)
        if np.any(base.split.labels == base.ignore_label_id):
            raise ValueError("on-the-fly Sudoku augmentation needs every cell labelled (a Sudoku dataset)")

    def __len__(self) -> int:
        return len(self.base) * (self.num_aug + 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.base[index % len(self.base)]
        if index < len(self.base):
            return item
        transform = sudoku.random_transform(self.shape, np.random.default_rng([self.seed, index]))
        for key in ("inputs", "labels"):
            item[key] = torch.from_numpy(transform.apply(item[key].numpy(), tokens=True))
        return item


class PuzzleTask(TrainingTask):
    def __init__(self, data_args: PuzzleDataArguments, model_args: PuzzleModelArguments, eval_batch_size: int,
                 seed: int = 0):
        missing = [f"--{name}" for name in ("task", "data_dir") if getattr(data_args, name) is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (on the command "
                             "line or in the --config YAML); --data_dir is the folder `python -m puzzles.build` wrote")
        self.data_args, self.model_args, self.eval_batch_size = data_args, model_args, eval_batch_size
        train = load_split(data_args.data_dir, "train", mmap=True)
        self.test = load_split(data_args.data_dir, data_args.eval_split, mmap=True)
        check_task(data_args.task, train.metadata, str(Path(data_args.data_dir) / "train"))
        self.metadata = train.metadata
        dataset = PuzzleExampleDataset(train)
        if data_args.num_aug < 0:
            raise ValueError(f"--num_aug must be >= 0, got {data_args.num_aug}")
        if data_args.num_aug and data_args.task != "sudoku":
            raise ValueError("--num_aug (on-the-fly augmentation) is for Sudoku; ARC and Maze datasets carry their "
                             "augmentations on disk (python -m puzzles.build --num_aug / --aug)")
        self.train_dataset = AugmentedSudokuDataset(dataset, data_args.num_aug, seed) if data_args.num_aug else dataset
        self.carry: TRMPuzzleCarry | None = None

    # ----- model and optimizer -------------------------------------------------------------------------------
    def model_config(self) -> PuzzleTRMConfig:
        m = self.metadata
        chosen = {name: value for name, value in vars(self.model_args).items() if value is not None}
        return PuzzleTRMConfig(vocab_size=m.vocab_size, num_cells=m.seq_len,
                               num_puzzle_identifiers=m.num_puzzle_identifiers, **chosen)

    def build_model(self) -> TRMPuzzleModel:
        model = TRMPuzzleModel(self.model_config())
        return init_weights_from(model, self.data_args.init_from) if self.data_args.init_from else model

    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        """Every weight decayed, the halting-head bias too (as the official optimizer, unlike the loop's
        matrices-only default), plus a group for the puzzle embedding with its own lr / decay."""
        table = model.puzzle_emb.weight
        weights = [p for p in model.parameters() if p.requires_grad and p is not table]
        decay = self.data_args.puzzle_emb_weight_decay
        puzzle_group = {"params": [table], "weight_decay": weight_decay if decay is None else decay}
        if self.data_args.puzzle_emb_lr is not None:
            puzzle_group["lr"] = self.data_args.puzzle_emb_lr
        return [{"params": weights, "weight_decay": weight_decay}, puzzle_group]

    def ema_skipped_parameters(self, model) -> list[str]:
        """The official EMA averages parameters only, and its puzzle-embedding table is a buffer: the evaluated
        and saved EMA model uses the table's current rows. An ARC row is trained only when its augmented task
        is drawn, and a 0.999 average would trail each of those rare updates by ~1,000 steps."""
        return ["puzzle_emb.weight"]

    # ----- one optimizer step's loss ---------------------------------------------------------------------------
    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        carry = self.carry
        rows = batch["inputs"].shape[0]
        if carry is not None and carry.batch_size < rows:  # a larger batch than before (changed geometry)
            carry = None
        if carry is not None:
            carry = carry.to(batch["inputs"].device)
            if rows < carry.batch_size:
                batch = self.pad_batch(batch, carry.batch_size)
        out = model(carry, batch)
        self.carry = out.carry
        return out.loss

    def pad_batch(self, batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """Fill a short batch up to `rows` with unlabelled rows (PAD inputs, blank identifier), as the official
        loader does; they carry no cell loss."""
        fill = {"inputs": self.metadata.pad_id, "labels": IGNORE_INDEX,
                "puzzle_identifiers": self.metadata.blank_identifier_id}
        out = {}
        for key, value in batch.items():
            extra = value.new_full((rows - value.shape[0], *value.shape[1:]), fill.get(key, 0))
            out[key] = torch.cat([value, extra])
        return out

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["inputs"].numel()

    # ----- persistent state: the carry of every process ------------------------------------------------------
    def state_dict(self) -> dict:
        """Called on every process by the checkpoint code; gathers each process's carry (collective)."""
        mine = {k: v.cpu() for k, v in self.carry.state_dict().items()} if self.carry is not None else None
        return {"carries": gather_object([mine])}

    def load_state_dict(self, state: dict) -> None:
        carries, process = state.get("carries", []), PartialState()
        if len(carries) != process.num_processes or carries[process.process_index] is None:
            logger.warning("the checkpoint holds %d carries for %d processes: starting with fresh slots",
                           len(carries), process.num_processes)
            self.carry = None
            return
        self.carry = TRMPuzzleCarry.from_state_dict(carries[process.process_index])

    # ----- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, model, accelerator) -> dict[str, float]:
        """Exact / cell accuracy after every step, halting statistics, maze validity, ARC pass@k on --eval_split;
        each process scores every num_processes-th row, the counts are then combined."""
        result = self.score(model, accelerator.process_index, accelerator.num_processes, accelerator.device)
        return flat_metrics(result)

    def score(self, model, process_index: int = 0, num_processes: int = 1, device="cpu") -> dict:
        cfg = model.config
        steps = self.data_args.eval_supervision_steps or cfg.supervision_steps
        total = min(self.data_args.eval_max_examples or self.test.num_examples, self.test.num_examples)
        is_arc = self.data_args.task.startswith("arc")
        voter = arc_voter(self.data_args.data_dir, self.test.metadata) if is_arc else None
        scorer = PuzzleScorer(self.data_args.task, steps, min(cfg.supervision_steps, steps), voter,
                              cfg.halt_probability)
        score_predictor(model_predictor(model, steps), PuzzleExampleDataset(self.test), scorer,
                        batch_size=self.eval_batch_size, indices=range(process_index, total, num_processes),
                        device=device)
        scorers = gather_object([scorer]) if num_processes > 1 else [scorer]
        merged = scorers[0]
        for other in scorers[1:]:
            merged.merge(other)
        return merged.result()

    def save_final(self, model, output_dir: Path, metrics: dict, run_info: dict) -> None:
        """README.md with what was trained on what, and the final test metrics."""
        d, cfg = self.data_args, model.config
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if "step_" not in k)
        text = (
            f"# {output_dir.name}\n\n"
            f"A Tiny Recursive Model (Jolicoeur-Martineau 2025, arXiv:2510.04871) for {d.task} puzzles, trained with "
            f"trm-lm (`train/train_puzzles.py`) on `{Path(d.data_dir).name}` ({self.metadata.task}, "
            f"{self.metadata.grid_shape[0]}x{self.metadata.grid_shape[1]} grids).\n\n"
            f"Architecture: {cfg.recursion}, mixer {cfg.mixer}, D={cfg.hidden_size}, {cfg.net_layers} blocks, "
            f"T={cfg.cycles}, n={cfg.latent_steps}, N_sup={cfg.supervision_steps}, "
            f"{run_info.get('num_parameters', 0):,} parameters; {run_info.get('steps')} optimizer steps in "
            f"{run_info.get('wall_time_s')} s on {run_info.get('hardware')}.\n\n"
            "```python\nimport puzzles.model  # registers trm_puzzle\nfrom puzzles.model import TRMPuzzleModel\n"
            f"model = TRMPuzzleModel.from_pretrained(\"{output_dir.name}\")\n"
            "step_preds, step_q_halt = model.predict({\"inputs\": inputs, \"puzzle_identifiers\": ids})\n```\n\n"
            f"Evaluate: `python -m puzzles.evaluate --model {output_dir.name} --task {d.task} --data_dir DATA`.\n\n"
            "| test metric | value |\n|---|---|\n" + rows + "\n"
        )
        (output_dir / "README.md").write_text(text)
        info = {"task": d.task, "dataset_task": self.metadata.task, "grid_shape": list(self.metadata.grid_shape)}
        (output_dir / "puzzle_task.json").write_text(json.dumps(info, indent=2))


def default_config(argv: list[str], config_dir: Path) -> list[str]:
    """Append `--config <config_dir>/puzzle-<task>.yaml` when the command line names a --task but no --config."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--task")
    known, _ = pre.parse_known_args(argv)
    if known.config or not known.task:
        return argv
    path = Path(config_dir) / f"puzzle-{known.task}.yaml"
    if not path.is_file():
        raise ValueError(f"no default config for --task {known.task!r} ({path} is missing); pass --config")
    return [*argv, "--config", str(path)]


def main(argv: list[str] | None = None, config_dir: Path | None = None):
    """train/train_puzzles.py: parse the flags (with `config_dir`, a --task without --config reads that folder's
    puzzle-<task>.yaml), build the task and run the shared loop."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if config_dir is not None:
        argv = default_config(argv, config_dir)
    training_args, data_args, model_args = parse_args([TrainingArguments, PuzzleDataArguments, PuzzleModelArguments],
                                                      argv)
    training_args.validate()
    task = PuzzleTask(data_args, model_args, training_args.per_device_eval_batch_size, seed=training_args.seed)
    return run_training(training_args, task)


__all__ = ["PuzzleDataArguments", "PuzzleModelArguments", "PuzzleTask", "AugmentedSudokuDataset", "main"]
