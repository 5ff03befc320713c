"""Train a Tiny Recursive Model on grid puzzles (Sudoku, Maze-Hard, ARC-AGI-1/2) with the shared loop.

    python -m puzzles.build --task sudoku-extreme --output_dir data/sudoku-extreme --num_aug 1000
    accelerate launch train/train_puzzles.py --task sudoku --data_dir data/sudoku-extreme
    accelerate launch --multi_gpu --num_processes 4 train/train_puzzles.py --task arc1 --data_dir data/arc1
    python train/train_puzzles.py --task sudoku --data_dir DIR --config train/configs/puzzle-tiny-cpu.yaml
    python train/train_puzzles.py ... --resume_from_checkpoint latest     # continue an interrupted run

Without --config, the official per-task settings in train/configs/puzzle-<task>.yaml are used (Sudoku:
TRM-MLP, T=3, n=6; Maze/ARC: TRM-Att, T=3, n=4; see those files); flags on the command line override
the config. Runs puzzles.train_task.main: flags = trm_lm.training.TrainingArguments +
puzzles.train_task.Puzzle{Data,Model}Arguments; how one optimizer step = one supervision step on a
persistent carry works is explained there.
The final model (EMA weights when --ema_decay > 0) is saved with save_pretrained; evaluate it again with
`python -m puzzles.evaluate --model OUTPUT_DIR --task TASK --data_dir DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from puzzles import train_task  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def main(argv: list[str] | None = None):
    return train_task.main(argv, config_dir=CONFIG_DIR)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
