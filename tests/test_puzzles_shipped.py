"""The shipped 6x6 Sudoku solver, checkpoints/trm-sudoku6: a save_pretrained folder (safetensors + config) that
loads with from_pretrained / AutoModel and solves held-out generated boards exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from puzzles import sudoku
from puzzles.model import TRMPuzzleModel

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "trm-sudoku6"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def solver():
    if not (SHIPPED / "config.json").is_file():
        pytest.skip(f"{SHIPPED} is absent: the shipped 6x6 Sudoku solver is not in this checkout")
    return TRMPuzzleModel.from_pretrained(SHIPPED).eval()


def test_shipped_folder_is_safetensors_only_and_loads_through_auto_model(solver):
    assert (SHIPPED / "model.safetensors").is_file() and not list(SHIPPED.glob("*.bin"))
    assert (solver.config.num_cells, solver.config.vocab_size) == (36, 8)
    auto = AutoModel.from_pretrained(SHIPPED)  # `import puzzles.model` registered model_type trm_puzzle
    assert isinstance(auto, TRMPuzzleModel)
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), solver.state_dict().values()))


def test_shipped_solver_solves_held_out_boards(solver):
    # The first 16 boards of the held-out split that `python -m puzzles.build --task sudoku-gen --size 6` writes
    # with its default seed 0: test boards come from the second of three streams spawned from the seed.
    shape = sudoku.SudokuShape.from_size(6)
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(3)[1])
    puzzles, solutions = sudoku.generate_puzzles(shape, 16, rng)
    inputs = torch.from_numpy(sudoku.to_tokens(puzzles).astype(np.int64))  # (16, 36)
    step_preds, _ = solver.predict({"inputs": inputs, "puzzle_identifiers": torch.zeros(16, dtype=torch.long)})
    boards = sudoku.from_tokens(step_preds[-1].numpy(), shape)  # after the trained number of steps
    for puzzle, board, solution in zip(puzzles, boards, solutions):
        assert sudoku.is_valid_solution(board, shape, puzzle), sudoku.format_sudoku(puzzle)
        assert np.array_equal(board, solution)
