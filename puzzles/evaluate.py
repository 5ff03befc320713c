"""Evaluate a grid-puzzle model: exact and cell accuracy, accuracy after every supervision step, halting
statistics, maze path validity and ARC pass@k (voting over augmentations); JSON out.

    python -m puzzles.evaluate --model outputs/sudoku --task sudoku --data_dir data/sudoku-extreme
    python -m puzzles.evaluate --model outputs/arc1 --task arc1 --data_dir data/arc1 --supervision_steps 16 --output arc1.json

Every row runs `--supervision_steps` steps (default: the model's supervision_steps, as the official
evaluation: no early exit) and its prediction is recorded after each. Headline numbers are taken after
`--report_step` steps (default: the trained supervision_steps, or fewer if fewer are run); `per_step` has the
whole curve. `halting` says what adaptive halting would do: a row stops at its first step with
P(halt) = sigmoid(q_halt) > the model's halt_threshold (`--halt_threshold`; unset: the official 0.5, i.e.
q_halt > 0), else at report_step; `exact_accuracy_at_halt` scores the prediction there.

The metric primitives are puzzles.metrics; PuzzleScorer only streams batches into counts, so a predictor
that returns the labels scores exactly 1.0 (see tests/puzzles/test_model.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from trm_lm.cli import HelpFormatter

from . import arc, maze, metrics
from .grids import SPLITS, PuzzleExampleDataset, PuzzleMetadata, load_identifiers, load_split
from .metrics import halt_logit
from .model import OFFICIAL_HALT_PROBABILITY, TRMPuzzleModel
from .sudoku import BLANK_TOKEN

TASKS = ("sudoku", "maze", "arc1", "arc2")

# step_preds (S, B, L) tokens, step_q_halt (S, B) logits
Predictor = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def check_task(task: str, metadata: PuzzleMetadata, where: str) -> None:
    """The dataset in `where` must be of the kind `task` names (its dataset.json says which)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    family = "arc" if task.startswith("arc") else task
    if not metadata.task.startswith(family):
        raise ValueError(f"{where} holds a dataset of kind {metadata.task!r}, not {task} "
                         f"(build it with `python -m puzzles.build`)")


def arc_voter(data_dir: str | Path, metadata: PuzzleMetadata) -> metrics.ARCVoter:
    return metrics.ARCVoter(load_identifiers(data_dir), arc.load_test_puzzles(data_dir), metadata.blank_identifier_id)


def merge_arc_votes(into: metrics.ARCVoter, other: metrics.ARCVoter) -> None:
    """Add `other`'s votes (counts and confidence sums) to `into` (votes of several processes)."""
    into.grids.update(other.grids)
    for task_id, inputs in other.votes.items():
        for input_hash, candidates in inputs.items():
            mine = into.votes.setdefault(task_id, {}).setdefault(input_hash, {})
            for pred_hash, (count, q_sum) in candidates.items():
                stats = mine.setdefault(pred_hash, [0, 0.0])
                stats[0] += count
                stats[1] += q_sum


class PuzzleScorer:
    """Accumulates the counts behind every reported metric, batch by batch; `merge` combines processes."""

    def __init__(self, task: str, supervision_steps: int, report_step: int, voter: metrics.ARCVoter | None = None,
                 halt_probability: float = OFFICIAL_HALT_PROBABILITY):
        if not 1 <= report_step <= supervision_steps:
            raise ValueError(f"report_step must be in 1..supervision_steps={supervision_steps}, got {report_step}")
        if not 0 < halt_probability <= 1:
            raise ValueError(f"the halt threshold must be in (0, 1], got {halt_probability}")
        self.task, self.supervision_steps, self.report_step, self.voter = task, supervision_steps, report_step, voter
        self.halt_probability, self.halt_logit = halt_probability, halt_logit(halt_probability)
        self.examples = 0
        self.exact = np.zeros(supervision_steps)  # per step: rows whose whole grid is right
        self.cells = np.zeros((2, supervision_steps))  # per step: (right supervised cells, supervised cells)
        self.blank_cells = np.zeros((2, supervision_steps))  # sudoku: the same over the cells blank in the input
        self.valid_paths = 0  # maze: valid and optimal paths at report_step
        self.steps_used: list[np.ndarray] = []  # adaptive halting: first step with P(halt) > threshold, else the last
        self.exact_at_halt = 0
        self.final_q: list[np.ndarray] = []  # halting logit and correctness at report_step
        self.final_correct: list[np.ndarray] = []

    def update(self, batch: dict[str, torch.Tensor], step_preds: torch.Tensor, step_q_halt: torch.Tensor) -> None:
        preds, q = step_preds.detach().cpu().numpy(), step_q_halt.detach().float().cpu().numpy()  # (S, B, L), (S, B)
        inputs, labels = batch["inputs"].cpu().numpy(), batch["labels"].cpu().numpy()
        if preds.shape[0] != self.supervision_steps or preds.shape[1:] != labels.shape:
            raise ValueError(f"predictions {preds.shape} do not match {self.supervision_steps} steps x labels {labels.shape}")
        blanks = metrics.blank_mask(inputs, BLANK_TOKEN) & (labels != metrics.IGNORE_INDEX) \
            if self.task == "sudoku" else None
        exact = np.stack([metrics.exact_matches(p, labels) for p in preds])  # (S, B)
        self.examples += labels.shape[0]
        self.exact += exact.sum(1)
        for s, p in enumerate(preds):
            correct, supervised = metrics.correct_cells(p, labels)
            self.cells[:, s] += correct.sum(), supervised.sum()
            if blanks is not None:
                correct, supervised = metrics.correct_cells(p, labels, mask=blanks)
                self.blank_cells[:, s] += correct.sum(), supervised.sum()
        final = self.report_step - 1
        if self.task == "maze":
            self.valid_paths += maze.check_paths(inputs, preds[final]).sum()
        halts = q[: self.report_step] > self.halt_logit  # (S', B)
        stop = np.where(halts.any(0), halts.argmax(0), final)  # (B,) 0-based halting step
        self.steps_used.append(stop + 1)
        self.exact_at_halt += exact[stop, np.arange(len(stop))].sum()
        self.final_q.append(q[final])
        self.final_correct.append(exact[final])
        if self.voter is not None:
            self.voter.update(batch["puzzle_identifiers"], inputs, preds[final], 1 / (1 + np.exp(-q[final])))

    def merge(self, other: "PuzzleScorer") -> "PuzzleScorer":
        self.examples += other.examples
        self.exact += other.exact
        self.cells += other.cells
        self.blank_cells += other.blank_cells
        self.valid_paths += other.valid_paths
        self.exact_at_halt += other.exact_at_halt
        self.steps_used += other.steps_used
        self.final_q += other.final_q
        self.final_correct += other.final_correct
        if self.voter is not None and other.voter is not None:
            merge_arc_votes(self.voter, other.voter)
        return self

    def result(self) -> dict:
        if self.examples == 0:
            raise ValueError("no example was evaluated")
        n = self.examples
        ratio = lambda right, total: float(right / total) if total else float("nan")  # noqa: E731
        per_step = []
        for s in range(self.supervision_steps):
            row = {"step": s + 1, "exact_accuracy": float(self.exact[s] / n),
                   "cell_accuracy": ratio(*self.cells[:, s])}
            if self.task == "sudoku":
                row["blank_cell_accuracy"] = ratio(*self.blank_cells[:, s])
            per_step.append(row)
        out = {"task": self.task, "num_examples": n, "supervision_steps": self.supervision_steps, "report_step": self.report_step,
               **{k: v for k, v in per_step[self.report_step - 1].items() if k != "step"}}
        if self.task == "maze":
            out["valid_path_accuracy"] = float(self.valid_paths / n)
        halting = metrics.halting_summary(np.concatenate(self.steps_used), self.report_step,
                                          np.concatenate(self.final_q), np.concatenate(self.final_correct))
        halting["exact_accuracy_at_halt"] = float(self.exact_at_halt / n)
        halting["threshold"] = self.halt_probability
        out["halting"] = halting
        out["per_step"] = per_step
        if self.voter is not None:
            out["arc"], _ = self.voter.result()
        return out


def flat_metrics(result: dict) -> dict[str, float]:
    """The scalar metrics of `PuzzleScorer.result()`, flat (for training logs)."""
    flat = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for row in result["per_step"]:
        flat[f"exact_accuracy_step_{row['step']}"] = row["exact_accuracy"]
    halting = result["halting"]
    for key in ("mean_steps", "halted_early", "halt_accuracy", "exact_accuracy_at_halt"):
        if key in halting:
            flat[f"halting_{key}"] = float(halting[key])
    flat.update({k: float(v) for k, v in result.get("arc", {}).items()})
    return flat


def score_predictor(predict: Predictor, dataset: PuzzleExampleDataset, scorer: PuzzleScorer, *, batch_size: int,
                    indices=None, device: torch.device | str = "cpu") -> PuzzleScorer:
    """Feed `dataset` (the rows in `indices`, default all) through `predict` in batches into `scorer`."""
    rows = range(len(dataset)) if indices is None else indices
    loader = DataLoader(Subset(dataset, list(rows)), batch_size=batch_size, shuffle=False)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        step_preds, step_q = predict(batch)
        scorer.update(batch, step_preds, step_q)
    return scorer


def model_predictor(model, supervision_steps: int) -> Predictor:
    return lambda batch: model.predict(batch, supervision_steps)


def evaluate_model(model, data_dir: str | Path, task: str, *, split: str = "test", batch_size: int = 256,
                   max_examples: int | None = None, supervision_steps: int | None = None, report_step: int | None = None,
                   device: torch.device | str | None = None) -> dict:
    """Single-process evaluation of `model` (a TRMPuzzleModel) on `data_dir/split`; returns the result dict.
    Halting statistics use `model.config.halt_probability`."""
    data = load_split(data_dir, split, mmap=True)
    check_task(task, data.metadata, str(Path(data_dir) / split))
    check_compatible(model.config, data.metadata, str(Path(data_dir) / split))
    device = torch.device(device) if device else next(model.parameters()).device
    model.to(device).eval()
    steps = supervision_steps or model.config.supervision_steps
    report_step = report_step or min(model.config.supervision_steps, steps)
    voter = arc_voter(data_dir, data.metadata) if task.startswith("arc") else None
    scorer = PuzzleScorer(task, steps, report_step, voter, model.config.halt_probability)
    rows = range(min(max_examples, data.num_examples)) if max_examples else None
    return score_predictor(model_predictor(model, steps), PuzzleExampleDataset(data), scorer,
                           batch_size=batch_size, indices=rows, device=device).result()


def check_compatible(config, metadata: PuzzleMetadata, where: str) -> None:
    """The model must have been built for this dataset's vocabulary, grid size and puzzle identifiers."""
    problems = [f"{name}: model {getattr(config, attr)} vs data {getattr(metadata, meta)}"
                for name, attr, meta in (("vocabulary", "vocab_size", "vocab_size"), ("cells", "num_cells", "seq_len"))
                if getattr(config, attr) != getattr(metadata, meta)]
    if metadata.num_puzzle_identifiers > config.num_puzzle_identifiers:
        problems.append(f"puzzle identifiers: model {config.num_puzzle_identifiers} vs data "
                        f"{metadata.num_puzzle_identifiers}")
    if problems:
        raise ValueError(f"the model does not fit the dataset {where}: " + "; ".join(problems))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m puzzles.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train/train_puzzles.py (save_pretrained)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data_dir", required=True, help="dataset folder built by `python -m puzzles.build`")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_examples", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--supervision_steps", "--num_steps", type=int, default=None, dest="supervision_steps",
                   help="N_sup: supervision steps run on every row (default: the model's; --num_steps is the old name)")
    p.add_argument("--report_step", type=int, default=None, help="step of the headline numbers")
    p.add_argument("--halt_threshold", type=float, default=None,
                   help="P(halt) at which the halting statistics stop a row (default: the model's halt_threshold, "
                        "unset = the official 0.5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for name in ("batch_size", "max_examples", "supervision_steps", "report_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model}: no config.json; pass a folder saved by train/train_puzzles.py")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {} if args.halt_threshold is None else {"halt_threshold": args.halt_threshold}
    model = TRMPuzzleModel.from_pretrained(args.model, **overrides)  # the config checks the threshold
    result = evaluate_model(model, args.data_dir, args.task, split=args.split, batch_size=args.batch_size,
                            max_examples=args.max_examples, supervision_steps=args.supervision_steps, report_step=args.report_step,
                            device=device)
    result = {"model": str(args.model), "data_dir": str(args.data_dir), "split": args.split, **result}
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
