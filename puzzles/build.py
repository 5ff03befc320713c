"""Build a grid-puzzle data set in the shared on-disk format.

    python -m puzzles.build --task sudoku-extreme --output_dir data/sudoku-extreme [--num_aug 1000] [--limit 1000]
    python -m puzzles.build --task sudoku-gen --size 6 --num_train 4000 --num_test 1000 --output_dir data/sudoku-6x6
    python -m puzzles.build --task maze --output_dir data/maze-hard [--aug]
    python -m puzzles.build --task arc1 --output_dir data/arc1 [--num_aug 1000] [--concept_dir ConceptARC/corpus]
    python -m puzzles.build --task arc2 --output_dir data/arc2

Sources default to the offline copies in ../shared/data next to this checkout; every one can be overridden.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trm_lm.cli import HelpFormatter

from . import arc, maze, sudoku

TASKS = ("sudoku-extreme", "sudoku-gen", "maze", "arc1", "arc2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m puzzles.build", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 42 for ARC, 0 otherwise)")
    p.add_argument("--num_aug", type=int, default=None,
                   help="augmented versions per training puzzle (default: 1000 for ARC, 0 otherwise)")
    p.add_argument("--limit", type=int, default=None,
                   help="sudoku-extreme: at most N puzzles read per tdoku file; arc: first N tasks of each subset")

    g = p.add_argument_group("sudoku-extreme")
    g.add_argument("--train_dir", type=Path, default=sudoku.SUDOKU_EXTREME_DIR, help="HRM-format folder with train/")
    g.add_argument("--train_csv", "--csv", type=Path, default=None, help="CSV with question,answer[,source,rating] columns")
    g.add_argument("--test_csv", type=Path, default=None, help="test CSV in the same format")
    g.add_argument("--hub_id", default=None, help="Hub dataset in the sapientinc/sudoku-extreme layout (needs network)")
    g.add_argument("--tdoku_dir", type=Path, default=sudoku.TDOKU_DIR, help="test source when no test CSV/Hub id")
    g.add_argument("--tdoku_files", nargs="*", default=None, help="file names in tdoku_dir (default: all puzzles*.txt)")
    g.add_argument("--subsample", type=int, default=None, help="keep N random training puzzles")
    g.add_argument("--min_rating", type=int, default=None, help="CSV/Hub sources: keep rows with rating >= this")

    g = p.add_argument_group("sudoku-gen")
    g.add_argument("--size", type=int, default=6, help="board side: 4 (2x2 boxes), 6 (2x3), 9 (3x3), ...")
    g.add_argument("--num_train", type=int, default=4000)
    g.add_argument("--num_test", type=int, default=1000)
    g.add_argument("--num_val", type=int, default=0,
                   help="also write a 'val' split (test distribution, disjoint from train and test) for checkpoint "
                        "selection: train with --eval_split val")
    g.add_argument("--min_givens", type=int, default=0, help="stop removing clues at this many (0: minimal puzzles)")
    g.add_argument("--max_givens", type=int, default=None,
                   help="with it, each puzzle stops at a clue count drawn uniformly from [min_givens, max_givens]")
    g.add_argument("--add_extreme", action="store_true",
                   help="9x9: add Sudoku-Extreme's training puzzles (from --train_dir) to the generated train split")

    g = p.add_argument_group("maze")
    g.add_argument("--maze_dir", type=Path, default=maze.MAZE_DIR, help="HRM-format folder with train/ and test/")
    g.add_argument("--aug", action="store_true", help="add the 8 dihedral versions of each training maze")

    g = p.add_argument_group("arc1 / arc2")
    g.add_argument("--arc_dir", type=Path, default=None, help="folder holding training/ and evaluation/ task JSONs")
    g.add_argument("--no_translate", action="store_true", help="do not translate training examples in the canvas")
    g.add_argument("--concept_dir", type=Path, default=None,
                   help="local ConceptARC corpus (folder of task JSONs in concept subfolders): add its tasks to the "
                        "train split, as the official builds do (not in ../shared/data; see docs/puzzles.md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    is_arc = args.task in ("arc1", "arc2")
    seed = args.seed if args.seed is not None else (42 if is_arc else 0)
    num_aug = args.num_aug if args.num_aug is not None else (1000 if is_arc else 0)
    if num_aug < 0 or (args.limit is not None and args.limit < 1):
        raise SystemExit("--num_aug must be >= 0 and --limit >= 1")
    common = {"overwrite": args.overwrite}
    start = time.time()
    if args.task == "sudoku-extreme":
        if args.tdoku_files is None:
            tdoku_files = sorted(args.tdoku_dir.glob("puzzles*.txt"))
        else:
            tdoku_files = [args.tdoku_dir / name for name in args.tdoku_files]
        stats = sudoku.build_sudoku_extreme(
            args.output_dir, train_dir=args.train_dir, train_csv=args.train_csv, test_csv=args.test_csv,
            hub_id=args.hub_id, tdoku_files=tdoku_files, limit=args.limit, subsample=args.subsample,
            min_rating=args.min_rating, num_aug=num_aug, seed=seed, **common)
    elif args.task == "sudoku-gen":
        extra = None
        if args.add_extreme:
            if args.size != 9:
                raise SystemExit("--add_extreme needs --size 9 (Sudoku-Extreme is 9x9)")
            extra = sudoku.load_hrm_sudoku(args.train_dir, "train")
        stats = sudoku.build_generated(args.output_dir, size=args.size, num_train=args.num_train, num_test=args.num_test,
                                       seed=seed, num_aug=num_aug, min_givens=args.min_givens,
                                       max_givens=args.max_givens, extra_train=extra,
                                       num_val=args.num_val, **common)
    elif args.task == "maze":
        if num_aug:
            raise SystemExit("maze augmentation is the fixed 8 dihedral versions: use --aug, not --num_aug")
        stats = maze.build_maze(args.output_dir, source_dir=args.maze_dir, aug=args.aug, **common)
    else:
        data_dir = args.arc_dir or arc.ARC_DATA_DIRS[args.task]
        stats = arc.build_arc(args.output_dir, data_dir=data_dir, num_aug=num_aug, seed=seed,
                              translate=not args.no_translate, limit=args.limit, task_name=args.task,
                              concept_dir=args.concept_dir, **common)
    stats["seconds"] = round(time.time() - start, 2)
    print(json.dumps({"task": args.task, "output_dir": str(args.output_dir), **stats}, indent=2, default=str))
    return stats


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
