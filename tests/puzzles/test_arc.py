"""ARC: loading and validation of real task files, augmentations and their inverses, 30x30 encoding, builder."""
import json

import numpy as np
import pytest

from puzzles import arc, grids


def arc_dir(shared_data, version):
    return shared_data / f"arc-agi-{version}" / "data"


def test_load_real_subsets(shared_data):
    # counts from the PROVENANCE files: tasks, demonstration pairs, test pairs
    expected = {(1, "training"): (400, 1302, 416), (1, "evaluation"): (400, 1363, 419),
                (2, "training"): (1000, 3232, 1076), (2, "evaluation"): (120, 359, 167)}
    for (version, subset), counts in expected.items():
        tasks = arc.load_arc_subset(arc_dir(shared_data, version), subset)
        assert (len(tasks), sum(len(t.train) for t in tasks), sum(len(t.test) for t in tasks)) == counts
    ids = (arc_dir(shared_data, 2) / "evaluation.txt").read_text().split()
    assert sorted(ids) == [t.task_id for t in tasks]


def test_grid_validation_errors(tmp_path):
    assert arc.grid_from_json([[0, 9], [3, 4]], "g").dtype == np.uint8
    cases = [([], "non-empty list"), ([[1, 2], [3]], "not rectangular"), ([[0] * 31], "1x31"),
             ([[10]], r"cell \(0, 0\) is 10"), ([[1.0]], "is 1.0"), ([[True]], "is True"), ([[]], "1x0")]
    for grid, message in cases:
        with pytest.raises(ValueError, match=message):
            arc.grid_from_json(grid, "task t, train pair 0, input")
    path = tmp_path / "abc.json"
    path.write_text(json.dumps({"train": [{"input": [[1]], "output": [[1, 2], [3]]}], "test": []}))
    with pytest.raises(ValueError, match=r"abc.json, train pair 0, output: grid is not rectangular"):
        arc.load_arc_task(path)
    path.write_text(json.dumps({"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[1]]}]}))
    with pytest.raises(ValueError, match="test pair 0 needs 'input' and 'output'"):
        arc.load_arc_task(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        arc.load_arc_task(path)
    with pytest.raises(FileNotFoundError, match="no ARC task files"):
        arc.load_arc_subset(tmp_path, "training")


def test_augmentations_invert_on_real_grids(shared_data):
    rng = np.random.default_rng(0)
    tasks = arc.load_arc_subset(arc_dir(shared_data, 1), "training", limit=25)
    real_grids = [g for t in tasks for pair in t.train + t.test for g in pair]
    assert any(g.shape[0] != g.shape[1] for g in real_grids)
    for grid in real_grids:
        for tid in range(8):
            aug = arc.ARCAugmentation(tid, arc.ARCAugmentation.random(rng).colour_map)
            out = aug.apply(grid)
            assert out.shape == (grid.shape[::-1] if tid in (1, 3, 6, 7) else grid.shape)
            assert np.array_equal(aug.invert(out), grid)
            assert np.array_equal(out == 0, grids.dihedral_transform(grid == 0, tid))  # black stays black
            assert arc.parse_puzzle_name(aug.name("t1")) == ("t1", aug)
    # the 8 symmetries are distinct on a grid with no symmetry, and the inverse table is right
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    images = [grids.dihedral_transform(g, t) for t in range(8)]
    assert len({x.tobytes() + bytes(x.shape) for x in images}) == 8
    for t in range(8):
        assert np.array_equal(grids.inverse_dihedral_transform(grids.dihedral_transform(g, t), t), g)


def test_names_and_colour_maps():
    assert arc.parse_puzzle_name("007bbfb7") == ("007bbfb7", arc.ARCAugmentation())
    aug = arc.ARCAugmentation(3, (0, 2, 1, 3, 4, 5, 6, 7, 8, 9))
    assert aug.name("x") == "x|||t3|||0213456789"
    assert arc.ARCAugmentation().name("x") == "x"
    for bad in ("x|||t9|||0123456789", "x|||3|||0123456789", "x|||t1", "x|||t1|||1023456789", "x|||t1|||012"):
        with pytest.raises(ValueError):
            arc.parse_puzzle_name(bad)


def test_encode_decode(shared_data):
    grid = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.uint8)
    canvas = arc.encode_grid(grid, offset=(1, 2)).reshape(30, 30)
    assert np.array_equal(canvas[1:3, 2:5], grid + 2)
    assert (canvas[3, 2:5] == arc.EOS).all() and (canvas[1:3, 5] == arc.EOS).all()  # EOS below and right
    assert canvas[3, 5] == arc.PAD and (canvas == arc.EOS).sum() == 5 and (canvas > arc.EOS).sum() == 6
    full = np.full((30, 30), 7, dtype=np.uint8)
    assert (arc.encode_grid(full) == 9).all()  # no room for EOS: none written
    assert np.array_equal(arc.decode_grid(arc.encode_grid(full)), full)
    assert arc.decode_grid(np.zeros(900, dtype=np.uint8)).shape == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        arc.encode_grid(grid, offset=(29, 0))
    for task in arc.load_arc_subset(arc_dir(shared_data, 2), "evaluation"):
        for pair in task.train + task.test:
            for g in pair:
                assert np.array_equal(arc.decode_grid(arc.encode_grid(g)), g)


def test_task_versions_reject_duplicates():
    rng = np.random.default_rng(0)
    blank = arc.ARCTask("blank", [(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))],
                        [(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))])
    assert len(arc.task_versions(blank, 10, rng)) == 1  # every augmentation of an all-black square is itself
    one_colour = arc.ARCTask("one", [(np.array([[0, 5]], np.uint8), np.array([[5, 0]], np.uint8))], blank.test)
    versions = arc.task_versions(one_colour, 200, rng)
    # colour 5 can become any of 9 colours; flips/rotations of a 1x2 row give 4 distinct layouts -> at most 36
    assert 9 < len(versions) <= 36
    assert len({arc.pairs_hash([(v.apply(i), v.apply(o)) for i, o in one_colour.train]) for v in versions}) == len(versions)


def test_build_arc_smoke(tmp_path, shared_data):
    data_dir = arc_dir(shared_data, 1)
    stats = arc.build_arc(tmp_path / "a", data_dir=data_dir, num_aug=5, seed=1, limit=3, task_name="arc1")
    out = tmp_path / "a"
    train, test = grids.load_split(out, "train"), grids.load_split(out, "test")
    names = grids.load_identifiers(out)
    assert (train.metadata.vocab_size, train.metadata.seq_len, train.metadata.grid_shape) == (12, 900, (30, 30))
    assert len(names) == len(set(names)) == stats["num_puzzle_identifiers"] == stats["versions"] + 1
    assert train.metadata.total_groups == 6 and test.metadata.total_groups == 3  # 3 training + 3 evaluation tasks
    training = arc.load_arc_subset(data_dir, "training", limit=3)
    evaluation = arc.load_arc_subset(data_dir, "evaluation", limit=3)
    expected_train = sum((len(t.train) + len(t.test)) * 6 for t in training) + sum(len(t.train) * 6 for t in evaluation)
    assert train.num_examples == expected_train and test.num_examples == sum(len(t.test) * 6 for t in evaluation)

    # test split: untranslated; decoding + inverting each version's augmentation gives the original test pairs
    originals = arc.load_test_puzzles(out)
    assert sorted(originals) == sorted(t.task_id for t in evaluation)
    ids = test.example_puzzle_identifiers()
    for row in range(test.num_examples):
        task_id, aug = arc.parse_puzzle_name(names[ids[row]])
        pairs = originals[task_id].test
        restored = (aug.invert(arc.decode_grid(test.inputs[row])), aug.invert(arc.decode_grid(test.labels[row])))
        assert any(np.array_equal(restored[0], i) and np.array_equal(restored[1], o) for i, o in pairs)
    # evaluation-task versions share their identifier between the demonstrations (train) and test pairs (test)
    assert set(test.puzzle_identifiers) <= set(train.puzzle_identifiers)

    # train split: translated, except one example per version kept at the origin; the colours are all there
    train_ids = train.example_puzzle_identifiers()
    at_origin = np.zeros(train.metadata.total_puzzles, dtype=int)
    for row in range(train.num_examples):
        puzzle = np.searchsorted(train.puzzle_indices, row, side="right") - 1
        canvas = train.inputs[row].reshape(30, 30)
        colour_rows, colour_cols = np.nonzero(canvas >= arc.COLOUR_OFFSET)
        top_left = (colour_rows.min(), colour_cols.min())
        at_origin[puzzle] += top_left == (0, 0)
        task_id, aug = arc.parse_puzzle_name(names[train_ids[row]])
        inp = canvas[top_left[0]:colour_rows.max() + 1, top_left[1]:colour_cols.max() + 1] - arc.COLOUR_OFFSET
        task = next(t for t in training + evaluation if t.task_id == task_id)
        assert any(np.array_equal(aug.invert(inp), i) for i, _ in task.train + task.test)
    assert (at_origin >= 1).all() and at_origin.sum() < train.num_examples
    # PAD cells of the labels are ignored by the torch dataset, EOS cells are supervised
    item = grids.PuzzleExampleDataset(test)[0]
    assert (item["labels"] == -100).sum() == (test.labels[0] == arc.PAD).sum()
    assert (item["labels"] == arc.EOS).any()

    # seeded: the same seed gives the same data
    arc.build_arc(tmp_path / "b", data_dir=data_dir, num_aug=5, seed=1, limit=3)
    assert np.array_equal(grids.load_split(tmp_path / "b", "train").inputs, train.inputs)
    with pytest.raises(ValueError, match="test_subset"):
        arc.build_arc(tmp_path / "c", data_dir=data_dir, subsets=("training",), test_subset="evaluation")
