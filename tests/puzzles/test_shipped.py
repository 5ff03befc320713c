"""The shipped Sudoku solvers, checkpoints/trm-sudoku6 and checkpoints/trm-sudoku9: save_pretrained folders
(safetensors + config) that load with from_pretrained / AutoModel and solve held-out generated boards."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from puzzles import solve, sudoku
from puzzles.model import TRMPuzzleModel, write_remote_code

REPO = Path(__file__).resolve().parents[2]
# How each solver's held-out boards are built (`python -m puzzles.build --task sudoku-gen`, default seed 0; the
# commands are in the folders' README.md) and how many of the first 32 it must solve exactly after its trained
# steps: all for 6x6 (99.2% of 1,000), three quarters for 9x9 (76.1% of 1,000 after its 8 trained steps).
HELD_OUT = {6: ({}, 32), 9: ({"min_givens": 26, "max_givens": 40}, 24)}
# Halting at the threshold in each config (chosen on the val split): 99.2% / 93.4% of the 1,000 test boards in
# 1.68 / 3.14 steps on average; of the first 32, at least this many, in fewer steps than the trained number.
HALTING = {6: 32, 9: 28}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(HELD_OUT), ids=lambda size: f"{size}x{size}")
def shipped(request):
    size = request.param
    path = REPO / solve.SHIPPED_SOLVERS[size]
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is absent: the shipped {size}x{size} Sudoku solver is not in this checkout")
    return size, path, TRMPuzzleModel.from_pretrained(path).eval()


def test_shipped_remote_code_is_what_save_pretrained_writes_now(shipped, tmp_path):
    """The modeling files beside the weights are the package's, as `write_remote_code` writes them today."""
    _, path, _ = shipped
    write_remote_code(tmp_path)
    for written in sorted(tmp_path.glob("*.py")):
        assert (path / written.name).read_bytes() == written.read_bytes(), f"{path / written.name} is stale: re-save"


def held_out_boards(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` boards of the test split the build writes: its second of three seed streams."""
    givens, _ = HELD_OUT[size]
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(3)[1])
    return sudoku.generate_puzzles(sudoku.SudokuShape.from_size(size), count, rng, **givens)


def test_shipped_folder_is_safetensors_only_and_loads_through_auto_model(shipped):
    size, path, model = shipped
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert (model.config.num_cells, model.config.vocab_size) == (size * size, size + 2)
    auto = AutoModel.from_pretrained(path)  # `import puzzles.model` registered model_type trm_puzzle
    assert isinstance(auto, TRMPuzzleModel)
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), model.state_dict().values()))


def solved_after_trained_steps(model, size: int, puzzles: np.ndarray, solutions: np.ndarray) -> list[bool]:
    inputs = torch.from_numpy(sudoku.to_tokens(puzzles).astype(np.int64))  # (N, size^2)
    ids = torch.zeros(len(puzzles), dtype=torch.long)
    step_preds, _ = model.predict({"inputs": inputs, "puzzle_identifiers": ids})
    boards = sudoku.from_tokens(step_preds[-1].numpy(), sudoku.SudokuShape.from_size(size))  # after the trained steps
    return [np.array_equal(board, solution) for board, solution in zip(boards, solutions)]


def test_shipped_solver_solves_held_out_boards(shipped):
    size, _, model = shipped
    puzzles, solutions = held_out_boards(size, 32)
    exact = solved_after_trained_steps(model, size, puzzles, solutions)
    assert sum(exact) >= HELD_OUT[size][1], f"{sum(exact)} of 32 solved"


def test_shipped_solver_halts_by_default_at_its_calibrated_threshold(shipped):
    size, path, _ = shipped
    solver = solve.load_solver(path)
    assert solver.halts_by_default and 0.5 < solver.halt_threshold < 1
    puzzles, solutions = held_out_boards(size, 32)
    results = [solver.solve(puzzle) for puzzle in puzzles]
    solved = sum(np.array_equal(result.grid, solution) for result, solution in zip(results, solutions))
    mean_steps = np.mean([result.steps_used for result in results])
    assert solved >= HALTING[size] and mean_steps < solver.trained_steps, (solved, mean_steps)


def test_solve_picks_the_shipped_solver_of_the_puzzles_size(shipped, capsys):
    size, _, model = shipped
    puzzles, solutions = held_out_boards(size, 32)
    first = solved_after_trained_steps(model, size, puzzles, solutions).index(True)
    assert solve.main([sudoku.format_sudoku(puzzles[first])]) == 0  # no --model: chosen by the puzzle's length
    out = capsys.readouterr().out
    assert f"grid: {sudoku.format_sudoku(solutions[first])}" in out and "valid: yes" in out
