"""Maze-Hard (30x30, sapientinc/maze-30x30-hard-1k): loading the HRM-format copy, a batch BFS path checker
("correct only if it is a valid and optimal path"), dihedral augmentation and the builder into the shared format.

Tokens (HRM builder): 1 + index in "# SGo" -> 1 wall, 2 open, 3 start, 4 goal, 5 path; 0 = PAD (never present).
The label is the input with the cells of one shortest S -> G path marked 5.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .grids import BLANK_IDENTIFIER, DEFAULT_DATA_ROOT, SplitBuilder, dihedral_transform, load_hrm_arrays, write_dataset

CHARSET = "# SGo"
PAD, WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4, 5
VOCAB_SIZE = len(CHARSET) + 1
MAZE_DIR = DEFAULT_DATA_ROOT / "maze-30x30-hard-1k"


def maze_from_text(lines: Sequence[str]) -> np.ndarray:
    """Rows of '# SGo' characters -> (H, W) uint8 tokens."""
    if not lines or len({len(line) for line in lines}) != 1:
        raise ValueError(f"maze rows must be non-empty and of equal length, got lengths {[len(x) for x in lines]}")
    bad = sorted({ch for line in lines for ch in line} - set(CHARSET))
    if bad:
        raise ValueError(f"maze text has characters {bad}; allowed are {CHARSET!r}")
    return np.asarray([[CHARSET.index(ch) + 1 for ch in line] for line in lines], dtype=np.uint8)


def maze_to_text(grid: np.ndarray) -> list[str]:
    return ["".join(CHARSET[v - 1] if v else "?" for v in row) for row in np.asarray(grid)]


def _as_grids(tokens: np.ndarray, grid_shape: tuple[int, int] | None) -> np.ndarray:
    """(B, L) or (B, H, W) -> (B, H, W); a flat L must be a square unless grid_shape is given."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 3:
        return tokens
    if tokens.ndim != 2:
        raise ValueError(f"expected maze tokens of shape (B, L) or (B, H, W), got {tokens.shape}")
    if grid_shape is None:
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"sequence length {tokens.shape[1]} is not square; pass grid_shape")
        grid_shape = (side, side)
    return tokens.reshape(len(tokens), *grid_shape)


def bfs_distance(passable: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Shortest 4-neighbour path length from `source` cells to any `target` cell, for a batch of grids at once.

    passable, source, target: (B, H, W) bool. Returns (B,) int: steps, or -1 when the target is unreachable.
    """
    batch = passable.shape[0]
    dist = np.full(batch, -1, dtype=np.int64)
    frontier = source & passable
    visited = frontier.copy()
    step = 0
    while True:
        reached = (dist < 0) & (frontier & target).any(axis=(1, 2))
        dist[reached] = step
        if not frontier.any() or (dist >= 0).all():
            return dist
        grown = np.zeros_like(frontier)  # the four neighbours of the frontier
        grown[:, 1:, :] |= frontier[:, :-1, :]
        grown[:, :-1, :] |= frontier[:, 1:, :]
        grown[:, :, 1:] |= frontier[:, :, :-1]
        grown[:, :, :-1] |= frontier[:, :, 1:]
        frontier = grown & passable & ~visited
        visited |= frontier
        step += 1


def check_paths(inputs: np.ndarray, preds: np.ndarray, grid_shape: tuple[int, int] | None = None) -> np.ndarray:
    """(B,) bool: prediction b is a valid AND optimal solution of maze b.

    Valid and optimal means: the prediction equals the input everywhere except open cells marked as path; the
    marked cells together with S and G connect S to G; and there are exactly (shortest S -> G distance - 1) of
    them. A connected S..G chain needs at least that many intermediate cells, so this is exactly "a shortest path".
    """
    inputs, preds = _as_grids(inputs, grid_shape), _as_grids(preds, grid_shape)
    if inputs.shape != preds.shape:
        raise ValueError(f"inputs {inputs.shape} and predictions {preds.shape} differ in shape")
    start, goal, path = inputs == START, inputs == GOAL, preds == PATH
    one_each = (start.sum(axis=(1, 2)) == 1) & (goal.sum(axis=(1, 2)) == 1)
    untouched = ((preds == inputs) | (path & (inputs == OPEN))).all(axis=(1, 2))
    shortest = bfs_distance((inputs == OPEN) | start | goal, start, goal)
    along_path = bfs_distance(path | start | goal, start, goal)
    num_path = path.sum(axis=(1, 2))
    return one_each & untouched & (shortest > 0) & (along_path == shortest) & (num_path == shortest - 1)


def load_hrm_maze(folder: str | os.PathLike = MAZE_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) uint8 (N, H*W) from `<folder>/<split>/all__{inputs,labels}.npy`, with format checks."""
    split_dir = Path(folder) / split
    inputs, labels = load_hrm_arrays(folder, split, "maze")
    if inputs.min() < WALL or inputs.max() > GOAL:
        raise ValueError(f"{split_dir}: input tokens must be 1..4 (no path marks), got [{inputs.min()}, {inputs.max()}]")
    if labels.min() < WALL or labels.max() > PATH:
        raise ValueError(f"{split_dir}: label tokens must be 1..5, got [{labels.min()}, {labels.max()}]")
    for name, token in (("start", START), ("goal", GOAL)):
        counts = (inputs == token).sum(axis=1)
        if np.any(counts != 1):
            first = int(np.argmax(counts != 1))
            raise ValueError(f"{split_dir}: maze {first} has {counts[first]} {name} cells, expected 1")
    return inputs, labels


def dihedral_versions(grid: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetric versions of a square (H, W) grid, identity first."""
    return [np.ascontiguousarray(dihedral_transform(grid, tid)) for tid in range(8)]


def build_maze(output_dir: str | os.PathLike, *, source_dir: str | os.PathLike = MAZE_DIR, aug: bool = False,
               check: bool = True, overwrite: bool = False) -> dict:
    """Copy the given train/test split into the shared format; `aug` adds the 8 dihedral versions of each training
    maze (one group per maze). `check` first verifies every label is a valid shortest path."""
    splits, stats = {}, {}
    for split in ("train", "test"):
        inputs, labels = load_hrm_maze(source_dir, split)
        side = int(round(inputs.shape[1] ** 0.5))
        if side * side != inputs.shape[1]:
            raise ValueError(f"{source_dir}/{split}: sequence length {inputs.shape[1]} is not a square maze")
        if check:
            ok = check_paths(inputs, labels)
            if not ok.all():
                raise ValueError(f"{source_dir}/{split}: {int((~ok).sum())} labels are not shortest paths "
                                 f"(first: maze {int(np.argmin(ok))})")
        builder = SplitBuilder("maze", (side, side), VOCAB_SIZE)
        for inp, lab in zip(inputs.reshape(-1, side, side), labels.reshape(-1, side, side)):
            if aug and split == "train":
                versions = zip(dihedral_versions(inp), dihedral_versions(lab))
            else:
                versions = [(inp, lab)]
            builder.add_group([(0, i.reshape(1, -1), l.reshape(1, -1)) for i, l in versions])
        splits[split] = builder.build(num_puzzle_identifiers=1)
        stats[f"{split}_examples"] = splits[split].num_examples
    write_dataset(output_dir, splits, [BLANK_IDENTIFIER], overwrite=overwrite)
    return stats
