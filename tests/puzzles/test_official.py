"""Compatibility with the official TRM code (docs/puzzles.md): data folders in the official builders' layout
(written here from the format facts of the reference notes, no official code), the halting target of a row
without labels, the EMA leaving the puzzle-embedding table out, weight decay on every weight, ConceptARC."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_model import random_batch, tiny_config
from test_train import TINY, train_puzzles

from puzzles import arc, build, sudoku
from puzzles.grids import PuzzleExampleDataset, load_identifiers, load_split
from puzzles.model import TRMPuzzleModel
from puzzles.train_task import PuzzleDataArguments, PuzzleModelArguments, PuzzleTask

pytestmark = pytest.mark.usefixtures("one_thread")


def write_official_split(split_dir, inputs, labels, versions, vocab_size):
    """One split as the official Sudoku / Maze builders write it: every version of an original puzzle is a puzzle
    of one example with identifier 0, the versions of one original form a group, and dataset.json says
    total_puzzles = number of groups (not puzzles)."""
    split_dir.mkdir(parents=True)
    n, seq_len = inputs.shape
    arrays = {"inputs": inputs.astype(np.uint8), "labels": labels.astype(np.uint8),
              "puzzle_identifiers": np.zeros(n, np.int32), "puzzle_indices": np.arange(n + 1, dtype=np.int32),
              "group_indices": np.arange(0, n + 1, versions, dtype=np.int32)}
    for name, array in arrays.items():
        np.save(split_dir / f"all__{name}.npy", array)
    meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": vocab_size,
            "seq_len": seq_len, "num_puzzle_identifiers": 1, "total_groups": n // versions,
            "mean_puzzle_examples": 1, "total_puzzles": n // versions, "sets": ["all"]}
    (split_dir / "dataset.json").write_text(json.dumps(meta))


def write_official_sudoku(folder, groups, num_aug, seed=0):
    """9x9 boards as `build_sudoku_dataset.py --num-aug N`: tokens digit + 1 (blank 1), train augmented, test not."""
    rng, shape = np.random.default_rng(seed), sudoku.SudokuShape(3, 3)
    for split, versions in (("train", num_aug + 1), ("test", 1)):
        inputs, labels = [], []
        for _ in range(groups):
            solution = sudoku.random_solution(shape, rng)
            puzzle = np.where(rng.random(solution.shape) < 0.4, solution, 0)
            for version in range(versions):
                pair = (puzzle, solution) if version == 0 else sudoku.augment(puzzle, solution, rng, shape)
                inputs.append(pair[0].reshape(-1) + 1)
                labels.append(pair[1].reshape(-1) + 1)
        write_official_split(folder / split, np.stack(inputs), np.stack(labels), versions, vocab_size=11)
    (folder / "identifiers.json").write_text(json.dumps(["<blank>"]))


def test_official_augmented_sudoku_folder_loads_and_trains_as_it_is(tmp_path):
    folder = tmp_path / "sudoku-extreme-official"
    write_official_sudoku(folder, groups=4, num_aug=3)
    train = load_split(folder, "train")
    meta = train.metadata
    assert (meta.total_groups, meta.total_puzzles, meta.task, meta.grid_shape) == (4, 16, "sudoku-extreme", (9, 9))
    assert len(PuzzleExampleDataset(train)) == 16 and load_split(folder, "test").metadata.total_puzzles == 4

    result = train_puzzles.main(["--config", TINY, "--task", "sudoku", "--data_dir", str(folder), "--output_dir",
                                 str(tmp_path / "out"), "--max_train_steps", "2", "--eval_steps", "2",
                                 "--checkpointing_steps", "100", "--per_device_train_batch_size", "4"])
    assert result.completed_steps == 2 and np.isfinite(result.metrics["exact_accuracy"])

    # any other disagreement between dataset.json and the arrays is still refused
    meta_path = folder / "train" / "dataset.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "total_puzzles": 7}))
    with pytest.raises(ValueError, match=r"puzzle_identifiers has shape \(16,\), expected \(7,\)"):
        load_split(folder, "train")


def test_official_augmented_maze_folder_loads(tmp_path):
    """`build_maze_dataset.py --aug`: 8 dihedral versions per maze, total_puzzles = mazes (tokens 1..5 of '# SGo')."""
    tokens = np.random.default_rng(0).integers(1, 6, size=(2 * 8, 900))
    write_official_split(tmp_path / "maze" / "train", tokens, tokens, versions=8, vocab_size=6)
    train = load_split(tmp_path / "maze", "train")
    assert (train.metadata.total_puzzles, train.metadata.total_groups, train.metadata.task) == (16, 2, "maze")


def test_a_row_without_labelled_cells_is_a_right_halting_target():
    """Official: the halting target is "every labelled cell right", so a row with none (padding) counts as right."""
    torch.manual_seed(0)
    model = TRMPuzzleModel(tiny_config()).eval()
    batch = random_batch(3, seed=6)
    batch["labels"][1] = -100
    out = model(None, batch)
    assert out.is_correct.tolist() == [False, True, False]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.q_halt_logits, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(out.halt_loss, expected)


def test_ema_averages_every_weight_except_the_puzzle_embedding(tmp_path):
    sudoku.build_generated(tmp_path / "s4", size=4, num_train=32, num_test=8, seed=0)
    out = tmp_path / "out"
    train_puzzles.main(["--config", TINY, "--task", "sudoku", "--data_dir", str(tmp_path / "s4"), "--output_dir",
                        str(out), "--max_train_steps", "3", "--eval_steps", "3", "--checkpointing_steps", "3",
                        "--ema_decay", "0.9"])
    live = load_file(out / "checkpoints" / "step_3" / "model.safetensors")  # the trained weights at the last step
    ema = load_file(out / "model.safetensors")  # the saved model: the EMA copy
    assert live["puzzle_emb.weight"].abs().sum() > 0  # the table was trained, so an average would differ from it
    assert torch.equal(ema["puzzle_emb.weight"], live["puzzle_emb.weight"])
    assert not torch.equal(ema["lm_head.weight"], live["lm_head.weight"])


def test_weight_decay_reaches_every_weight_including_the_halting_bias(tmp_path):
    sudoku.build_generated(tmp_path / "s4", size=4, num_train=8, num_test=4, seed=0)
    task = PuzzleTask(PuzzleDataArguments(task="sudoku", data_dir=str(tmp_path / "s4"), puzzle_emb_weight_decay=0.5),
                      PuzzleModelArguments(hidden_size=16, num_attention_heads=2, net_layers=1, puzzle_emb_len=1),
                      eval_batch_size=4)
    model = task.build_model()
    weights, table = task.parameter_groups(model, 0.1)
    assert weights["weight_decay"] == 0.1 and table == {"params": [model.puzzle_emb.weight], "weight_decay": 0.5}
    assert any(p is model.core.halt_head.bias for p in weights["params"])
    assert len(weights["params"]) + 1 == len(list(model.parameters()))
    assert task.ema_skipped_parameters(model) == ["puzzle_emb.weight"]
    model.get_parameter(task.ema_skipped_parameters(model)[0])  # the name resolves


# ---- ConceptARC ----------------------------------------------------------------------------------------------

def write_task(path, num_train, num_test, seed):
    rng = np.random.default_rng(seed)
    pair = lambda: {"input": rng.integers(0, 10, (3, 4)).tolist(), "output": rng.integers(0, 10, (2, 2)).tolist()}  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": [pair() for _ in range(num_train)], "test": [pair() for _ in range(num_test)]}))


def test_concept_arc_tasks_join_the_train_split(tmp_path):
    data, concept = tmp_path / "arc", tmp_path / "ConceptARC" / "corpus"
    write_task(data / "training" / "aaaa0001.json", 2, 1, seed=0)
    write_task(data / "evaluation" / "eeee0001.json", 3, 1, seed=1)
    write_task(concept / "AboveBelow" / "AboveBelow1.json", 2, 3, seed=2)  # ConceptARC: 3 test inputs per task
    write_task(concept / "Center" / "Center1.json", 3, 3, seed=3)
    common = dict(data_dir=data, num_aug=2, seed=0, task_name="arc1")
    plain = arc.build_arc(tmp_path / "plain", **common)
    stats = arc.build_arc(tmp_path / "with", concept_dir=concept, **common)
    base, extended = load_split(tmp_path / "plain", "train"), load_split(tmp_path / "with", "train")

    assert stats["concept_tasks"] == 2 and extended.metadata.total_groups == base.metadata.total_groups + 2
    assert extended.num_examples == base.num_examples + 3 * (5 + 6)  # every pair of 3 versions of each task
    assert np.array_equal(extended.inputs[:base.num_examples], base.inputs)  # added after the ARC subsets
    assert np.array_equal(load_split(tmp_path / "with", "test").labels, load_split(tmp_path / "plain", "test").labels)
    names = load_identifiers(tmp_path / "with")
    assert {"AboveBelow1", "Center1"} <= set(names) and len(names) == stats["num_puzzle_identifiers"]
    assert sorted(arc.load_test_puzzles(tmp_path / "with")) == ["eeee0001"]  # concept tasks are never scored

    with pytest.raises(FileNotFoundError, match="ConceptARC"):
        build.main(["--task", "arc1", "--arc_dir", str(data), "--concept_dir", str(tmp_path / "empty"),
                    "--output_dir", str(tmp_path / "x"), "--num_aug", "0"])
