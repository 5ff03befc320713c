"""Maze-Hard: the valid-and-optimal path checker on all real labels and on hand-made wrong paths, dihedral
augmentation, and the builder."""
import numpy as np
import pytest

from puzzles import grids, maze

# 5x7 room with one inner wall; S top-left, G bottom-right. Shortest S->G distance = 4 + 6 = 10 steps.
ROOM = ["S      ",
        "       ",
        "  ###  ",
        "       ",
        "      G"]
SHORTEST = ["Soooooo",  # right along the top, then down the right edge: 9 path cells
            "      o",
            "  ### o",
            "      o",
            "      G"]
OTHER_SHORTEST = ["S      ",  # down the left edge, then right along the bottom: also 9 cells
                  "o      ",
                  "o ###  ",
                  "o      ",
                  "ooooooG"]
DETOUR = ["S  oooo",  # connected, but steps back up: 11 path cells, a valid path that is not optimal
          "oooo  o",
          "  ### o",
          "      o",
          "      G"]
BROKEN = ["Sooo oo",  # a gap: right length, not connected
          "      o",
          "  ### o",
          "      o",
          "     oG"]
DEAD_END = ["Soooooo",  # a shortest path plus one extra marked cell hanging off it
            "o     o",
            "  ### o",
            "      o",
            "      G"]
THROUGH_WALL = ["S      ",
                "o      ",
                "oooo   ",
                "   ooo ",
                "     oG"]


def batch(*mazes):
    return np.stack([maze.maze_from_text(m) for m in mazes])


def test_checker_on_hand_made_paths():
    inputs = batch(*[ROOM] * 7)
    preds = batch(SHORTEST, OTHER_SHORTEST, DETOUR, BROKEN, DEAD_END, ROOM, THROUGH_WALL)
    assert maze.check_paths(inputs, preds).tolist() == [True, True] + [False] * 5
    # flat (B, L) tokens work too when the grid shape is given
    assert maze.check_paths(inputs.reshape(7, -1), preds.reshape(7, -1), (5, 7)).tolist()[:3] == [True, True, False]
    # a prediction that also rewrites a wall (or the goal) is wrong even if its path is right
    bad = preds[:1].copy()
    bad[0, 2, 2] = maze.OPEN
    assert not maze.check_paths(inputs[:1], bad)[0]
    assert maze.bfs_distance(inputs != maze.WALL, inputs == maze.START, inputs == maze.GOAL).tolist() == [10] * 7


def test_text_round_trip_and_errors():
    assert maze.maze_to_text(maze.maze_from_text(SHORTEST)) == SHORTEST
    with pytest.raises(ValueError, match="equal length"):
        maze.maze_from_text(["S ", "G"])
    with pytest.raises(ValueError, match=r"\['x'\]"):
        maze.maze_from_text(["Sx", "G "])


def test_all_given_labels_are_valid_and_optimal(shared_data):
    for split in ("train", "test"):
        inputs, labels = maze.load_hrm_maze(shared_data / "maze-30x30-hard-1k", split)
        assert inputs.shape == labels.shape == (1000, 900)
        assert maze.check_paths(inputs, labels).all()
        # the hard mazes have long shortest paths (HRM kept only those longer than 110)
        grids_in = inputs.reshape(-1, 30, 30)
        dist = maze.bfs_distance(grids_in != maze.WALL, grids_in == maze.START, grids_in == maze.GOAL)
        assert dist.min() > 100
        # removing one path cell from every label, or predicting the bare maze, is never correct
        cut = labels.copy()
        rows = np.arange(len(cut))
        cut[rows, np.argmax(cut == maze.PATH, axis=1)] = maze.OPEN
        assert not maze.check_paths(inputs, cut).any()
        assert not maze.check_paths(inputs, inputs).any()


def test_dihedral_augmentation_keeps_paths_optimal(shared_data):
    inputs, labels = maze.load_hrm_maze(shared_data / "maze-30x30-hard-1k", "train")
    aug_in = np.stack([v for g in inputs[:40].reshape(-1, 30, 30) for v in maze.dihedral_versions(g)])
    aug_lab = np.stack([v for g in labels[:40].reshape(-1, 30, 30) for v in maze.dihedral_versions(g)])
    assert maze.check_paths(aug_in, aug_lab).all()
    # the 8 versions of a maze are distinct, and the label of one version does not fit another version
    assert len({v.tobytes() for v in aug_in[:8]}) == 8
    assert not maze.check_paths(aug_in[1:8], np.repeat(aug_lab[:1], 7, axis=0)).any()


def test_build_maze(tmp_path, shared_data):
    source = shared_data / "maze-30x30-hard-1k"
    stats = maze.build_maze(tmp_path / "m", source_dir=source, aug=True)
    assert stats == {"train_examples": 8000, "test_examples": 1000}
    train, test = grids.load_split(tmp_path / "m", "train"), grids.load_split(tmp_path / "m", "test")
    m = train.metadata
    assert (m.vocab_size, m.seq_len, m.grid_shape, m.total_groups, m.total_puzzles) == (6, 900, (30, 30), 1000, 8000)
    assert test.metadata.total_groups == test.metadata.total_puzzles == 1000
    src_in, src_lab = maze.load_hrm_maze(source, "test")
    assert np.array_equal(test.inputs, src_in) and np.array_equal(test.labels, src_lab)
    src_train, _ = maze.load_hrm_maze(source, "train")
    assert np.array_equal(train.inputs[::8], src_train)  # identity first in each group
    assert maze.check_paths(train.inputs[:800], train.labels[:800]).all()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="all__inputs.npy"):
        maze.load_hrm_maze(tmp_path, "train")
    (tmp_path / "train").mkdir()
    grid = maze.maze_from_text(ROOM).reshape(1, -1)
    np.save(tmp_path / "train" / "all__inputs.npy", np.concatenate([grid, grid]))
    two_starts = grid.copy()
    two_starts[0, 3] = maze.START
    np.save(tmp_path / "train" / "all__inputs.npy", np.concatenate([grid, two_starts]))
    np.save(tmp_path / "train" / "all__labels.npy", np.concatenate([grid, grid]))
    with pytest.raises(ValueError, match="maze 1 has 2 start cells"):
        maze.load_hrm_maze(tmp_path, "train")
