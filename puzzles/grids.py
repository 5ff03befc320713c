"""The one on-disk format shared by every grid puzzle (Sudoku, Maze, ARC), its reader/writer and common helpers.

Layout (the same as the official TRM/HRM builders, so their data folders load here and ours load there):

    <out>/identifiers.json                       # puzzle identifier -> name, "<blank>" at 0
    <out>/{train,test}/dataset.json              # PuzzleMetadata
    <out>/{train,test}/all__inputs.npy           # (num_examples, seq_len) tokens
    <out>/{train,test}/all__labels.npy           # (num_examples, seq_len) tokens
    <out>/{train,test}/all__puzzle_identifiers.npy  # (num_puzzles,) int32
    <out>/{train,test}/all__puzzle_indices.npy   # (num_puzzles + 1,) int32, example offsets of each puzzle
    <out>/{train,test}/all__group_indices.npy    # (num_groups + 1,) int32, puzzle offsets of each group

A *group* is one original puzzle with all its augmented versions, a *puzzle* is one version (one identifier),
an *example* is one (input, label) pair. Extra JSON files (ARC's test_puzzles.json) sit next to identifiers.json.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from trm_lm.core import IGNORE_INDEX  # on-disk ignore_label_id is mapped to it

# Where the offline copies of the public data sets live, relative to this checkout (`../shared/data`).
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SET_NAME = "all"  # the official format allows several sets per split; every builder uses one
ARRAY_NAMES = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
SPLITS = ("train", "test", "val")  # val: optional, for checkpoint selection
BLANK_IDENTIFIER = "<blank>"
# Folders written by the official builders carry no `task`; (vocab_size, seq_len) says which builder wrote them.
OFFICIAL_TASKS = {(11, 81): "sudoku-extreme", (6, 900): "maze", (12, 900): "arc"}


@dataclass
class PuzzleMetadata:
    """dataset.json: the official fields plus `task` and `grid_shape` (rows, cols) so a split describes itself."""

    task: str
    grid_shape: tuple[int, int]
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    pad_id: int = 0
    ignore_label_id: int = 0
    blank_identifier_id: int = 0
    sets: list[str] = field(default_factory=lambda: [SET_NAME])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["grid_shape"] = list(self.grid_shape)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "dataset.json") -> "PuzzleMetadata":
        optional = ("task", "grid_shape", "pad_id", "ignore_label_id", "blank_identifier_id", "sets")
        missing = [f.name for f in fields(cls) if f.name not in optional and f.name not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; is this a puzzle dataset (python -m puzzles.build)?")
        obj = dict(obj)
        # folders written by the official builders lack `task` and `grid_shape`: all their grids are square
        obj.setdefault("task", OFFICIAL_TASKS.get((obj["vocab_size"], obj["seq_len"]), "unknown"))
        side = math.isqrt(int(obj["seq_len"]))
        obj.setdefault("grid_shape", (side, side) if side * side == obj["seq_len"] else (1, obj["seq_len"]))
        known = {f.name for f in fields(cls)}
        meta = cls(**{k: v for k, v in obj.items() if k in known})
        meta.grid_shape = tuple(int(x) for x in meta.grid_shape)
        return meta


@dataclass
class PuzzleSplit:
    """One split in memory: numpy arrays + metadata. `validate()` checks every invariant of the format."""

    metadata: PuzzleMetadata
    inputs: np.ndarray  # (num_examples, seq_len)
    labels: np.ndarray  # (num_examples, seq_len)
    puzzle_identifiers: np.ndarray  # (num_puzzles,)
    puzzle_indices: np.ndarray  # (num_puzzles + 1,)
    group_indices: np.ndarray  # (num_groups + 1,)

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    def example_puzzle_identifiers(self) -> np.ndarray:
        """(num_examples,) identifier of the puzzle each example belongs to."""
        counts = np.diff(self.puzzle_indices)
        return np.repeat(self.puzzle_identifiers, counts)

    def validate(self, where: str = "split") -> "PuzzleSplit":
        m = self.metadata
        for name in ARRAY_NAMES:
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{where}: {name} must be an integer numpy array, got {type(arr).__name__} "
                                 f"{getattr(arr, 'dtype', '')}")
        n = self.num_examples
        if self.inputs.ndim != 2 or self.inputs.shape[1] != m.seq_len:
            raise ValueError(f"{where}: inputs has shape {self.inputs.shape}, expected (N, seq_len={m.seq_len})")
        if self.labels.shape != self.inputs.shape:
            raise ValueError(f"{where}: labels shape {self.labels.shape} != inputs shape {self.inputs.shape}")
        if m.grid_shape[0] * m.grid_shape[1] != m.seq_len:
            raise ValueError(f"{where}: grid_shape {m.grid_shape} does not multiply to seq_len {m.seq_len}")
        for name in ("inputs", "labels"):
            arr = getattr(self, name)
            if n and (arr.min() < 0 or arr.max() >= m.vocab_size):
                raise ValueError(f"{where}: {name} tokens span [{arr.min()}, {arr.max()}], "
                                 f"outside [0, vocab_size={m.vocab_size})")
        for name, length in (("puzzle_identifiers", m.total_puzzles), ("puzzle_indices", m.total_puzzles + 1),
                             ("group_indices", m.total_groups + 1)):
            arr = getattr(self, name)
            if arr.shape != (length,):
                raise ValueError(f"{where}: {name} has shape {arr.shape}, expected ({length},) from dataset.json")
        for name, end in (("puzzle_indices", n), ("group_indices", m.total_puzzles)):
            arr = getattr(self, name)
            if arr[0] != 0 or arr[-1] != end or np.any(np.diff(arr) <= 0):
                raise ValueError(f"{where}: {name} must rise strictly from 0 to {end}, got {arr[:3]}...{arr[-3:]}")
        ids = self.puzzle_identifiers
        if ids.size and (ids.min() < 0 or ids.max() >= m.num_puzzle_identifiers):
            raise ValueError(f"{where}: puzzle_identifiers span [{ids.min()}, {ids.max()}], "
                             f"outside [0, num_puzzle_identifiers={m.num_puzzle_identifiers})")
        return self


class SplitBuilder:
    """Accumulates groups of puzzles (each a list of examples) and turns them into a validated PuzzleSplit."""

    def __init__(self, task: str, grid_shape: tuple[int, int], vocab_size: int, **metadata_overrides: int):
        self.task, self.grid_shape, self.vocab_size = task, tuple(grid_shape), vocab_size
        self.seq_len = self.grid_shape[0] * self.grid_shape[1]
        self.metadata_overrides = metadata_overrides  # pad_id / ignore_label_id / blank_identifier_id
        self._inputs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._identifiers: list[int] = []
        self._puzzle_indices = [0]
        self._group_indices = [0]

    def add_group(self, puzzles: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """puzzles: (identifier, inputs (k, seq_len), labels (k, seq_len)) for each version of one original puzzle."""
        if not puzzles:
            raise ValueError(f"{self.task}: a group needs at least one puzzle")
        for identifier, inputs, labels in puzzles:
            inputs, labels = np.asarray(inputs), np.asarray(labels)
            if inputs.size % self.seq_len or labels.size % self.seq_len:
                raise ValueError(f"{self.task}: puzzle {identifier} has arrays {inputs.shape} / {labels.shape}, "
                                 f"not whole examples of seq_len {self.seq_len}")
            inputs, labels = inputs.reshape(-1, self.seq_len), labels.reshape(-1, self.seq_len)
            if len(inputs) == 0 or inputs.shape != labels.shape:
                raise ValueError(f"{self.task}: puzzle {identifier} has inputs {inputs.shape} and labels {labels.shape}")
            self._inputs.append(inputs)
            self._labels.append(labels)
            self._identifiers.append(int(identifier))
            self._puzzle_indices.append(self._puzzle_indices[-1] + len(inputs))
        self._group_indices.append(len(self._identifiers))

    def build(self, num_puzzle_identifiers: int) -> PuzzleSplit:
        if not self._inputs:
            raise ValueError(f"{self.task}: no puzzles were added to this split")
        token_dtype = np.uint8 if self.vocab_size <= 256 else np.int32
        total_puzzles = len(self._identifiers)
        metadata = PuzzleMetadata(
            task=self.task, grid_shape=self.grid_shape, vocab_size=self.vocab_size, seq_len=self.seq_len,
            num_puzzle_identifiers=num_puzzle_identifiers, total_groups=len(self._group_indices) - 1,
            mean_puzzle_examples=self._puzzle_indices[-1] / total_puzzles, total_puzzles=total_puzzles,
            **self.metadata_overrides,
        )
        split = PuzzleSplit(
            metadata=metadata,
            inputs=np.concatenate(self._inputs).astype(token_dtype),
            labels=np.concatenate(self._labels).astype(token_dtype),
            puzzle_identifiers=np.asarray(self._identifiers, dtype=np.int32),
            puzzle_indices=np.asarray(self._puzzle_indices, dtype=np.int32),
            group_indices=np.asarray(self._group_indices, dtype=np.int32),
        )
        return split.validate(f"{self.task} split")


def write_dataset(out_dir: str | os.PathLike, splits: Mapping[str, PuzzleSplit], identifiers: Sequence[str],
                  extra_json: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write all splits atomically: everything goes to a temporary sibling folder that is renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if not identifiers or identifiers[0] != BLANK_IDENTIFIER:
        raise ValueError(f"identifiers must start with {BLANK_IDENTIFIER!r}, got {list(identifiers[:2])}")
    for name, split in splits.items():
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        split.validate(f"{name} split")
        if split.metadata.num_puzzle_identifiers != len(identifiers):
            raise ValueError(f"{name} split: num_puzzle_identifiers={split.metadata.num_puzzle_identifiers} "
                             f"but {len(identifiers)} identifiers were given")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the data set is an ordinary shared folder
        for name, split in splits.items():
            (tmp / name).mkdir()
            for array_name in ARRAY_NAMES:
                np.save(tmp / name / f"{SET_NAME}__{array_name}.npy", getattr(split, array_name))
            (tmp / name / "dataset.json").write_text(json.dumps(split.metadata.to_json()))
        (tmp / "identifiers.json").write_text(json.dumps(list(identifiers)))
        for file_name, obj in (extra_json or {}).items():
            (tmp / file_name).write_text(json.dumps(obj))
        if out_dir.exists():  # overwrite: move the old folder aside first so a crash never leaves a half dataset
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "data")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_identifiers(dataset_dir: str | os.PathLike) -> list[str]:
    path = Path(dataset_dir) / "identifiers.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build the dataset with `python -m puzzles.build`")
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not names or names[0] != BLANK_IDENTIFIER:
        raise ValueError(f"{path}: expected a JSON list starting with {BLANK_IDENTIFIER!r}")
    return names


def load_split(dataset_dir: str | os.PathLike, split: str, mmap: bool = False) -> PuzzleSplit:
    """Read and validate `<dataset_dir>/<split>`; `mmap=True` memory-maps the token arrays (large ARC builds)."""
    split_dir = Path(dataset_dir) / split
    meta_path = split_dir / "dataset.json"
    paths = {name: split_dir / f"{SET_NAME}__{name}.npy" for name in ARRAY_NAMES}
    missing = [str(p) for p in [meta_path, *paths.values()] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{split_dir}: missing {missing}; build the dataset with `python -m puzzles.build`")
    metadata = PuzzleMetadata.from_json(json.loads(meta_path.read_text()), where=str(meta_path))
    arrays = {name: np.load(path, mmap_mode="r" if mmap and name in ("inputs", "labels") else None)
              for name, path in paths.items()}
    # The official Sudoku and Maze builders write total_puzzles = total_groups, also when each group holds
    # several augmented puzzles (their loader only uses it to weight mean_puzzle_examples across folders):
    # the arrays are right, so count the puzzles from them. Any other disagreement is still an error.
    num_puzzles = arrays["puzzle_identifiers"].shape[0]
    if metadata.total_puzzles == metadata.total_groups != num_puzzles:
        metadata.total_puzzles = num_puzzles
    return PuzzleSplit(metadata=metadata, **arrays).validate(str(split_dir))


class PuzzleExampleDataset(torch.utils.data.Dataset):
    """Map-style dataset over the examples of one split, ready for a DataLoader with the default collate.

    Each item: inputs (seq_len,) long, labels (seq_len,) long with ignore_label_id -> -100, puzzle_identifiers () long.
    """

    def __init__(self, split: PuzzleSplit):
        self.split = split
        self.example_identifiers = split.example_puzzle_identifiers()
        self.ignore_label_id = split.metadata.ignore_label_id

    @classmethod
    def from_dir(cls, dataset_dir: str | os.PathLike, split: str) -> "PuzzleExampleDataset":
        return cls(load_split(dataset_dir, split))

    def __len__(self) -> int:
        return self.split.num_examples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs = torch.from_numpy(np.asarray(self.split.inputs[index], dtype=np.int64))
        labels = torch.from_numpy(np.asarray(self.split.labels[index], dtype=np.int64))
        labels = labels.masked_fill(labels == self.ignore_label_id, IGNORE_INDEX)
        return {"inputs": inputs, "labels": labels,
                "puzzle_identifiers": torch.tensor(int(self.example_identifiers[index]), dtype=torch.long)}


# ---- the 8 symmetries of the square (shared by Maze and ARC) -----------------------------------------------
# Numbering as in the official builders (names like "task|||t3|||..." stay compatible):
# 0 identity, 1 rot90, 2 rot180, 3 rot270 (np.rot90 = counter-clockwise), 4 left-right flip, 5 up-down flip,
# 6 transpose, 7 anti-transpose. Rotations by 90/270 are each other's inverse; every other one is its own.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def load_hrm_arrays(folder: str | os.PathLike, split: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) (N, cells) from an HRM/TRM-format folder: `<folder>/<split>/all__{inputs,labels}.npy`."""
    split_dir = Path(folder) / split
    paths = [split_dir / "all__inputs.npy", split_dir / "all__labels.npy"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what} folder {folder}: missing {missing}")
    inputs, labels = (np.load(p) for p in paths)
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise ValueError(f"{split_dir}: inputs {inputs.shape} and labels {labels.shape} must both be (N, cells)")
    return inputs, labels


def dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    """Apply symmetry `tid` to the last two axes of `grid` (works on single grids and batches)."""
    if tid in (1, 2, 3):
        return np.rot90(grid, k=tid, axes=(-2, -1))
    if tid == 4:
        return np.flip(grid, axis=-1)
    if tid == 5:
        return np.flip(grid, axis=-2)
    if tid == 6:
        return np.swapaxes(grid, -1, -2)
    if tid == 7:  # rot90 then left-right flip = reflection over the anti-diagonal
        return np.flip(np.rot90(grid, k=1, axes=(-2, -1)), axis=-1)
    if tid == 0:
        return grid
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    if not 0 <= tid < 8:
        raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")
    return dihedral_transform(grid, DIHEDRAL_INVERSE[tid])
