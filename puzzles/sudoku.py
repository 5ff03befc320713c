"""Sudoku of any box shape (4x4 with 2x2 boxes, 6x6 with 2x3, 9x9 with 3x3, ...): parsing, an exact solver,
a unique-solution generator, validity-preserving augmentation and builders into the shared on-disk format.

Grids are numpy arrays (size, size) of digits with 0 = blank. Tokens (as in the official builder):
PAD 0, blank 1, digit d -> d + 1, so vocab_size = size + 2 and every cell is supervised (ignore_label_id = PAD).
"""
from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .grids import BLANK_IDENTIFIER, DEFAULT_DATA_ROOT, PuzzleSplit, SplitBuilder, load_hrm_arrays, write_dataset

PAD_TOKEN, BLANK_TOKEN = 0, 1
BLANK_CHARS = ".0"
SUDOKU_EXTREME_DIR = DEFAULT_DATA_ROOT / "sudoku-extreme-1k-train"
TDOKU_DIR = DEFAULT_DATA_ROOT / "sudoku-hard-collections-tdoku"


@dataclass(frozen=True)
class SudokuShape:
    """A board of size = box_rows * box_cols, split into boxes of box_rows x box_cols cells."""

    box_rows: int
    box_cols: int

    def __post_init__(self):
        if self.box_rows < 1 or self.box_cols < 1 or self.size > 9:
            raise ValueError(f"unsupported box shape {self.box_rows}x{self.box_cols}: boxes need >= 1 row and column "
                             f"and the board at most 9 digits (one character per digit)")

    @property
    def size(self) -> int:
        return self.box_rows * self.box_cols

    @property
    def num_cells(self) -> int:
        return self.size * self.size

    @property
    def vocab_size(self) -> int:
        return self.size + 2

    @classmethod
    def from_size(cls, size: int) -> "SudokuShape":
        """The usual boxes: the most square split with box_rows <= box_cols (4 -> 2x2, 6 -> 2x3, 9 -> 3x3)."""
        if not 1 <= size <= 9:
            raise ValueError(f"sudoku size must be in 1..9, got {size}")
        box_rows = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
        return cls(box_rows, size // box_rows)

    @classmethod
    def from_num_cells(cls, num_cells: int) -> "SudokuShape":
        size = math.isqrt(num_cells)
        if size * size != num_cells or not 1 <= size <= 9:
            raise ValueError(f"{num_cells} cells is not a square board of side 1..9 (16, 36 and 81 are)")
        return cls.from_size(size)


@functools.lru_cache(maxsize=None)
def _layout(shape: SudokuShape) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(units, peers): the rows, columns and boxes as flat cell indices, and for each cell the cells sharing a unit."""
    n = shape.size
    rows = [tuple(r * n + c for c in range(n)) for r in range(n)]
    cols = [tuple(r * n + c for r in range(n)) for c in range(n)]
    boxes = [tuple((br + r) * n + bc + c for r in range(shape.box_rows) for c in range(shape.box_cols))
             for br in range(0, n, shape.box_rows) for bc in range(0, n, shape.box_cols)]
    units = tuple(rows + cols + boxes)
    peers = tuple(tuple(sorted({p for u in units if cell in u for p in u} - {cell})) for cell in range(n * n))
    return units, peers


def _shape_of(grid: np.ndarray, shape: SudokuShape | None) -> SudokuShape:
    return shape if shape is not None else SudokuShape.from_num_cells(int(np.asarray(grid).size))


# ---- parsing and validation ------------------------------------------------------------------------------

def parse_sudoku(text: str, shape: SudokuShape | None = None) -> np.ndarray:
    """'.'/'0' = blank, '1'..'9' = givens, read row by row. Returns (size, size) int8; raises ValueError on bad input."""
    text = text.strip()
    if shape is None:
        if len(text) not in (16, 36, 81):
            raise ValueError(f"sudoku string has {len(text)} characters; expected 16, 36 or 81 "
                             f"(or pass shape=SudokuShape(...)) in {text[:90]!r}")
        shape = SudokuShape.from_num_cells(len(text))
    if len(text) != shape.num_cells:
        raise ValueError(f"sudoku string has {len(text)} characters, a {shape.size}x{shape.size} board needs "
                         f"{shape.num_cells}: {text[:90]!r}")
    digits = []
    for i, ch in enumerate(text):
        if ch in BLANK_CHARS:
            digits.append(0)
        elif ch.isdigit() and 1 <= int(ch) <= shape.size:
            digits.append(int(ch))
        else:
            raise ValueError(f"bad character {ch!r} at row {i // shape.size + 1}, column {i % shape.size + 1} "
                             f"(1-based): expected '.', '0' or a digit 1..{shape.size}")
    grid = np.asarray(digits, dtype=np.int8).reshape(shape.size, shape.size)
    validate_givens(grid, shape)
    return grid


def format_sudoku(grid: np.ndarray) -> str:
    """Inverse of parse_sudoku: one line, '.' for blanks."""
    return "".join("." if d == 0 else str(int(d)) for d in np.asarray(grid).reshape(-1))


def validate_givens(grid: np.ndarray, shape: SudokuShape | None = None) -> None:
    """Raise ValueError naming the first cell whose given repeats a digit in its row, column or box."""
    shape = _shape_of(grid, shape)
    flat = np.asarray(grid).reshape(-1)
    if flat.size != shape.num_cells:
        raise ValueError(f"grid has {flat.size} cells, a {shape.size}x{shape.size} board needs {shape.num_cells}")
    if flat.min() < 0 or flat.max() > shape.size:
        raise ValueError(f"grid values must be 0 (blank) .. {shape.size}, got range [{flat.min()}, {flat.max()}]")
    n = shape.size
    units, _ = _layout(shape)
    kinds = ["row"] * n + ["column"] * n + ["box"] * n
    for kind, unit in zip(kinds, units):
        seen: dict[int, int] = {}
        for cell in unit:
            d = int(flat[cell])
            if d == 0:
                continue
            if d in seen:
                first = seen[d]
                raise ValueError(f"duplicate given {d} at row {cell // n + 1}, column {cell % n + 1} (1-based): "
                                 f"same {kind} as row {first // n + 1}, column {first % n + 1}")
            seen[d] = cell


def is_valid_solution(solution: np.ndarray, shape: SudokuShape | None = None, puzzle: np.ndarray | None = None) -> bool:
    """True if every row/column/box holds each digit once and (if given) every given of `puzzle` is kept."""
    shape = _shape_of(solution, shape)
    flat = np.asarray(solution).reshape(-1)
    if flat.size != shape.num_cells:
        return False
    units, _ = _layout(shape)
    full = set(range(1, shape.size + 1))
    if any({int(flat[c]) for c in unit} != full for unit in units):
        return False
    if puzzle is not None:
        givens = np.asarray(puzzle).reshape(-1)
        if np.any((givens != 0) & (givens != flat)):
            return False
    return True


# ---- exact solver: bitmask candidates, naked + hidden singles, most-constrained-cell backtracking ---------
# Candidates of a cell are a bitmask, bit d-1 set = digit d still possible.

def _propagate(cand: list[int], queue: list[int], units, peers, full: int) -> bool:
    """Apply naked and hidden singles to a fixed point, in place. False on contradiction."""
    while True:
        while queue:  # naked singles: a fixed cell's digit leaves all its peers
            cell = queue.pop()
            bit = cand[cell]
            for p in peers[cell]:
                m = cand[p]
                if m & bit:
                    m ^= bit
                    if not m:
                        return False
                    cand[p] = m
                    if not m & (m - 1):
                        queue.append(p)
        for unit in units:  # hidden singles: a digit possible in exactly one open cell of a unit goes there
            once = twice = fixed = 0
            for cell in unit:
                m = cand[cell]
                if m & (m - 1):
                    twice |= once & m
                    once |= m
                else:
                    fixed |= m
            if once | fixed != full:  # some digit has no place left in this unit
                return False
            only = once & ~twice & ~fixed
            if only:
                for cell in unit:
                    hit = cand[cell] & only
                    if hit:
                        if hit & (hit - 1):  # one cell would need two digits
                            return False
                        cand[cell] = hit
                        queue.append(cell)
        if not queue:
            return True


def _search(cand: list[int], units, peers, full: int, limit: int, found: list[list[int]], rng) -> None:
    best, best_count = -1, 99
    for cell, m in enumerate(cand):
        if m & (m - 1):
            k = m.bit_count()
            if k < best_count:
                best, best_count = cell, k
                if k == 2:
                    break
    if best < 0:
        found.append(cand)
        return
    m = cand[best]
    bits = []
    while m:
        bit = m & -m
        bits.append(bit)
        m ^= bit
    if rng is not None:  # random digit order: the generator's source of random full grids
        rng.shuffle(bits)
    for bit in bits:
        trial = cand[:]
        trial[best] = bit
        if _propagate(trial, [best], units, peers, full):
            _search(trial, units, peers, full, limit, found, rng)
            if len(found) >= limit:
                return


def _solve_all(grid: np.ndarray, shape: SudokuShape | None, limit: int, rng=None, check: bool = True) -> list[np.ndarray]:
    shape = _shape_of(grid, shape)
    if check:  # the generator skips this: its grids are consistent by construction
        validate_givens(grid, shape)
    units, peers = _layout(shape)
    full = (1 << shape.size) - 1
    flat = [int(d) for d in np.asarray(grid).reshape(-1)]
    cand = [full if d == 0 else 1 << (d - 1) for d in flat]
    found: list[list[int]] = []
    if _propagate(cand, [i for i, d in enumerate(flat) if d], units, peers, full):
        _search(cand, units, peers, full, limit, found, rng)
    return [np.asarray([m.bit_length() for m in sol], dtype=np.int8).reshape(shape.size, shape.size) for sol in found]


def solve(grid: np.ndarray, shape: SudokuShape | None = None) -> np.ndarray | None:
    """One solution of `grid` (digits, 0 = blank), or None if it has none."""
    solutions = _solve_all(grid, shape, limit=1)
    return solutions[0] if solutions else None


def count_solutions(grid: np.ndarray, shape: SudokuShape | None = None, limit: int = 2) -> int:
    """Number of solutions, counting stops at `limit` (2 is enough to test uniqueness)."""
    return len(_solve_all(grid, shape, limit=limit))


def solve_unique(grid: np.ndarray, shape: SudokuShape | None = None) -> np.ndarray | None:
    """The solution if there is exactly one, else None."""
    solutions = _solve_all(grid, shape, limit=2)
    return solutions[0] if len(solutions) == 1 else None


# ---- generator ---------------------------------------------------------------------------------------------

def random_solution(shape: SudokuShape, rng: np.random.Generator) -> np.ndarray:
    """A random full grid: backtracking on the empty board, trying digits in random order (varied, though not
    exactly uniform over all grids)."""
    empty = np.zeros((shape.size, shape.size), dtype=np.int8)
    return _solve_all(empty, shape, limit=1, rng=rng)[0]


def generate_puzzle(shape: SudokuShape, rng: np.random.Generator, min_givens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle, solution) with a unique solution: remove clues in random order while the solution stays unique.

    With min_givens = 0 the result is minimal (no clue can be removed); otherwise removal stops at min_givens.
    """
    solution = random_solution(shape, rng)
    puzzle = solution.copy().reshape(-1)
    givens = shape.num_cells
    for cell in rng.permutation(shape.num_cells):
        if givens <= min_givens:
            break
        digit = puzzle[cell]
        puzzle[cell] = 0
        if len(_solve_all(puzzle, shape, limit=2, check=False)) != 1:
            puzzle[cell] = digit  # this clue is needed
        else:
            givens -= 1
    return puzzle.reshape(shape.size, shape.size), solution


# ---- validity-preserving augmentation ------------------------------------------------------------------------

@dataclass(frozen=True)
class SudokuTransform:
    """cell_source[i] = flat cell of the original grid that lands in cell i; digit_map[d] = new digit (0 -> 0)."""

    cell_source: np.ndarray  # (num_cells,)
    digit_map: np.ndarray  # (size + 1,)

    def apply(self, grids: np.ndarray, tokens: bool = False) -> np.ndarray:
        """Transform digit grids (..., size, size) or flat (..., num_cells); tokens=True for token arrays
        (token = digit + 1, PAD 0 stays PAD)."""
        grids = np.asarray(grids)
        num_cells = self.cell_source.size
        if grids.shape[-1] == num_cells:
            flat = grids
        elif grids.ndim >= 2 and grids.shape[-1] * grids.shape[-2] == num_cells:
            flat = grids.reshape(*grids.shape[:-2], num_cells)
        else:
            raise ValueError(f"grids of shape {grids.shape} do not hold {num_cells} cells in their last axes")
        table = np.concatenate([[PAD_TOKEN], self.digit_map + 1]) if tokens else self.digit_map
        return table[flat[..., self.cell_source]].astype(grids.dtype).reshape(grids.shape)


def random_transform(shape: SudokuShape, rng: np.random.Generator) -> SudokuTransform:
    """Digit permutation, band and row-in-band permutations, stack and column-in-stack permutations, and a
    transpose (only when boxes are square: transposing 2x3 boxes would give 3x2 boxes)."""
    n, br, bc = shape.size, shape.box_rows, shape.box_cols
    # rows come in n // br bands of br rows; columns in n // bc stacks of bc columns
    row_order = np.concatenate([band * br + rng.permutation(br) for band in rng.permutation(n // br)])
    col_order = np.concatenate([stack * bc + rng.permutation(bc) for stack in rng.permutation(n // bc)])
    source = row_order[:, None] * n + col_order[None, :]  # (n, n) source cell of each target cell
    if br == bc and rng.random() < 0.5:
        source = col_order[None, :] * n + row_order[:, None]  # same, read from the transposed grid
    digit_map = np.concatenate([[0], rng.permutation(np.arange(1, n + 1))])
    return SudokuTransform(cell_source=source.reshape(-1), digit_map=digit_map)


def augment(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator,
            shape: SudokuShape | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same random transform applied to a puzzle and its solution."""
    t = random_transform(_shape_of(puzzle, shape), rng)
    return t.apply(puzzle), t.apply(solution)


# ---- token encoding ---------------------------------------------------------------------------------------

def to_tokens(grids: np.ndarray) -> np.ndarray:
    """Digits (..., size, size) -> tokens (..., num_cells): blank 1, digit d -> d + 1."""
    grids = np.asarray(grids)
    return (grids.reshape(*grids.shape[:-2], -1) + 1).astype(np.uint8)


def from_tokens(tokens: np.ndarray, shape: SudokuShape | None = None) -> np.ndarray:
    """Tokens (..., num_cells) -> digits (..., size, size); PAD is read as blank."""
    tokens = np.asarray(tokens)
    shape = shape or SudokuShape.from_num_cells(tokens.shape[-1])
    return np.clip(tokens.astype(np.int16) - 1, 0, None).astype(np.int8).reshape(*tokens.shape[:-1], shape.size, shape.size)


# ---- sources ------------------------------------------------------------------------------------------------

def load_hrm_sudoku(folder: str | os.PathLike = SUDOKU_EXTREME_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(puzzles, solutions) digit grids (N, 9, 9) from an HRM-format folder (`<folder>/<split>/all__{inputs,labels}.npy`)."""
    split_dir = Path(folder) / split
    inputs, labels = load_hrm_arrays(folder, split, "HRM sudoku")
    if labels.min() < 2:
        raise ValueError(f"{split_dir}: labels contain blank/PAD tokens, so they are not full solutions")
    return from_tokens(inputs), from_tokens(labels)


def load_sudoku_csv(path: str | os.PathLike, min_rating: int | None = None) -> tuple[list[str], list[str]]:
    """(questions, answers) from a CSV with a header holding `question` and `answer` (the upstream
    sapientinc/sudoku-extreme files also hold `source` and `rating`; `min_rating` filters on the latter)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sudoku CSV {path} not found")
    questions, answers = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "question" not in header or "answer" not in header:
            raise ValueError(f"{path}: CSV header must contain 'question' and 'answer', got {header}")
        if min_rating is not None and "rating" not in header:
            raise ValueError(f"{path}: min_rating needs a 'rating' column, header is {header}")
        for row in reader:
            if min_rating is not None and int(row["rating"]) < min_rating:
                continue
            questions.append(row["question"])
            answers.append(row["answer"])
    return questions, answers


def load_sudoku_hub(hub_id: str, split: str, min_rating: int | None = None) -> tuple[list[str], list[str]]:
    """(questions, answers) of `split` ('train'/'test') of a Hub dataset in the sapientinc/sudoku-extreme layout."""
    import datasets  # imported here: only this path needs it (and network access)

    # converters: an all-digit answer column would otherwise be parsed as (overflowing) integers
    ds = datasets.load_dataset(hub_id, data_files={split: f"{split}.csv"}, split=split,
                               converters={"question": str, "answer": str})
    if "question" not in ds.column_names or "answer" not in ds.column_names:
        raise ValueError(f"{hub_id} [{split}]: expected columns 'question' and 'answer', got {ds.column_names}")
    if min_rating is not None:
        ds = ds.filter(lambda rating: rating >= min_rating, input_columns="rating")
    return list(ds["question"]), list(ds["answer"])


def load_tdoku(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Puzzle strings of a tdoku collection file: one 81-character puzzle per line, '#' comment lines, CRLF allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tdoku puzzle file {path} not found")
    puzzles = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            puzzles.append(line)
            if limit is not None and len(puzzles) >= limit:
                break
    return puzzles


def parse_pairs(questions: Sequence[str], answers: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check question/answer strings; the answer must be a valid solution that keeps every given."""
    if len(questions) != len(answers):
        raise ValueError(f"{where}: {len(questions)} questions but {len(answers)} answers")
    puzzles, solutions = [], []
    for i, (q, a) in enumerate(zip(questions, answers)):
        try:
            puzzle, solution = parse_sudoku(q), parse_sudoku(a)
        except ValueError as e:
            raise ValueError(f"{where}, row {i}: {e}") from None
        if not is_valid_solution(solution, puzzle=puzzle):
            raise ValueError(f"{where}, row {i}: the answer is not a valid solution of the question")
        puzzles.append(puzzle)
        solutions.append(solution)
    return np.stack(puzzles), np.stack(solutions)


# ---- builders into the on-disk format ----------------------------------------------------------------------

def build_split(puzzles: np.ndarray, solutions: np.ndarray, task: str, num_aug: int = 0,
                rng: np.random.Generator | None = None, shape: SudokuShape | None = None) -> PuzzleSplit:
    """One group per puzzle: the original plus `num_aug` augmented versions. All puzzles use identifier 0."""
    shape = shape or SudokuShape.from_num_cells(int(puzzles[0].size))
    if num_aug and rng is None:
        raise ValueError("num_aug > 0 needs an rng")
    builder = SplitBuilder(task, (shape.size, shape.size), shape.vocab_size)
    for puzzle, solution in zip(puzzles, solutions):
        versions = [(puzzle, solution)] + [augment(puzzle, solution, rng, shape) for _ in range(num_aug)]
        builder.add_group([(0, to_tokens(p), to_tokens(s)) for p, s in versions])
    return builder.build(num_puzzle_identifiers=1)


def solve_collection(puzzle_strings: Iterable[str], where: str,
                     exclude: set[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, dict]:
    """Parse and solve puzzles, keeping only uniquely solvable ones that are not in `exclude` (puzzle strings with
    '.' blanks, e.g. the train set) and not repeated. Returns (puzzles, solutions, counts of what was dropped)."""
    puzzles, solutions = [], []
    stats = {"read": 0, "kept": 0, "not_unique": 0, "excluded": 0, "duplicates": 0}
    seen: set[str] = set()
    for i, text in enumerate(tqdm(puzzle_strings, desc=f"solving {Path(where).name}", unit="puzzle", disable=None)):
        stats["read"] += 1
        try:
            puzzle = parse_sudoku(text)
        except ValueError as e:
            raise ValueError(f"{where}, puzzle {i}: {e}") from None
        key = format_sudoku(puzzle)
        if key in exclude:
            stats["excluded"] += 1
            continue
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        solution = solve_unique(puzzle)
        if solution is None:
            stats["not_unique"] += 1
            continue
        puzzles.append(puzzle)
        solutions.append(solution)
    stats["kept"] = len(puzzles)
    if not puzzles:
        raise ValueError(f"{where}: no uniquely solvable puzzle left ({stats})")
    return np.stack(puzzles), np.stack(solutions), stats


def build_sudoku_extreme(output_dir: str | os.PathLike, *, train_dir: str | os.PathLike | None = SUDOKU_EXTREME_DIR,
                         train_csv: str | os.PathLike | None = None, test_csv: str | os.PathLike | None = None,
                         hub_id: str | None = None, tdoku_files: Sequence[str | os.PathLike] = (),
                         limit: int | None = None, subsample: int | None = None, min_rating: int | None = None,
                         num_aug: int = 0, seed: int = 0, overwrite: bool = False) -> dict:
    """Sudoku-Extreme: train from `hub_id`, `train_csv` or an HRM-format `train_dir` (in that order of precedence);
    test from `test_csv`, else the Hub test split, else tdoku collections solved here (unique ones only, at most
    `limit` per file, puzzles present in train removed). Train gets `num_aug` augmentations per puzzle."""
    rng = np.random.default_rng(seed)
    if hub_id:
        train_p, train_s = parse_pairs(*load_sudoku_hub(hub_id, "train", min_rating), where=f"{hub_id} train")
    elif train_csv:
        train_p, train_s = parse_pairs(*load_sudoku_csv(train_csv, min_rating), where=str(train_csv))
    elif train_dir:
        train_p, train_s = load_hrm_sudoku(train_dir, "train")
    else:
        raise ValueError("sudoku-extreme needs a train source: hub_id, train_csv or train_dir")
    if subsample is not None and subsample < len(train_p):
        keep = np.sort(rng.choice(len(train_p), size=subsample, replace=False))
        train_p, train_s = train_p[keep], train_s[keep]

    stats: dict = {"train_puzzles": len(train_p)}
    if test_csv:
        test_p, test_s = parse_pairs(*load_sudoku_csv(test_csv, min_rating), where=str(test_csv))
    elif hub_id:
        test_p, test_s = parse_pairs(*load_sudoku_hub(hub_id, "test", min_rating), where=f"{hub_id} test")
    else:
        if not tdoku_files:
            raise ValueError("sudoku-extreme needs a test source: test_csv, hub_id or tdoku files")
        exclude = {format_sudoku(p) for p in train_p}  # grows with each file: the collections share some puzzles
        parts = []
        for path in tdoku_files:
            p, s, file_stats = solve_collection(load_tdoku(path, limit), where=str(path), exclude=exclude)
            exclude.update(format_sudoku(x) for x in p)
            parts.append((p, s))
            stats[Path(path).name] = file_stats
        test_p, test_s = np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])
    stats["test_puzzles"] = len(test_p)

    splits = {"train": build_split(train_p, train_s, "sudoku-extreme", num_aug, rng),
              "test": build_split(test_p, test_s, "sudoku-extreme")}
    write_dataset(output_dir, splits, [BLANK_IDENTIFIER], overwrite=overwrite)
    return stats


def generate_puzzles(shape: SudokuShape, count: int, rng: np.random.Generator, exclude: set[str] = frozenset(),
                     min_givens: int = 0, max_givens: int | None = None,
                     max_tries_factor: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct unique-solution puzzles whose puzzle and solution strings are both outside `exclude`.

    Clue removal stops at `min_givens`, or, with `max_givens`, at a count drawn uniformly from
    [min_givens, max_givens] per puzzle (a puzzle may end with more: removal also stops when it is minimal)."""
    if max_givens is not None and not 0 <= min_givens <= max_givens <= shape.num_cells:
        raise ValueError(f"need 0 <= min_givens <= max_givens <= {shape.num_cells}, got {min_givens}, {max_givens}")
    puzzles, solutions, seen = [], [], set(exclude)
    progress = tqdm(total=count, desc=f"generating {shape.size}x{shape.size} puzzles", unit="puzzle", disable=None)
    for _ in range(max_tries_factor * count):
        if len(puzzles) == count:
            break
        stop = min_givens if max_givens is None else int(rng.integers(min_givens, max_givens + 1))
        puzzle, solution = generate_puzzle(shape, rng, stop)
        keys = (format_sudoku(puzzle), format_sudoku(solution))
        if seen.intersection(keys):
            continue
        seen.update(keys)
        puzzles.append(puzzle)
        solutions.append(solution)
        progress.update()
    progress.close()
    if len(puzzles) < count:
        raise ValueError(f"could only generate {len(puzzles)} of {count} distinct {shape.size}x{shape.size} puzzles "
                         f"(the board has too few solution grids for this many)")
    return np.stack(puzzles), np.stack(solutions)


def build_generated(output_dir: str | os.PathLike, *, size: int = 6, num_train: int = 4000, num_test: int = 1000,
                    seed: int = 0, num_aug: int = 0, min_givens: int = 0, max_givens: int | None = None,
                    extra_train: tuple[np.ndarray, np.ndarray] | None = None, num_val: int = 0,
                    overwrite: bool = False) -> dict:
    """Generated NxN set: train and test drawn from independent seeds; no test puzzle or test solution occurs in
    train (verbatim). 4x4 has only 288 solution grids, so large 4x4 sets are impossible by this rule.

    `num_val` > 0 adds a "val" split of the test distribution, disjoint from both train and test, for choosing a
    checkpoint (`--eval_split val`) without looking at the test split.

    `extra_train` (puzzles, solutions), e.g. Sudoku-Extreme's training puzzles, is appended to the generated
    training puzzles only: the test set keeps the generated clue distribution."""
    shape = SudokuShape.from_size(size)
    # spawn(4)[:3] equals spawn(3): adding the val stream leaves train and test as they were.
    train_rng, test_rng, aug_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    givens = dict(min_givens=min_givens, max_givens=max_givens)
    train_p, train_s = generate_puzzles(shape, num_train, train_rng, **givens)
    if extra_train is not None:
        extra_p, extra_s = (np.asarray(a).reshape(-1, size, size) for a in extra_train)
        train_p, train_s = np.concatenate([train_p, extra_p]), np.concatenate([train_s, extra_s])
    train_keys = {format_sudoku(g) for g in np.concatenate([train_p, train_s])}
    test_p, test_s = generate_puzzles(shape, num_test, test_rng, exclude=train_keys, **givens)
    task = f"sudoku-{size}x{size}"
    splits = {"train": build_split(train_p, train_s, task, num_aug, aug_rng, shape),
              "test": build_split(test_p, test_s, task, shape=shape)}
    if num_val:
        seen = train_keys | {format_sudoku(g) for g in np.concatenate([test_p, test_s])}
        val_p, val_s = generate_puzzles(shape, num_val, val_rng, exclude=seen, **givens)
        splits["val"] = build_split(val_p, val_s, task, shape=shape)
    write_dataset(output_dir, splits, [BLANK_IDENTIFIER], overwrite=overwrite)
    givens = lambda p: (p != 0).reshape(len(p), -1).sum(1)  # noqa: E731
    return {"train_puzzles": len(train_p), "generated_train_puzzles": num_train, "test_puzzles": num_test,
            **({"val_puzzles": num_val} if num_val else {}),
            "train_mean_givens": float(givens(train_p).mean()), "test_mean_givens": float(givens(test_p).mean())}
