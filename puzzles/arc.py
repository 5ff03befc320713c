"""ARC-AGI-1 / ARC-AGI-2: task loading and validation, dihedral + colour augmentations and their inverses,
30x30 token encoding with EOS borders, cropping back, and the builder following the official split rule.

Tokens (official builder): PAD 0, EOS 1, colour c -> c + 2 (vocab 12, seq_len 900). A grid of h x w cells placed
at (r, c) gets an EOS line just below it (row r + h, columns c..c+w-1) and just right of it (column c + w,
rows r..r+h-1), where those fit inside the canvas. PAD is not supervised (ignore_label_id 0); EOS is.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .grids import (BLANK_IDENTIFIER, DEFAULT_DATA_ROOT, SplitBuilder, dihedral_transform,
                    inverse_dihedral_transform, write_dataset)

MAX_SIDE = 30
PAD, EOS, COLOUR_OFFSET = 0, 1, 2
NUM_COLOURS = 10
VOCAB_SIZE = NUM_COLOURS + 2
SEPARATOR = "|||"  # augmented puzzle name: "<task>|||t<dihedral id>|||<colour map digits>", as in the official code
ARC_DATA_DIRS = {"arc1": DEFAULT_DATA_ROOT / "arc-agi-1" / "data", "arc2": DEFAULT_DATA_ROOT / "arc-agi-2" / "data"}

Grid = np.ndarray  # (h, w) uint8 colours 0..9
Pair = tuple[Grid, Grid]


@dataclass
class ARCTask:
    task_id: str
    train: list[Pair]  # demonstration pairs
    test: list[Pair]  # test pairs (with their solutions)

    def to_json(self) -> dict[str, Any]:
        return {kind: [{"input": grid_to_json(i), "output": grid_to_json(o)} for i, o in pairs]
                for kind, pairs in (("train", self.train), ("test", self.test))}


# ---- loading and validation ------------------------------------------------------------------------------

def grid_from_json(obj: Any, where: str) -> Grid:
    """A list of equal-length rows of ints 0..9, 1..30 per side -> (h, w) uint8. ValueError says what and where."""
    if not isinstance(obj, list) or not obj or not all(isinstance(row, list) for row in obj):
        raise ValueError(f"{where}: a grid must be a non-empty list of rows (lists)")
    widths = {len(row) for row in obj}
    if len(widths) != 1:
        raise ValueError(f"{where}: grid is not rectangular (row lengths {sorted(widths)})")
    h, w = len(obj), widths.pop()
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"{where}: grid is {h}x{w}; each side must be 1..{MAX_SIDE}")
    for r, row in enumerate(obj):
        for c, v in enumerate(row):
            if type(v) is not int or not 0 <= v < NUM_COLOURS:  # bool and float are not colours
                raise ValueError(f"{where}: cell ({r}, {c}) is {v!r}; colours are ints 0..9")
    return np.asarray(obj, dtype=np.uint8)


def grid_to_json(grid: Grid) -> list[list[int]]:
    return np.asarray(grid).astype(int).tolist()


def task_from_json(task_id: str, obj: Any, where: str) -> ARCTask:
    if not isinstance(obj, dict) or not isinstance(obj.get("train"), list) or not isinstance(obj.get("test"), list):
        raise ValueError(f"{where}: a task must be an object with 'train' and 'test' lists")
    pairs: dict[str, list[Pair]] = {}
    for kind in ("train", "test"):
        pairs[kind] = []
        for k, pair in enumerate(obj[kind]):
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise ValueError(f"{where}: {kind} pair {k} needs 'input' and 'output' (test outputs are required to build)")
            pairs[kind].append((grid_from_json(pair["input"], f"{where}, {kind} pair {k}, input"),
                                grid_from_json(pair["output"], f"{where}, {kind} pair {k}, output")))
    if not pairs["train"] or not pairs["test"]:
        raise ValueError(f"{where}: a task needs at least one train and one test pair")
    return ARCTask(task_id, pairs["train"], pairs["test"])


def load_arc_task(path: str | os.PathLike) -> ARCTask:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"ARC task file {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return task_from_json(path.stem, obj, str(path))


def load_arc_subset(data_dir: str | os.PathLike, subset: str, limit: int | None = None) -> list[ARCTask]:
    """Tasks of `<data_dir>/<subset>/*.json` (the fchollet/ARC-AGI and arcprize/ARC-AGI-2 layout), sorted by id."""
    folder = Path(data_dir) / subset
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no ARC task files (*.json) in {folder}")
    return [load_arc_task(f) for f in files[:limit]]


def load_concept_arc(concept_dir: str | os.PathLike, limit: int | None = None) -> list[ARCTask]:
    """ConceptARC (Moskvichev et al. 2023) in its public layout: ARC-format task files grouped in concept
    subfolders (`corpus/<Concept>/<Concept><k>.json`, 16 concepts x 10 tasks). Every *.json below
    `concept_dir`, sorted by path; the task id is the file name, as in the ConceptARC repository."""
    files = sorted(Path(concept_dir).rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"no ConceptARC task files (*.json) under {concept_dir}; pass its corpus/ folder")
    return [load_arc_task(f) for f in files[:limit]]


# ---- augmentation --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ARCAugmentation:
    """A dihedral transform after a colour permutation that keeps 0 (black background) fixed."""

    tid: int = 0
    colour_map: tuple[int, ...] = tuple(range(NUM_COLOURS))  # colour_map[old colour] = new colour

    def __post_init__(self):
        if not 0 <= self.tid < 8:
            raise ValueError(f"dihedral id must be 0..7, got {self.tid}")
        if sorted(self.colour_map) != list(range(NUM_COLOURS)) or self.colour_map[0] != 0:
            raise ValueError(f"colour map must permute 0..9 and keep 0 fixed, got {self.colour_map}")

    @classmethod
    def random(cls, rng: np.random.Generator) -> "ARCAugmentation":
        return cls(int(rng.integers(8)), (0, *(int(c) for c in rng.permutation(np.arange(1, NUM_COLOURS)))))

    @property
    def is_identity(self) -> bool:
        return self.tid == 0 and self.colour_map == tuple(range(NUM_COLOURS))

    def apply(self, grid: Grid) -> Grid:
        table = np.asarray(self.colour_map, dtype=np.uint8)
        return np.ascontiguousarray(dihedral_transform(table[grid], self.tid))

    def invert(self, grid: Grid) -> Grid:
        inverse_table = np.argsort(self.colour_map).astype(np.uint8)
        return np.ascontiguousarray(inverse_table[inverse_dihedral_transform(grid, self.tid)])

    def name(self, task_id: str) -> str:
        if self.is_identity:
            return task_id
        return f"{task_id}{SEPARATOR}t{self.tid}{SEPARATOR}{''.join(str(c) for c in self.colour_map)}"


def parse_puzzle_name(name: str) -> tuple[str, ARCAugmentation]:
    """Inverse of ARCAugmentation.name: (task id, augmentation); a bare task id means the identity."""
    if SEPARATOR not in name:
        return name, ARCAugmentation()
    parts = name.split(SEPARATOR)
    if len(parts) != 3 or not parts[1].startswith("t") or not parts[1][1:].isdigit() or not parts[2].isdigit():
        raise ValueError(f"malformed augmented ARC puzzle name {name!r}; expected 'task|||t<0-7>|||<10 digits>'")
    return parts[0], ARCAugmentation(int(parts[1][1:]), tuple(int(c) for c in parts[2]))


def grid_hash(grid: Grid) -> str:
    """Hash of shape + cells, so grids with the same cells in a different shape differ."""
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def pairs_hash(pairs: Iterable[Pair]) -> str:
    """Order-free hash of a set of (input, output) pairs: two task versions with the same pairs are duplicates."""
    keys = sorted(f"{grid_hash(i)}|{grid_hash(o)}" for i, o in pairs)
    return hashlib.sha256("|".join(keys).encode()).hexdigest()


def task_versions(task: ARCTask, num_aug: int, rng: np.random.Generator, tries_factor: int = 5) -> list[ARCAugmentation]:
    """The identity plus up to `num_aug` random augmentations whose augmented task differs from every version kept
    so far (symmetric or few-colour tasks have fewer distinct versions; at most tries_factor * num_aug draws)."""
    all_pairs = task.train + task.test
    versions = [ARCAugmentation()]
    seen = {pairs_hash(all_pairs)}
    for _ in range(tries_factor * num_aug):
        if len(versions) > num_aug:
            break
        aug = ARCAugmentation.random(rng)
        h = pairs_hash((aug.apply(i), aug.apply(o)) for i, o in all_pairs)
        if h not in seen:
            seen.add(h)
            versions.append(aug)
    return versions


# ---- 30x30 encoding --------------------------------------------------------------------------------------------

def encode_grid(grid: Grid, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(h, w) colours -> (900,) uint8 tokens, grid at `offset`, EOS row below and EOS column right of it."""
    grid = np.asarray(grid)
    h, w = grid.shape
    r, c = offset
    if r < 0 or c < 0 or r + h > MAX_SIDE or c + w > MAX_SIDE:
        raise ValueError(f"a {h}x{w} grid at offset {offset} does not fit in {MAX_SIDE}x{MAX_SIDE}")
    canvas = np.full((MAX_SIDE, MAX_SIDE), PAD, dtype=np.uint8)
    canvas[r:r + h, c:c + w] = grid + COLOUR_OFFSET
    if r + h < MAX_SIDE:
        canvas[r + h, c:c + w] = EOS
    if c + w < MAX_SIDE:
        canvas[r:r + h, c + w] = EOS
    return canvas.reshape(-1)


def random_offset(pair: Pair, rng: np.random.Generator) -> tuple[int, int]:
    """A top-left offset at which both grids of the pair fit (they share it, as in the official builder)."""
    h = max(pair[0].shape[0], pair[1].shape[0])
    w = max(pair[0].shape[1], pair[1].shape[1])
    return int(rng.integers(MAX_SIDE - h + 1)), int(rng.integers(MAX_SIDE - w + 1))


def decode_grid(tokens: np.ndarray) -> Grid:
    """(900,) tokens -> colours of the largest all-colour rectangle anchored at the top-left corner (the official
    crop; an untranslated encoding decodes exactly; a prediction with no colour at (0, 0) decodes to 0x0)."""
    is_colour = np.asarray(tokens).reshape(MAX_SIDE, MAX_SIDE)
    is_colour = (is_colour >= COLOUR_OFFSET) & (is_colour < COLOUR_OFFSET + NUM_COLOURS)
    lead = np.where(is_colour.all(axis=1), MAX_SIDE, np.argmin(is_colour, axis=1))  # leading colour run per row
    width = np.minimum.accumulate(lead)
    area = np.arange(1, MAX_SIDE + 1) * width
    rows = int(np.argmax(area)) + 1  # first maximum, like the official loop
    cols = int(width[rows - 1]) if area.max() > 0 else 0
    rows = rows if cols else 0
    return (np.asarray(tokens).reshape(MAX_SIDE, MAX_SIDE)[:rows, :cols] - COLOUR_OFFSET).astype(np.uint8)


# ---- builder -------------------------------------------------------------------------------------------------------

def build_arc(output_dir: str | os.PathLike, *, data_dir: str | os.PathLike,
              subsets: Sequence[str] = ("training", "evaluation"),
              test_subset: str = "evaluation", num_aug: int = 1000, seed: int = 42, translate: bool = True,
              limit: int | None = None, task_name: str = "arc", concept_dir: str | os.PathLike | None = None,
              overwrite: bool = False) -> dict:
    """Official split rule: tasks of `test_subset` put their demonstration pairs in the train split and their test
    pairs in the test split; every other subset puts all its pairs in the train split. `concept_dir` (a local
    ConceptARC corpus) adds its tasks as one more training-only subset after the others, as the official ARC-1 and
    ARC-2 builds do with their bundled copy (`--subsets ... concept`). Each task becomes one group
    of 1 + up to `num_aug` distinct versions; each version is one puzzle with its own identifier, shared by its
    train-split and test-split examples. Train examples get a random translation (one per version stays at the
    origin) when `translate`; test examples never. `limit` keeps the first N tasks of each subset (smoke tests).
    Also writes test_puzzles.json: the original test-subset tasks, which the ARC voting metric scores against."""
    if test_subset not in subsets:
        raise ValueError(f"test_subset {test_subset!r} must be one of the subsets {list(subsets)}")
    rng = np.random.default_rng(seed)
    builders = {split: SplitBuilder(task_name, (MAX_SIDE, MAX_SIDE), VOCAB_SIZE) for split in ("train", "test")}
    identifiers = [BLANK_IDENTIFIER]
    test_puzzles: dict[str, Any] = {}
    seen_tasks: dict[str, str] = {}
    stats = {"tasks": 0, "versions": 0}
    sources = [(subset, load_arc_subset(data_dir, subset, limit)) for subset in subsets]
    if concept_dir is not None:
        sources.append(("concept", load_concept_arc(concept_dir, limit)))
        stats["concept_tasks"] = len(sources[-1][1])
    for subset, tasks in sources:
        for task in tasks:
            if task.task_id in seen_tasks:
                raise ValueError(f"task {task.task_id} is in both {seen_tasks[task.task_id]} and {subset}")
            seen_tasks[task.task_id] = subset
            if subset == test_subset:
                per_split = {"train": task.train, "test": task.test}
                test_puzzles[task.task_id] = task.to_json()
            else:
                per_split = {"train": task.train + task.test}
            versions = task_versions(task, num_aug, rng)
            ids = list(range(len(identifiers), len(identifiers) + len(versions)))
            identifiers.extend(aug.name(task.task_id) for aug in versions)
            for split, pairs in per_split.items():
                group = []
                for identifier, aug in zip(ids, versions):
                    augmented = [(aug.apply(i), aug.apply(o)) for i, o in pairs]
                    keep_at_origin = int(rng.integers(len(augmented)))
                    inputs, labels = [], []
                    for k, pair in enumerate(augmented):
                        moved = translate and split == "train" and k != keep_at_origin
                        offset = random_offset(pair, rng) if moved else (0, 0)
                        inputs.append(encode_grid(pair[0], offset))
                        labels.append(encode_grid(pair[1], offset))
                    group.append((identifier, np.stack(inputs), np.stack(labels)))
                builders[split].add_group(group)
            stats["tasks"] += 1
            stats["versions"] += len(versions)
    splits = {split: b.build(num_puzzle_identifiers=len(identifiers)) for split, b in builders.items()}
    write_dataset(output_dir, splits, identifiers, extra_json={"test_puzzles.json": test_puzzles}, overwrite=overwrite)
    stats.update({f"{split}_examples": s.num_examples for split, s in splits.items()})
    stats["num_puzzle_identifiers"] = len(identifiers)
    return stats


def load_test_puzzles(dataset_dir: str | os.PathLike) -> dict[str, ARCTask]:
    """test_puzzles.json of a built ARC dataset -> {task id: ARCTask}."""
    path = Path(dataset_dir) / "test_puzzles.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {dataset_dir} an ARC dataset built by `python -m puzzles.build`?")
    tasks = json.loads(path.read_text())
    return {task_id: task_from_json(task_id, obj, f"{path} [{task_id}]") for task_id, obj in tasks.items()}
