"""Train a Tiny Recursive Model on grid puzzles (Sudoku, Maze-Hard, ARC-AGI-1/2) with the shared loop.

    python -m puzzles.build --task sudoku-extreme --output_dir data/sudoku-extreme --num_aug 1000
    accelerate launch train/train_puzzles.py --task sudoku --data_dir data/sudoku-extreme
    accelerate launch --multi_gpu --num_processes 4 train/train_puzzles.py --task arc1 --data_dir data/arc1
    python train/train_puzzles.py --task sudoku --data_dir DIR --config train/configs/puzzle-tiny-cpu.yaml
    python train/train_puzzles.py ... --resume_from_checkpoint latest     # continue an interrupted run

Without --config, the official per-task settings in train/configs/puzzle-<task>.yaml are used (Sudoku:
TRM-MLP, T=3, n=6; Maze/ARC: TRM-Att, T=3, n=4; see those files); flags on the command line override
the config. Flags: trm_lm.training.TrainingArguments + puzzles.train_task.Puzzle{Data,Model}Arguments.
How one optimizer step = one supervision step on a persistent carry works: puzzles/train_task.py.
The final model (EMA weights when --ema_decay > 0) is saved with save_pretrained; evaluate it again with
`python -m puzzles.evaluate --model OUTPUT_DIR --task TASK --data_dir DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from puzzles.train_task import PuzzleDataArguments, PuzzleModelArguments, PuzzleTask  # noqa: E402
from trm_lm.training import TrainingArguments, parse_args, run_training  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def default_config(argv: list[str]) -> list[str]:
    """Append `--config train/configs/puzzle-<task>.yaml` when the command line names a --task but no --config."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--task")
    known, _ = pre.parse_known_args(argv)
    if known.config or not known.task:
        return argv
    path = CONFIG_DIR / f"puzzle-{known.task}.yaml"
    if not path.is_file():
        raise ValueError(f"no default config for --task {known.task!r} ({path} is missing); pass --config")
    return [*argv, "--config", str(path)]


def main(argv: list[str] | None = None):
    argv = default_config(sys.argv[1:] if argv is None else list(argv))
    training_args, data_args, model_args = parse_args([TrainingArguments, PuzzleDataArguments, PuzzleModelArguments],
                                                      argv)
    training_args.validate()
    task = PuzzleTask(data_args, model_args, training_args.per_device_eval_batch_size, seed=training_args.seed)
    return run_training(training_args, task)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
