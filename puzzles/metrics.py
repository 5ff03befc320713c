"""Metrics for grid puzzles: exact (whole-grid) and cell accuracy, accuracy per supervision step, halting
statistics, maze validity-aware accuracy and ARC pass@k voting over augmentations.

Inputs are numpy arrays or CPU torch tensors of tokens, (B, L). Supervised cells are those where `mask` is True;
by default every cell whose label is not `ignore_index` (-100, what PuzzleExampleDataset yields; pass
ignore_index=0 for raw on-disk labels, where PAD = 0 is the ignored label).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import arc, maze
from .grids import IGNORE_INDEX


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _supervised(labels: np.ndarray, mask, ignore_index: int) -> np.ndarray:
    return (labels != ignore_index) if mask is None else _np(mask).astype(bool)


def correct_cells(preds, labels, mask=None, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """(correct (B, L) bool, supervised (B, L) bool)."""
    preds, labels = _np(preds), _np(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    supervised = _supervised(labels, mask, ignore_index)
    return (preds == labels) & supervised, supervised


def exact_accuracy(preds, labels, mask=None, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of examples whose every supervised cell is right (the paper's Sudoku/Maze metric)."""
    return float(exact_matches(preds, labels, mask, ignore_index).mean())


def exact_matches(preds, labels, mask=None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(B,) bool: every supervised cell of the example is right."""
    correct, supervised = correct_cells(preds, labels, mask, ignore_index)
    return (correct == supervised).all(axis=-1)


def cell_accuracy(preds, labels, mask=None, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of supervised cells that are right (pooled over the batch); nan if nothing is supervised."""
    correct, supervised = correct_cells(preds, labels, mask, ignore_index)
    total = supervised.sum()
    return float(correct.sum() / total) if total else float("nan")


def blank_mask(inputs, blank_token: int = 1) -> np.ndarray:
    """Cells that are unknown in the input (Sudoku blank token = 1): pass as `mask` to score only those."""
    return _np(inputs) == blank_token


def accuracy_per_step(step_preds: Sequence, labels, mask=None, ignore_index: int = IGNORE_INDEX) -> list[dict[str, float]]:
    """Exact and cell accuracy after each supervision step, from a list of (B, L) predictions (step 1 first)."""
    return [{"step": i + 1, "exact_accuracy": exact_accuracy(p, labels, mask, ignore_index),
             "cell_accuracy": cell_accuracy(p, labels, mask, ignore_index)} for i, p in enumerate(step_preds)]


def halt_logit(probability: float) -> float:
    """The q_halt value at which sigmoid(q_halt) = probability (inf for 1: never)."""
    return math.inf if probability >= 1 else math.log(probability / (1 - probability))


def halting_summary(steps_used, max_steps: int, halt_logits=None, is_correct=None) -> dict[str, float | list[int]]:
    """Statistics of adaptive halting: steps used per example (1..max_steps), their histogram, the share that
    halted early, and (given final halt logits and exact-correctness) how often "halt" (logit >= 0) agreed with
    the answer being right, the official `q_halt_accuracy`."""
    steps = _np(steps_used).astype(np.int64).reshape(-1)
    if steps.size == 0:
        raise ValueError("halting_summary needs at least one example")
    if steps.min() < 1 or steps.max() > max_steps:
        raise ValueError(f"steps used must lie in 1..{max_steps}, got [{steps.min()}, {steps.max()}]")
    out: dict[str, float | list[int]] = {
        "mean_steps": float(steps.mean()), "median_steps": float(np.median(steps)),
        "min_steps": int(steps.min()), "max_steps": int(steps.max()),
        "halted_early": float((steps < max_steps).mean()),
        "histogram": np.bincount(steps, minlength=max_steps + 1)[1:].tolist(),  # count of examples per step 1..max
    }
    if halt_logits is not None and is_correct is not None:
        halts, correct = _np(halt_logits).reshape(-1) >= 0, _np(is_correct).astype(bool).reshape(-1)
        if halts.shape != correct.shape:
            raise ValueError(f"halt_logits {halts.shape} and is_correct {correct.shape} differ in size")
        out["halt_accuracy"] = float((halts == correct).mean())
    return out


def maze_accuracy(inputs, preds, grid_shape: tuple[int, int] | None = None) -> float:
    """Fraction of mazes whose prediction is a valid and optimal S -> G path (a different shortest path than the
    label counts as correct, a longer one or a broken one does not)."""
    return float(maze.check_paths(_np(inputs), _np(preds), grid_shape).mean())


class ARCVoter:
    """Votes over augmented predictions of the test split of an ARC dataset built by puzzles.arc.build_arc.

    Each prediction row is cropped, mapped back through its version's inverse augmentation (read from the
    puzzle name), hashed, and counted under (task, original test input). Candidates rank by (votes, mean halting
    confidence), descending. pass@k per test input = the true output is among the top k; a task scores the
    fraction of its test inputs passed; the result averages over tasks (tasks without predictions score 0).
    """

    def __init__(self, identifiers: Sequence[str], test_puzzles: dict[str, arc.ARCTask], blank_identifier_id: int = 0):
        self.identifiers, self.test_puzzles, self.blank_identifier_id = list(identifiers), test_puzzles, blank_identifier_id
        self.votes: dict[str, dict[str, dict[str, list[float]]]] = {}  # task -> input hash -> pred hash -> [count, sum q]
        self.grids: dict[str, np.ndarray] = {}  # pred hash -> de-augmented grid

    def update(self, puzzle_identifiers, inputs, preds, halt_confidence=None) -> None:
        """puzzle_identifiers (B,), inputs and preds (B, 900) tokens, halt_confidence (B,) in [0, 1]
        (e.g. sigmoid of the final halt logit; None counts 0 for every row, so ties keep first-seen order)."""
        ids, inputs, preds = _np(puzzle_identifiers).reshape(-1), _np(inputs), _np(preds)
        conf = np.zeros(len(ids)) if halt_confidence is None else _np(halt_confidence).astype(np.float64).reshape(-1)
        if not (len(ids) == len(inputs) == len(preds) == len(conf)):
            raise ValueError(f"batch sizes differ: ids {len(ids)}, inputs {len(inputs)}, preds {len(preds)}, "
                             f"confidence {len(conf)}")
        for identifier, inp, pred, q in zip(ids, inputs, preds, conf):
            if identifier == self.blank_identifier_id:  # padding rows of a short batch
                continue
            if not 0 <= identifier < len(self.identifiers):
                raise ValueError(f"puzzle identifier {identifier} is not in identifiers.json "
                                 f"({len(self.identifiers)} names)")
            task_id, aug = arc.parse_puzzle_name(self.identifiers[identifier])
            input_hash = arc.grid_hash(aug.invert(arc.decode_grid(inp)))
            grid = aug.invert(arc.decode_grid(pred))
            pred_hash = arc.grid_hash(grid)
            self.grids[pred_hash] = grid
            stats = self.votes.setdefault(task_id, {}).setdefault(input_hash, {}).setdefault(pred_hash, [0, 0.0])
            stats[0] += 1
            stats[1] += float(q)

    def ranked(self, task_id: str, test_input: np.ndarray) -> list[tuple[str, int, float]]:
        """(pred hash, votes, mean confidence) for one original test input, best first."""
        candidates = self.votes.get(task_id, {}).get(arc.grid_hash(test_input), {})
        ranked = [(h, int(n), s / n) for h, (n, s) in candidates.items()]
        return sorted(ranked, key=lambda x: (x[1], x[2]), reverse=True)

    def result(self, pass_ks: Sequence[int] = (1, 2, 5, 10, 100, 1000),
               submission_k: int = 2) -> tuple[dict[str, float], dict]:
        """({"ARC/pass@k": task-averaged score, ...}, submission {task: [{"attempt_1": grid, ...} per test input]})."""
        if not self.test_puzzles:
            raise ValueError("no test puzzles to score")
        totals = np.zeros(len(pass_ks))
        submission: dict[str, list[dict[str, list]]] = {}
        for task_id, task in self.test_puzzles.items():
            solved = np.zeros(len(pass_ks))
            submission[task_id] = []
            for test_input, test_output in task.test:
                ranked = self.ranked(task_id, test_input)
                if not ranked:
                    continue
                hits = [h == arc.grid_hash(test_output) for h, _, _ in ranked]
                solved += [any(hits[:k]) for k in pass_ks]
                attempts = [self.grids[h] for h, _, _ in ranked[:submission_k]]
                attempts += [attempts[0]] * (submission_k - len(attempts))
                submission[task_id].append({f"attempt_{i + 1}": arc.grid_to_json(g) for i, g in enumerate(attempts)})
            totals += solved / len(task.test)
        return {f"ARC/pass@{k}": float(t / len(self.test_puzzles)) for k, t in zip(pass_ks, totals)}, submission
