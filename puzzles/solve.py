"""Solve a Sudoku with a trained grid TRM and watch its recursion, step by step: the API behind
`python -m puzzles.solve` and the app's Puzzles tab (one code path for both).

    python -m puzzles.solve '........6.1..5..3......43...5.2...6.' [--model DIR] [--max_steps K] [--halt_threshold P]
    python -m puzzles.solve --show_steps '........6.1..5..3......43...5.2...6.'   # every step's grid, changes *
    python -m puzzles.solve puzzle.txt          # a file (line breaks and spaces are ignored); '-' reads stdin

    solver = load_solver("checkpoints/trm-sudoku6")
    result = solver.solve("........6.1..5..3......43...5.2...6.")
    result.grid, result.valid, result.consistent, result.steps_used, result.steps_saved
    for step in solver.steps(solver.parse(text)):    # one SolveStep per supervision step, as it is computed
        step.grid, step.changed, step.confidence, step.q_halt

The puzzle goes in as the builders encode it (puzzles/sudoku.py: blank 1, digit d -> d + 1; puzzle identifier 0,
the one identifier every Sudoku data set uses), and the model runs one supervision step per forward call on its
carried (y, z) for max_steps steps (default: the trained supervision_steps; up to TEST_TIME_DEPTH x that to think
longer). Halting (ACT) stops at the first step whose P(halt) = sigmoid(q_halt) > the threshold: the model's
config.halt_threshold, or the official 0.5 (q_halt > 0) when it sets none. A model whose config sets one halts by
default (the shipped 9x9: 0.95, chosen on its validation boards: 92.2% exact there vs 85.7% at 0.5 and 76.2%
after all 8 steps); one that sets none runs every step unless asked (`halting=True`, `--halt`), because halting
at 0.5 costs the shipped 6x6 solver accuracy (99.2% exact after all 4 steps vs 92.6%; docs/results.md).
The answer is the model's own prediction of every cell: a clue it overwrote is reported ("consistent: no"),
never silently put back. Confidence = probability of the chosen token under the distribution the model was
trained with (softmax or stablemax, config.loss_type). Errors a user can make are ValueError / OSError with a
one-line message; the CLI prints it and exits with 2.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trm_lm.generation import TEST_TIME_DEPTH, check_model_dir, one_line, resolve_device

from .model import OFFICIAL_HALT_PROBABILITY, PuzzleTRMConfig, TRMPuzzleModel, log_stablemax
from .metrics import halt_logit
from .sudoku import (SudokuShape, format_sudoku, from_tokens, is_valid_solution, parse_sudoku, to_tokens,
                     validate_givens)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SOLVERS = {6: Path("checkpoints") / "trm-sudoku6", 9: Path("checkpoints") / "trm-sudoku9"}  # by board side
PUZZLE_IDENTIFIER = 0  # Sudoku builders put every puzzle on the blank identifier (one puzzle-embedding row)
PUZZLE_HINT = "a puzzle is 16, 36 or 81 characters, row by row, digits with '.' or '0' for blanks"


def default_solver_path(repo_root: str | Path = REPO_ROOT, flag: str = "--model", size: int = 6) -> Path:
    """The shipped solver of `size`x`size` boards (checkpoints/trm-sudoku6 or trm-sudoku9 of the repository), which
    the CLI and the app use when none is given; `flag` is the option that names another one (in the message when
    the shipped one is missing)."""
    if size not in SHIPPED_SOLVERS:
        shipped = " and ".join(f"{side}x{side}" for side in SHIPPED_SOLVERS)
        raise ValueError(f"no solver is shipped for {size}x{size} Sudoku (only {shipped}): pass {flag} with a Sudoku "
                         "model folder")
    path = Path(repo_root) / SHIPPED_SOLVERS[size]
    if not path.is_dir():
        raise FileNotFoundError(f"the shipped Sudoku solver {path} does not exist: pass {flag} with a Sudoku model "
                                "folder (train/train_puzzles.py --task sudoku writes one)")
    return path


# ---- what one solve produces ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SolveStep:
    """The answer after one supervision step; arrays are (size, size), digit 0 = the model put no digit there."""

    step: int  # 1-based
    grid: np.ndarray  # int8 digits: the argmax of every cell
    changed: np.ndarray  # bool: differs from the previous step's grid (step 1: from the puzzle)
    confidence: np.ndarray  # float32 in (0, 1]: probability of the chosen token
    q_halt: float  # halting logit: P(halt) = sigmoid(q_halt), the model's belief that the grid is already right
    halt_threshold: float = OFFICIAL_HALT_PROBABILITY  # halting on, this step halts when P(halt) > it

    @property
    def halt_probability(self) -> float:
        return 1 / (1 + math.exp(-self.q_halt)) if self.q_halt > -700 else 0.0

    @property
    def halts(self) -> bool:
        return self.q_halt > halt_logit(self.halt_threshold)


@dataclass
class SolveResult:
    puzzle: np.ndarray  # (size, size) digits, 0 = blank
    shape: SudokuShape
    steps: list[SolveStep]
    max_steps: int
    halting: bool  # whether P(halt) > threshold was allowed to stop the recursion
    halt_threshold: float = OFFICIAL_HALT_PROBABILITY

    @property
    def grid(self) -> np.ndarray:
        return self.steps[-1].grid

    @property
    def steps_used(self) -> int:
        return len(self.steps)

    @property
    def halted(self) -> bool:
        return self.halting and self.steps[-1].halts

    @property
    def steps_saved(self) -> int:
        return self.max_steps - self.steps_used

    @property
    def valid(self) -> bool:
        return is_valid_solution(self.grid, self.shape)

    @property
    def overwritten_clues(self) -> np.ndarray:
        """(size, size) bool: clue cells whose digit the model's answer does not keep."""
        return (self.puzzle != 0) & (self.grid != self.puzzle)

    @property
    def consistent(self) -> bool:
        return not self.overwritten_clues.any()

    def steps_description(self) -> str:
        """E.g. '3 of 8 (halted at step 3: P(halt) 0.97 > 0.95; 5 steps saved)'."""
        if not self.halting:
            why = "halting off"
        elif self.halted:
            why = f"halted at step {self.steps_used}: P(halt) {self.steps[-1].halt_probability:.2f} > " \
                  f"{self.halt_threshold:g}; {self.steps_saved} step{'' if self.steps_saved == 1 else 's'} saved"
        else:
            why = f"P(halt) > {self.halt_threshold:g} at no step"
        return f"{self.steps_used} of {self.max_steps} ({why})"

    def clue_report(self) -> str:
        """'yes', or 'no' and the clues that were overwritten (the first three)."""
        rows, cols = np.nonzero(self.overwritten_clues)
        if not len(rows):
            return "yes"
        cells = [f"row {r + 1}, column {c + 1}: {self.puzzle[r, c]} -> {self.grid[r, c] or '.'}"
                 for r, c in zip(rows[:3], cols[:3])]
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        return f"no (overwrote {len(rows)} clue{'' if len(rows) == 1 else 's'}: {'; '.join(cells)}{more})"


# ---- the solver -----------------------------------------------------------------------------------------------

class SudokuSolver:
    """A loaded TRMPuzzleModel that solves Sudoku of one `shape`; `name` is where it came from (for messages)."""

    def __init__(self, model: TRMPuzzleModel, shape: SudokuShape, name: str):
        self.model, self.shape, self.name = model.eval(), shape, name

    @property
    def halt_threshold(self) -> float:
        """The P(halt) at which halting stops: the model's config.halt_threshold, else the official 0.5."""
        return self.model.config.halt_probability

    @property
    def halts_by_default(self) -> bool:
        """Whether the model's config asks for halting (it sets a halt_threshold)."""
        return bool(self.model.config.halt_threshold)

    def check_halting(self, halting) -> bool:
        """None -> the model's default; else True / False."""
        return self.halts_by_default if halting is None else bool(halting)

    @property
    def trained_steps(self) -> int:
        return self.model.config.supervision_steps

    @property
    def max_allowed_steps(self) -> int:
        return TEST_TIME_DEPTH * self.trained_steps

    def check_max_steps(self, max_steps) -> int:
        """None -> the trained supervision_steps; else a whole number in 1..TEST_TIME_DEPTH x trained."""
        if max_steps is None:
            return self.trained_steps
        if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Real) or not math.isfinite(max_steps) \
                or max_steps != int(max_steps) or not 1 <= max_steps <= self.max_allowed_steps:
            raise ValueError(f"max_steps must be a whole number in 1..{self.max_allowed_steps} (the model was "
                             f"trained with {self.trained_steps} steps; up to {TEST_TIME_DEPTH}x that thinks "
                             f"longer), got {max_steps!r}")
        return int(max_steps)

    def parse(self, text: str) -> np.ndarray:
        """Puzzle text -> (size, size) digits; ValueError naming the problem (length, character, repeated clue,
        a board of another size than the model's)."""
        if not isinstance(text, str):
            raise ValueError(f"the puzzle must be text, got {type(text).__name__}")
        text = "".join(text.split())  # rows on separate lines or spaced out read the same
        if not text:
            raise ValueError(f"the puzzle is empty: {PUZZLE_HINT}")
        grid = parse_sudoku(text)
        if grid.shape != (self.shape.size, self.shape.size):
            raise ValueError(f"the puzzle is a {grid.shape[0]}x{grid.shape[1]} board but the model {self.name} "
                             f"solves {self.shape.size}x{self.shape.size} Sudoku ({self.shape.num_cells} characters)")
        return grid

    def steps(self, puzzle: np.ndarray, max_steps: int | None = None, halting: bool | None = None) -> Iterator[SolveStep]:
        """One SolveStep per supervision step, each as soon as it is computed (checks run before the first)."""
        puzzle = np.asarray(puzzle)
        if puzzle.shape != (self.shape.size, self.shape.size):
            raise ValueError(f"puzzle grid has shape {puzzle.shape}, the model solves "
                             f"{self.shape.size}x{self.shape.size}")
        validate_givens(puzzle, self.shape)  # a grid that did not come through parse()
        return self._run(puzzle, self.check_max_steps(max_steps), self.check_halting(halting))

    @torch.no_grad()
    def _run(self, puzzle: np.ndarray, max_steps: int, halting: bool) -> Iterator[SolveStep]:
        device = self.model.device
        batch = {"inputs": torch.as_tensor(to_tokens(puzzle), dtype=torch.long, device=device)[None],  # (1, L)
                 "puzzle_identifiers": torch.tensor([PUZZLE_IDENTIFIER], device=device)}  # (1,)
        carry, previous = None, puzzle
        for step in range(1, max_steps + 1):
            # supervision_steps: the model itself must not reset the carry before our last step
            out = self.model(carry, batch, supervision_steps=max_steps)
            carry = out.carry
            confidence, tokens = self.probabilities(out.logits[0]).max(-1)  # (L,), (L,)
            grid = from_tokens(tokens.cpu().numpy(), self.shape)  # PAD / blank predictions read as 0
            q_halt = float(out.q_halt_logits[0])
            current = SolveStep(step=step, grid=grid, changed=grid != previous,
                                confidence=confidence.float().cpu().numpy().reshape(grid.shape), q_halt=q_halt,
                                halt_threshold=self.halt_threshold)
            yield current
            if halting and current.halts:
                return
            previous = grid

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(L, V) logits -> probabilities under the loss the model was trained with."""
        if self.model.config.loss_type == "stablemax":
            return log_stablemax(logits.double()).exp().float()
        return torch.softmax(logits.float(), dim=-1)

    def solve(self, puzzle: str | np.ndarray, max_steps: int | None = None, halting: bool | None = None) -> SolveResult:
        grid = self.parse(puzzle) if isinstance(puzzle, str) else np.asarray(puzzle)
        return self.result(grid, list(self.steps(grid, max_steps, halting)), max_steps, halting)

    def result(self, puzzle: np.ndarray, steps: list[SolveStep], max_steps: int | None = None,
               halting: bool | None = None) -> SolveResult:
        """The SolveResult of steps already run (e.g. one at a time by a caller that shows each)."""
        return SolveResult(puzzle, self.shape, steps, self.check_max_steps(max_steps), self.check_halting(halting),
                           self.halt_threshold)


def sudoku_shape(config: PuzzleTRMConfig, path: Path) -> SudokuShape:
    """The board a grid model solves; ValueError if it is not a Sudoku model (training's puzzle_task.json says
    which task it learnt; without it, the cells and vocabulary must fit a Sudoku: size^2 cells, size + 2 tokens)."""
    task_file = path / "puzzle_task.json"
    if task_file.is_file():
        try:
            task = json.loads(task_file.read_text()).get("task")
        except (ValueError, AttributeError, UnicodeDecodeError) as error:
            raise ValueError(f"{task_file} is not valid JSON with a 'task': {one_line(error)}") from error
        if task != "sudoku":
            raise ValueError(f"{path} was trained on {task!r} puzzles, not Sudoku (its puzzle_task.json says so)")
    size = math.isqrt(config.num_cells)
    if size * size != config.num_cells or not 1 <= size <= 9 or config.vocab_size != size + 2:
        raise ValueError(f"{path} is not a Sudoku solver: it has {config.num_cells} cells and {config.vocab_size} "
                         "tokens, a Sudoku model has size x size cells and size + 2 tokens (36 and 8 for 6x6)")
    return SudokuShape.from_size(size)


def load_solver(path: str | Path, device: str = "cpu") -> SudokuSolver:
    """Load a Sudoku TRMPuzzleModel folder (save_pretrained; safetensors only). FileNotFoundError / ValueError /
    OSError with a one-line message when the folder is missing, broken, or not a Sudoku solver."""
    path = check_model_dir(path)  # exists, config.json, valid safetensors (pickle refused)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}/config.json is not a valid JSON config: {one_line(error)}") from error
    if model_type != PuzzleTRMConfig.model_type:
        raise ValueError(f"{path} holds a {model_type!r} model, not a Sudoku solver (a {PuzzleTRMConfig.model_type!r} "
                         "grid model: train/train_puzzles.py --task sudoku)")
    torch_device = resolve_device(device)
    try:
        config = PuzzleTRMConfig.from_pretrained(path)
        shape = sudoku_shape(config, path)
        # mismatched shapes are reported below by name (transformers' own error points at a log we silence)
        model, loading = TRMPuzzleModel.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                        ignore_mismatched_sizes=True, dtype=torch.float32)
    except ValueError:
        raise
    except Exception as error:  # the boundary with user-chosen files: say which folder could not be read
        raise OSError(f"could not load the solver {path}: {type(error).__name__}: {one_line(error)}") from error
    unfit = sorted(loading["missing_keys"]) + sorted(loading["unexpected_keys"]) \
        + sorted(key for key, *_ in loading["mismatched_keys"])
    if unfit:  # from_pretrained would go on with random weights there
        raise ValueError(f"the weights in {path} do not fit its config.json (missing, unexpected or mis-shaped: "
                         f"{', '.join(unfit[:3])}{', ...' if len(unfit) > 3 else ''})")
    return SudokuSolver(model.to(torch_device), shape, str(path))


# ---- the CLI --------------------------------------------------------------------------------------------------

def read_puzzle(source: str, stdin=None) -> str:
    """A CLI argument as puzzle text: '-' = stdin, an existing file = its contents, else the argument itself."""
    if source == "-":
        return (stdin or sys.stdin).read()
    path = Path(source).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system is not a file
        is_file = False
    if is_file:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the puzzle file {path}: {one_line(error)}") from error
    if re.search(r"[A-Za-z/\\]", source):  # no puzzle has letters or slashes: this was meant as a file
        raise FileNotFoundError(f"no such puzzle file: {source} ({PUZZLE_HINT})")
    return source


def board_text(grid: np.ndarray, shape: SudokuShape, marked: np.ndarray | None = None) -> str:
    """The grid as text with box lines; a cell in `marked` gets a '*' before its digit, '.' = no digit."""
    lines = []
    for r, row in enumerate(np.asarray(grid)):
        cells = []
        for c, digit in enumerate(row):
            if c and c % shape.box_cols == 0:
                cells.append(" |")
            cells.append(("*" if marked is not None and marked[r, c] else " ") + (str(digit) if digit else "."))
        line = "".join(cells)
        if r and r % shape.box_rows == 0:
            lines.append(re.sub(r"[^|]", "-", line).replace("|", "+"))
        lines.append(line)
    return "\n".join(lines)


def report(result: SolveResult, show_steps: bool = False) -> str:
    """What the CLI prints for one solve."""
    lines = []
    if show_steps:
        for step in result.steps:
            lines += [f"step {step.step}: P(halt) {step.halt_probability:.3f}, {int(step.changed.sum())} cell(s) changed (*), "
                      f"mean confidence {float(step.confidence.mean()):.3f}", board_text(step.grid, result.shape,
                                                                                          step.changed), ""]
    lines += ["solution:", board_text(result.grid, result.shape), f"grid: {format_sudoku(result.grid)}",
              f"valid: {'yes' if result.valid else 'no'}", f"consistent with clues: {result.clue_report()}",
              f"steps: {result.steps_description()}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m puzzles.solve", description=__doc__.split("\n\n")[0])
    p.add_argument("puzzle", help=f"the puzzle ({PUZZLE_HINT}), a file holding it, or '-' to read stdin")
    p.add_argument("--model", default=None, help="Sudoku model folder (default: the shipped solver of the puzzle's "
                   f"size, {SHIPPED_SOLVERS[6]} or {SHIPPED_SOLVERS[9]})")
    p.add_argument("--max_steps", type=int, default=None,
                   help=f"most supervision steps (default: the trained number; up to {TEST_TIME_DEPTH}x that)")
    p.add_argument("--halt", action="store_true",
                   help="stop at the first step whose P(halt) > the model's threshold (unset: the official 0.5); "
                        "default: on where the model's config sets a halt_threshold (the shipped 9x9)")
    p.add_argument("--halt_threshold", type=float, default=None,
                   help="halt at this P(halt) in (0, 1] instead (implies --halt); 0 = never halt, run every step")
    p.add_argument("--show_steps", action="store_true", help="print the grid after every step, changed cells *")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # no loading chatter before the answer
    hf_logging.disable_progress_bar()
    try:
        text = read_puzzle(args.puzzle)
        cells = len("".join(text.split()))  # read_puzzle gives text; parse() checks it once the solver is chosen
        solver = load_solver(args.model or default_solver_path(REPO_ROOT, size=9 if cells == 81 else 6),
                             device=args.device)
        halting = True if args.halt else None
        if args.halt_threshold is not None:
            if not 0 <= args.halt_threshold <= 1:
                raise ValueError(f"--halt_threshold must be in [0, 1] (0 = off), got {args.halt_threshold}")
            halting = args.halt_threshold > 0
            if halting:
                solver.model.config.halt_threshold = args.halt_threshold
        result = solver.solve(text, args.max_steps, halting=halting)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(report(result, args.show_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
