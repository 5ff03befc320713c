"""puzzles/solve.py: the Sudoku solve API and `python -m puzzles.solve`, on a tiny random 6x6 grid model.

`tiny_solver_dir` and `build_tiny_solver` (tests/helpers.py, fixtures in tests/conftest.py) are save_pretrained folders of a random
TRMPuzzleModel for 6x6 Sudoku with the puzzle_task.json training writes (variants: e.g. a halting head that
always says "halt").
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SOLVER_SHAPE as SHAPE, SOLVER_TRAINED_STEPS as TRAINED_STEPS, build_tiny_solver

from puzzles import solve
from puzzles.solve import SolveResult, board_text, load_solver, main, read_puzzle
from puzzles.sudoku import format_sudoku, from_tokens, generate_puzzle, is_valid_solution

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SOLVER = REPO_ROOT / "checkpoints" / "trm-sudoku6"


@pytest.fixture(scope="module")
def solver(tiny_solver_dir):
    return load_solver(tiny_solver_dir)


@pytest.fixture(scope="module")
def puzzle() -> np.ndarray:
    return generate_puzzle(SHAPE, np.random.default_rng(0))[0]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (the conftest fixture)."""


# ---- the API -------------------------------------------------------------------------------------------------

def test_trace_is_the_models_own_step_by_step_prediction(solver, puzzle):
    result = solver.solve(format_sudoku(puzzle), max_steps=5, halting=False)
    assert result.steps_used == 5 and result.max_steps == 5 and result.steps_saved == 0 and not result.halted
    # the same grids and halting logits as the model's batch evaluation (predict), step for step
    tokens = torch.as_tensor(puzzle.reshape(1, -1) + 1, dtype=torch.long)
    batch = {"inputs": tokens, "puzzle_identifiers": torch.zeros(1, dtype=torch.long)}
    step_preds, step_q = solver.model.predict(batch, supervision_steps=5)
    expected = from_tokens(step_preds[:, 0].numpy(), SHAPE)  # (5, 6, 6)
    previous = puzzle
    for step, grid, q in zip(result.steps, expected, step_q[:, 0].tolist()):
        assert step.grid.shape == step.changed.shape == step.confidence.shape == (6, 6)
        np.testing.assert_array_equal(step.grid, grid)
        assert step.q_halt == pytest.approx(q, abs=1e-5)
        np.testing.assert_array_equal(step.changed, grid != previous)  # step 1: against the puzzle
        assert ((step.confidence > 1 / SHAPE.vocab_size) & (step.confidence <= 1)).all()  # an argmax's probability
        previous = grid
    assert result.steps[0].changed.any() and any(s.changed.any() for s in result.steps[1:])  # the grid moves
    np.testing.assert_array_equal(result.grid, expected[-1])


def test_steps_stream_one_at_a_time_and_solve_collects_them(solver, puzzle):
    steps = solver.steps(puzzle, max_steps=2, halting=False)
    first = next(steps)
    assert first.step == 1 and [s.step for s in steps] == [2]
    assert solver.solve(puzzle).max_steps == TRAINED_STEPS  # default: the trained supervision steps


def test_halting_stops_at_the_first_step_with_q_halt_above_zero(solver, puzzle, monkeypatch):
    """Unset halt_threshold = the official rule, P(halt) > 0.5, i.e. q_halt > 0."""
    script = iter([-2.0, 0.0, 0.5, 3.0, 1.0, 1.0])  # 0 is not > 0: the rule fires at step 3
    monkeypatch.setattr(solver.model.core, "halt_logits",
                        lambda y: torch.full(y.shape[:2], next(script), dtype=torch.float32))
    result = solver.solve(puzzle, max_steps=6, halting=True)
    assert [s.q_halt for s in result.steps] == [-2.0, 0.0, 0.5]
    assert result.halted and result.steps_used == 3 and result.steps_saved == 3
    assert result.steps_description() == "3 of 6 (halted at step 3: P(halt) 0.62 > 0.5; 3 steps saved)"


def test_a_halting_head_that_always_says_halt_stops_after_one_step(tmp_path, puzzle):
    halting = load_solver(build_tiny_solver(tmp_path / "halts", halt_bias=4.0))
    result = halting.solve(puzzle, max_steps=2 * TRAINED_STEPS, halting=True)
    assert result.steps_used == 1 and result.halted and result.steps[0].q_halt == pytest.approx(4.0)
    assert result.steps_saved == 2 * TRAINED_STEPS - 1
    everything = halting.solve(puzzle, max_steps=4, halting=False)
    assert everything.steps_used == 4 and not everything.halted
    assert everything.steps_description() == "4 of 4 (halting off)"
    never = load_solver(build_tiny_solver(tmp_path / "never", halt_bias=-4.0)).solve(puzzle, halting=True)
    assert never.steps_used == TRAINED_STEPS and never.steps_description() == "3 of 3 (P(halt) > 0.5 at no step)"


def test_a_configured_halt_threshold_turns_halting_on_at_that_probability(tmp_path, puzzle, monkeypatch, capsys):
    folder = build_tiny_solver(tmp_path / "calibrated", halt_bias=0.0, halt_threshold=0.95)
    solver = load_solver(folder)
    assert solver.halts_by_default and solver.halt_threshold == 0.95
    script = iter([2.0, 2.9, 3.5, 5.0, 5.0, 5.0])  # P(halt) 0.88, 0.948, 0.971: above 0.95 only at step 3
    monkeypatch.setattr(solver.model.core, "halt_logits",
                        lambda y: torch.full(y.shape[:2], next(script), dtype=torch.float32))
    result = solver.solve(puzzle, max_steps=6)  # halting on without being asked: the config sets a threshold
    assert result.steps_used == 3 and result.halted
    assert result.steps_description() == "3 of 6 (halted at step 3: P(halt) 0.97 > 0.95; 3 steps saved)"
    assert not solver.solve(puzzle, max_steps=2, halting=False).halting
    # the CLI: 0 = off, another threshold replaces the model's (a bias of 0: P(halt) = 0.5 at every step)
    assert main(["--model", str(folder), format_sudoku(puzzle), "--halt_threshold", "0"]) == 0
    assert capsys.readouterr().out.endswith("steps: 3 of 3 (halting off)\n")
    assert main(["--model", str(folder), format_sudoku(puzzle), "--halt_threshold", "0.4"]) == 0
    assert capsys.readouterr().out.endswith("steps: 1 of 3 (halted at step 1: P(halt) 0.50 > 0.4; 2 steps saved)\n")
    assert main(["--model", str(folder), format_sudoku(puzzle)]) == 0
    assert capsys.readouterr().out.endswith("steps: 3 of 3 (P(halt) > 0.95 at no step)\n")
    assert main(["--model", str(folder), format_sudoku(puzzle), "--halt_threshold", "1.5"]) == 2
    assert "--halt_threshold must be in [0, 1]" in capsys.readouterr().err


def test_valid_and_consistent_judge_the_answer_honestly(puzzle):
    solution = generate_puzzle(SHAPE, np.random.default_rng(0))[1]
    assert is_valid_solution(solution, SHAPE, puzzle)

    def judged(grid):
        step = solve.SolveStep(1, grid, grid != puzzle, np.ones(grid.shape, np.float32), 1.0)
        return SolveResult(puzzle, SHAPE, [step], 3, True)

    assert judged(solution).valid and judged(solution).consistent and judged(solution).clue_report() == "yes"
    # a valid grid that is the solution of another puzzle: relabel digits 1 <-> 2
    relabelled = np.array([0, 2, 1, 3, 4, 5, 6], dtype=solution.dtype)[solution]
    r, c = np.argwhere((puzzle == 1) | (puzzle == 2))[0]
    result = judged(relabelled)
    assert result.valid and not result.consistent
    assert result.clue_report().startswith(f"no (overwrote {int(((puzzle == 1) | (puzzle == 2)).sum())} clue")
    assert f"row {r + 1}, column {c + 1}: {puzzle[r, c]} -> {relabelled[r, c]}" in result.clue_report()
    unfinished = solution.copy()
    unfinished[puzzle == 0] = 0
    assert not judged(unfinished).valid and judged(unfinished).consistent


@pytest.mark.parametrize("text, message", [
    ("", "the puzzle is empty"),
    ("1" * 35, "sudoku string has 35 characters; expected 16, 36 or 81"),
    ("7" + "." * 35, "bad character '7' at row 1, column 1 (1-based): expected '.', '0' or a digit 1..6"),
    ("x" + "." * 35, "bad character 'x' at row 1, column 1"),
    ("11" + "." * 34, "duplicate given 1 at row 1, column 2 (1-based): same row as row 1, column 1"),
    ("1" + "." * 5 + "1" + "." * 29, "duplicate given 1 at row 2, column 1 (1-based): same column"),
    ("." * 81, "the puzzle is a 9x9 board but the model"),
    ("." * 16, "the puzzle is a 4x4 board but the model"),
])
def test_bad_puzzles_are_named(solver, text, message):
    with pytest.raises(ValueError) as error:
        solver.parse(text)
    assert message in str(error.value)
    if "board but" in message:
        assert str(error.value).endswith("solves 6x6 Sudoku (36 characters)")


def test_grids_given_as_arrays_are_checked_too(solver, puzzle):
    with pytest.raises(ValueError, match=r"puzzle grid has shape \(4, 9\), the model solves 6x6"):
        solver.solve(puzzle.reshape(4, 9))
    clashing = puzzle.copy()
    clashing[0, :2] = 1
    with pytest.raises(ValueError, match="duplicate given 1 at row 1, column 2"):
        solver.solve(clashing)


def test_a_puzzle_may_span_lines_and_spaces(solver, puzzle):
    text = format_sudoku(puzzle)
    rows = "\n".join(" ".join(text[i:i + 6]) for i in range(0, 36, 6)) + "\n"
    np.testing.assert_array_equal(solver.parse(rows), puzzle)


@pytest.mark.parametrize("steps", [0, 7, 2.5, True, "3", float("nan")])
def test_max_steps_outside_one_to_twice_trained_is_refused(solver, puzzle, steps):
    with pytest.raises(ValueError, match=r"max_steps must be a whole number in 1\.\.6 \(the model was trained with 3"):
        solver.steps(puzzle, steps)


def test_solver_folders_that_cannot_serve_are_refused(tmp_path, tiny_solver_dir, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_solver(tmp_path / "nope")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_solver_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="only pickle weights"):
        load_solver(pickled)
    with pytest.raises(ValueError, match="holds a 'trm_lm' model, not a Sudoku solver"):
        load_solver(tiny_model_dir)
    with pytest.raises(ValueError, match="trained on 'maze' puzzles, not Sudoku"):
        load_solver(build_tiny_solver(tmp_path / "maze", task="maze"))
    with pytest.raises(ValueError, match="is not a Sudoku solver: it has 36 cells and 11 tokens"):
        load_solver(build_tiny_solver(tmp_path / "vocab", task=None, vocab_size=11))
    reshaped = build_tiny_solver(tmp_path / "reshaped")
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match="do not fit its config.json .*mis-shaped: core"):
        load_solver(reshaped)
    no_task_file = load_solver(build_tiny_solver(tmp_path / "bare", task=None))  # the config alone says 6x6
    assert no_task_file.shape == SHAPE


def test_default_solver_is_the_shipped_folder_of_the_repo(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shipped Sudoku solver .*checkpoints/trm-sudoku6 does not exist: "
                                                r"pass --puzzle_model"):
        solve.default_solver_path(tmp_path, flag="--puzzle_model")
    (tmp_path / "checkpoints" / "trm-sudoku6").mkdir(parents=True)
    assert solve.default_solver_path(tmp_path) == tmp_path / "checkpoints" / "trm-sudoku6"
    with pytest.raises(FileNotFoundError, match=r"checkpoints/trm-sudoku9 does not exist"):
        solve.default_solver_path(tmp_path, size=9)
    (tmp_path / "checkpoints" / "trm-sudoku9").mkdir(parents=True)
    assert solve.default_solver_path(tmp_path, size=9) == tmp_path / "checkpoints" / "trm-sudoku9"
    with pytest.raises(ValueError, match=r"no solver is shipped for 4x4 Sudoku .* pass --model"):
        solve.default_solver_path(tmp_path, size=4)


# ---- the CLI ---------------------------------------------------------------------------------------------------

def test_board_text_marks_cells_and_draws_boxes(puzzle):
    marked = np.zeros_like(puzzle, dtype=bool)
    marked[0, 0] = marked[5, 5] = True
    lines = board_text(puzzle, SHAPE, marked).splitlines()
    assert len(lines) == 6 + 2  # 6 rows and a line under each band of 2 rows
    assert lines[2] == lines[5] == "-------+------"
    assert lines[0].startswith("*") and lines[7].endswith("*" + (str(puzzle[5, 5]) if puzzle[5, 5] else "."))
    assert "".join(lines).count("*") == 2 and lines[0].count("|") == 1


def test_cli_prints_the_solution_and_its_verdicts(tiny_solver_dir, solver, puzzle, capsys):
    assert main(["--model", str(tiny_solver_dir), format_sudoku(puzzle)]) == 0
    out = capsys.readouterr().out
    result = solver.solve(puzzle)
    assert f"grid: {format_sudoku(result.grid)}\n" in out
    assert board_text(result.grid, SHAPE) in out
    assert f"valid: {'yes' if result.valid else 'no'}\n" in out  # random weights: an unsolved puzzle is no error
    assert f"consistent with clues: {result.clue_report()}\n" in out
    assert out.endswith("steps: 3 of 3 (halting off)\n")  # halting is opt-in (--halt)
    assert "step 1:" not in out


def test_cli_show_steps_prints_every_grid_with_its_changed_cells(tiny_solver_dir, solver, puzzle, capsys):
    assert main(["--model", str(tiny_solver_dir), "--show_steps", "--max_steps", "5", format_sudoku(puzzle)]) == 0
    out = capsys.readouterr().out
    result = solver.solve(puzzle, max_steps=5)
    blocks = out.split("\n\n")[:-1]  # one per step, then the solution
    assert len(blocks) == 5
    for step, block in zip(result.steps, blocks):
        header, *board = block.splitlines()
        assert header.startswith(f"step {step.step}: P(halt) {step.halt_probability:.3f}, "
                                 f"{int(step.changed.sum())} cell(s)")
        assert "\n".join(board) == board_text(step.grid, SHAPE, step.changed)
        assert "".join(board).count("*") == step.changed.sum()


def test_cli_halts_only_when_asked(tmp_path, puzzle, capsys):
    halting = str(build_tiny_solver(tmp_path / "halts", halt_bias=4.0))
    assert main(["--model", halting, format_sudoku(puzzle), "--max_steps", "6", "--halt"]) == 0
    assert capsys.readouterr().out.endswith("steps: 1 of 6 (halted at step 1: P(halt) 0.98 > 0.5; 5 steps saved)\n")
    assert main(["--model", halting, format_sudoku(puzzle)]) == 0
    assert capsys.readouterr().out.endswith("steps: 3 of 3 (halting off)\n")


def test_cli_reads_a_file_or_stdin(tiny_solver_dir, puzzle, tmp_path, capsys, monkeypatch):
    text = format_sudoku(puzzle)
    file = tmp_path / "board.txt"
    file.write_text("\n".join(text[i:i + 6] for i in range(0, 36, 6)) + "\n")
    assert main(["--model", str(tiny_solver_dir), str(file)]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))
    assert main(["--model", str(tiny_solver_dir), "-"]) == 0
    assert capsys.readouterr().out == from_file and "grid: " in from_file
    assert read_puzzle("-", io.StringIO("abc")) == "abc" and read_puzzle(text) == text


@pytest.mark.parametrize("args, message", [
    (["--max_steps", "9", "." * 36], "max_steps must be a whole number in 1..6"),
    (["." * 35], "sudoku string has 35 characters"),
    (["1" + "." * 6 + "1" + "." * 28], "duplicate given 1 at row 2, column 2 (1-based): same box as row 1, column 1"),
    (["boards/missing.txt"], "no such puzzle file: boards/missing.txt"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tiny_solver_dir, capsys, args, message):
    assert main(["--model", str(tiny_solver_dir), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_cli_without_a_shipped_solver_says_how_to_give_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(solve, "REPO_ROOT", tmp_path)
    assert main(["." * 36]) == 2
    assert capsys.readouterr().err == (f"error: the shipped Sudoku solver {tmp_path / 'checkpoints' / 'trm-sudoku6'} "
                                       "does not exist: pass --model with a Sudoku model folder "
                                       "(train/train_puzzles.py --task sudoku writes one)\n")
    assert main(["--model", str(tmp_path / "nope"), "." * 36]) == 2
    assert capsys.readouterr().err == f"error: model directory not found: {tmp_path / 'nope'}\n"


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~8 s on 2 cores
def test_module_entry_point_exits_2_without_a_traceback(tiny_solver_dir):
    # the real `python -m puzzles.solve`, puzzle on stdin: a contradictory board
    run = subprocess.run([sys.executable, "-m", "puzzles.solve", "--model", str(tiny_solver_dir), "-"],
                         input="33" + "." * 34, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: duplicate given 3 at row 1, column 2 (1-based): same row as row 1, column 1\n"


@pytest.mark.skipif(not SHIPPED_SOLVER.is_dir(), reason=f"the shipped solver {SHIPPED_SOLVER} is not there yet")
def test_shipped_solver_solves_fresh_boards():
    shipped = load_solver(SHIPPED_SOLVER)
    assert shipped.shape == SHAPE
    rng = np.random.default_rng(12345)
    results = [shipped.solve(generate_puzzle(SHAPE, rng)[0]) for _ in range(8)]
    assert all(1 <= r.steps_used <= shipped.trained_steps for r in results)
    assert sum(r.valid and r.consistent for r in results) >= 7  # 99.2% exact on 1,000 held-out boards
