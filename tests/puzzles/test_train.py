"""Training grid puzzles through the shared loop (train/train_puzzles.py + puzzles/train_task.py), on tiny
datasets built from real puzzles with the puzzles builders; evaluation CLI; exact resume of the carry; a 4x4
Sudoku that a TRM clearly learns."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from puzzles import arc, maze, sudoku
from trm_lm.checkpointing import load_state_tree
from puzzles.evaluate import PuzzleScorer, arc_voter, main as evaluate_main, score_predictor
from puzzles.grids import BLANK_IDENTIFIER, PuzzleExampleDataset, SplitBuilder, load_split, write_dataset
from puzzles.model import TRMPuzzleModel
from puzzles.model import PuzzleTRMConfig
from puzzles.train_task import (AugmentedSudokuDataset, PuzzleDataArguments, PuzzleModelArguments, PuzzleTask,
                                default_config)
from trm_lm.training import TrainingArguments, parse_args

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_puzzles", REPO / "train" / "train_puzzles.py")
train_puzzles = importlib.util.module_from_spec(_spec)  # train/ is a folder of scripts, not a package
_spec.loader.exec_module(train_puzzles)
TINY = str(REPO / "train" / "configs" / "puzzle-tiny-cpu.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datasets(shared_data, tmp_path_factory):
    """Handfuls of real puzzles in the shared on-disk format: Sudoku-Extreme, Maze-Hard, ARC-AGI-1."""
    root = tmp_path_factory.mktemp("puzzle-data")
    puzzles, solutions = sudoku.load_hrm_sudoku(shared_data / "sudoku-extreme-1k-train", "train")
    write_dataset(root / "sudoku", {"train": sudoku.build_split(puzzles[:32], solutions[:32], "sudoku-extreme"),
                                    "test": sudoku.build_split(puzzles[32:40], solutions[32:40], "sudoku-extreme")},
                  [BLANK_IDENTIFIER])
    inputs, labels = maze.load_hrm_maze(shared_data / "maze-30x30-hard-1k", "train")

    def maze_split(rows):
        builder = SplitBuilder("maze", (30, 30), maze.VOCAB_SIZE)
        for i in rows:
            builder.add_group([(0, inputs[i][None], labels[i][None])])
        return builder.build(num_puzzle_identifiers=1)

    write_dataset(root / "maze", {"train": maze_split(range(4)), "test": maze_split(range(4, 6))}, [BLANK_IDENTIFIER])
    arc.build_arc(root / "arc1", data_dir=shared_data / "arc-agi-1" / "data", num_aug=2, limit=1, task_name="arc1")
    return root


def train(tmp_path, data_dir, task, *extra):
    argv = ["--config", TINY, "--task", task, "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "4", "--eval_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1",
            *extra]
    return train_puzzles.main(argv)


@pytest.mark.parametrize("task, folder, extra", [
    ("sudoku", "sudoku", ["--num_aug", "3"]),
    ("maze", "maze", ["--per_device_train_batch_size", "2", "--eval_max_examples", "2"]),
    ("arc1", "arc1", ["--per_device_train_batch_size", "4"]),
])
def test_training_smoke_per_task(tmp_path, datasets, task, folder, extra):
    result = train(tmp_path, datasets / folder, task, *extra)
    out = tmp_path / "out"
    assert result.completed_steps == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for key in ("exact_accuracy", "cell_accuracy", "exact_accuracy_step_2", "halting_mean_steps"):
        assert 0.0 <= metrics[key] <= 2.0, key
    assert {"sudoku": "blank_cell_accuracy", "maze": "valid_path_accuracy", "arc1": "ARC/pass@2"}[task] in metrics
    model = TRMPuzzleModel.from_pretrained(out)
    assert model.config.num_cells == load_split(datasets / folder, "test").metadata.seq_len
    assert (out / "README.md").is_file() and (out / "checkpoints" / "step_4").is_dir()


def test_evaluate_cli_reproduces_the_final_evaluation(tmp_path, datasets, capsys):
    train(tmp_path, datasets / "sudoku", "sudoku")
    final = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    report = evaluate_main(["--model", str(tmp_path / "out"), "--task", "sudoku", "--data_dir",
                            str(datasets / "sudoku"), "--device", "cpu", "--output", str(tmp_path / "eval.json")])
    assert report["exact_accuracy"] == final["exact_accuracy"] and report["cell_accuracy"] == final["cell_accuracy"]
    assert len(report["per_step"]) == 2 and json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 8
    common = ["--model", str(tmp_path / "out"), "--task", "sudoku", "--data_dir", str(datasets / "sudoku"), "--device", "cpu"]
    longer = evaluate_main([*common, "--supervision_steps", "3"])
    assert longer["supervision_steps"] == 3 and len(longer["per_step"]) == 3
    assert evaluate_main([*common, "--num_steps", "3"])["per_step"] == longer["per_step"]  # the old flag name
    with pytest.raises(ValueError, match="not maze"):
        evaluate_main(["--model", str(tmp_path / "out"), "--task", "maze", "--data_dir", str(datasets / "sudoku")])


def test_resume_restores_the_carry_exactly(tmp_path, datasets):
    # N_sup = 3 and a checkpoint after step 2: the slots are mid-puzzle, so a lost carry would change the run
    steps = ("--supervision_steps", "3")
    full = tmp_path / "full"
    full.mkdir()
    train(full, datasets / "sudoku", "sudoku", *steps)
    state = load_state_tree(full / "out" / "checkpoints" / "step_2", "task")  # safetensors + JSON, no pickle
    carry = state["carries"][0]
    assert carry["steps"].shape == (16,) and carry["data.inputs"].shape == (16, 81) and not carry["halted"].all()

    resumed = tmp_path / "resumed"
    (resumed / "out" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "out" / "checkpoints" / "step_2", resumed / "out" / "checkpoints" / "step_2")
    train(resumed, datasets / "sudoku", "sudoku", *steps, "--resume_from_checkpoint", "latest")
    a, b = load_file(full / "out" / "model.safetensors"), load_file(resumed / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_puzzle_embedding_has_its_own_parameter_group(datasets):
    task = PuzzleTask(PuzzleDataArguments(task="arc1", data_dir=str(datasets / "arc1"), puzzle_emb_lr=0.01,
                                          puzzle_emb_weight_decay=0.0),
                      PuzzleModelArguments(hidden_size=16, num_attention_heads=2, net_layers=1, supervision_steps=2,
                                           puzzle_emb_len=1), eval_batch_size=4)
    model = task.build_model()
    groups = task.parameter_groups(model, 0.1)
    table = groups[-1]
    assert table["params"] == [model.puzzle_emb.weight] and table["lr"] == 0.01 and table["weight_decay"] == 0.0
    others = [p for g in groups[:-1] for p in g["params"]]
    assert len(others) + 1 == len(list(model.parameters())) and all(p is not model.puzzle_emb.weight for p in others)
    assert model.puzzle_emb.num_embeddings == load_split(datasets / "arc1", "train").metadata.num_puzzle_identifiers
    with pytest.raises(ValueError, match="for Sudoku"):
        PuzzleTask(PuzzleDataArguments(task="arc1", data_dir=str(datasets / "arc1"), num_aug=2),
                   PuzzleModelArguments(), eval_batch_size=4)


def test_arc_voting_of_perfect_predictions_passes_every_task(datasets):
    data = load_split(datasets / "arc1", "test")
    oracle = lambda b: (b["labels"].clamp(min=0)[None], torch.ones(1, len(b["labels"])))  # noqa: E731  -100 -> PAD
    scorer = PuzzleScorer("arc1", 1, 1, arc_voter(datasets / "arc1", data.metadata))
    result = score_predictor(oracle, PuzzleExampleDataset(data), scorer, batch_size=3).result()
    assert result["exact_accuracy"] == 1.0 and result["arc"]["ARC/pass@1"] == result["arc"]["ARC/pass@2"] == 1.0


def test_on_the_fly_sudoku_versions_are_valid_and_reproducible(datasets):
    base = PuzzleExampleDataset(load_split(datasets / "sudoku", "train"))
    data = AugmentedSudokuDataset(base, num_aug=5, seed=0)
    assert len(data) == 6 * len(base)
    assert torch.equal(data[3]["inputs"], base[3]["inputs"])  # the stored version comes first
    item, again = data[len(base) + 3], AugmentedSudokuDataset(base, num_aug=5, seed=0)[len(base) + 3]
    assert torch.equal(item["inputs"], again["inputs"]) and not torch.equal(item["inputs"], base[3]["inputs"])
    puzzle, solution = sudoku.from_tokens(item["inputs"].numpy()), sudoku.from_tokens(item["labels"].numpy())
    assert sudoku.is_valid_solution(solution, puzzle=puzzle)


def test_trm_learns_4x4_sudoku(tmp_path):
    """A tiny TRM, 150 optimizer steps through the shared loop: far above chance on held-out 4x4 boards."""
    sudoku.build_generated(tmp_path / "s4", size=4, num_train=100, num_test=60, seed=0)
    train_puzzles.main([
        "--config", TINY, "--task", "sudoku", "--data_dir", str(tmp_path / "s4"), "--output_dir", str(tmp_path / "out"),
        "--num_aug", "100", "--mixer", "mlp", "--position_encoding", "learned", "--hidden_size", "64",
        "--net_layers", "2", "--cycles", "2", "--latent_steps", "1", "--supervision_steps", "2",
        "--per_device_train_batch_size", "64", "--learning_rate", "3e-3", "--max_train_steps", "150",
        "--eval_steps", "150", "--checkpointing_steps", "1000", "--eval_max_examples", "60", "--ema_decay", "0"])
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    # chance on a blank cell is 1/4 and a whole board (~10 blanks) ~1e-6
    assert metrics["blank_cell_accuracy"] > 0.8 and metrics["exact_accuracy"] > 0.5, metrics


def test_fine_tuning_starts_from_saved_weights_and_selects_on_the_val_split(tmp_path):
    sudoku.build_generated(tmp_path / "s4", size=4, num_train=40, num_test=10, num_val=12, seed=0)
    common = ["--config", TINY, "--task", "sudoku", "--data_dir", str(tmp_path / "s4"), "--max_train_steps", "2",
              "--checkpointing_steps", "1000", "--ema_decay", "0"]
    train_puzzles.main([*common, "--output_dir", str(tmp_path / "first"), "--eval_steps", "2"])
    # lr 0: the fine-tuned weights stay the loaded ones exactly, and the run scores the 12 val boards
    train_puzzles.main([*common, "--output_dir", str(tmp_path / "second"), "--init_from", str(tmp_path / "first"),
                        "--learning_rate", "0", "--eval_steps", "1", "--eval_split", "val",
                        "--metric_for_best_model", "halting_exact_accuracy_at_halt"])
    first, second = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "second" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    assert results["best_model"]["step"] == 1  # equal scores later are not an improvement
    report = evaluate_main(["--model", str(tmp_path / "second"), "--task", "sudoku", "--data_dir", str(tmp_path / "s4"),
                            "--split", "val", "--device", "cpu"])
    assert report["num_examples"] == 12 and report["exact_accuracy"] == results["metrics"]["exact_accuracy"]
    with pytest.raises(ValueError, match="do not fit the configured architecture"):
        train_puzzles.main([*common, "--output_dir", str(tmp_path / "third"), "--init_from", str(tmp_path / "first"),
                            "--hidden_size", "16"])


def test_task_configs_carry_the_official_settings():
    expected = {  # (mixer, T, n, lr, weight decay, puzzle-embedding lr)
        "sudoku": ("mlp", 3, 6, 1e-4, 1.0, 1e-4), "maze": ("attention", 3, 4, 1e-4, 1.0, 1e-4),
        "arc1": ("attention", 3, 4, 1e-4, 0.1, 1e-2), "arc2": ("attention", 3, 4, 1e-4, 0.1, 1e-2)}
    for task, values in expected.items():
        argv = default_config(["--task", task, "--data_dir", "somewhere"], train_puzzles.CONFIG_DIR)
        assert argv[-1].endswith(f"puzzle-{task}.yaml")
        training, data, model_args = parse_args([TrainingArguments, PuzzleDataArguments, PuzzleModelArguments], argv)
        model = PuzzleTRMConfig(**{k: v for k, v in vars(model_args).items() if v is not None})  # unset: the config's
        assert (model.mixer, model.cycles, model.latent_steps, training.learning_rate, training.weight_decay,
                data.puzzle_emb_lr) == values, task
        assert model.supervision_steps == 16 and model.intermediate_size == 1536 and model.hidden_size == 512
        assert training.ema_decay == 0.999 and data.task == task
    assert PuzzleTRMConfig().intermediate_size == 1536  # the official SwiGLU width without being told
    for path in (REPO / "train" / "configs").glob("puzzle-*.yaml"):  # every puzzle config parses
        parse_args([TrainingArguments, PuzzleDataArguments, PuzzleModelArguments], ["--config", str(path)])
