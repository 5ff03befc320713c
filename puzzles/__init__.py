"""Grid puzzles (Sudoku, Maze-Hard, ARC-AGI): data sets in one on-disk format, solvers, augmentations, metrics.

Build data with `python -m puzzles.build --task {sudoku-extreme,sudoku-gen,maze,arc1,arc2} --output_dir DIR`;
load it with `puzzles.grids.load_split` / `PuzzleExampleDataset`.
"""
from .grids import (DEFAULT_DATA_ROOT, PuzzleExampleDataset, PuzzleMetadata, PuzzleSplit, SplitBuilder,
                    load_identifiers, load_split, write_dataset)

__all__ = ["DEFAULT_DATA_ROOT", "PuzzleExampleDataset", "PuzzleMetadata", "PuzzleSplit", "SplitBuilder",
           "load_identifiers", "load_split", "write_dataset"]
