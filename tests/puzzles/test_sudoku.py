"""Sudoku: parsing/validation, the exact solver on real Sudoku-Extreme puzzles, the generator, augmentations,
the builders, and the shared on-disk format (writer/reader/torch Dataset) they go through."""
import csv
import json
import time

import numpy as np
import pytest
import torch

from puzzles import grids, sudoku
from puzzles.sudoku import SudokuShape

EXTREME = "sudoku-extreme-1k-train"


def test_shapes():
    assert SudokuShape.from_size(4) == SudokuShape(2, 2)
    assert SudokuShape.from_size(6) == SudokuShape(2, 3)
    assert SudokuShape.from_size(9) == SudokuShape(3, 3)
    assert SudokuShape.from_size(6).vocab_size == 8
    with pytest.raises(ValueError, match="1..9"):
        SudokuShape.from_size(16)


def test_parse_format_and_errors():
    text = "1.3." "..1." "2..." "...4"
    grid = sudoku.parse_sudoku(text)
    assert grid.shape == (4, 4) and grid[0, 0] == 1 and grid[3, 3] == 4 and grid[0, 1] == 0
    assert sudoku.format_sudoku(grid) == text
    assert sudoku.format_sudoku(sudoku.parse_sudoku(text.replace(".", "0"))) == text
    with pytest.raises(ValueError, match="17 characters"):
        sudoku.parse_sudoku(text + "1")
    with pytest.raises(ValueError, match=r"bad character 'x' at row 1, column 2"):
        sudoku.parse_sudoku("1x3." + text[4:])
    with pytest.raises(ValueError, match=r"bad character '5'"):  # 5 is not a digit of a 4x4 board
        sudoku.parse_sudoku("15.." + text[4:])
    with pytest.raises(ValueError, match=r"duplicate given 1 at row 1, column 4 .* same row as row 1, column 1"):
        sudoku.parse_sudoku("1.31" + text[4:])
    with pytest.raises(ValueError, match=r"duplicate given 2 at row 4, column 1 .* same column as row 3, column 1"):
        sudoku.parse_sudoku("1.3." "..1." "2..." "2..4")
    with pytest.raises(ValueError, match=r"duplicate given 3 at row 2, column 4 .* same box as row 1, column 3"):
        sudoku.parse_sudoku("1.3." "...3" "2..." "...4")


def test_solver_small_cases():
    shape = SudokuShape(2, 2)
    empty = np.zeros((4, 4), dtype=np.int8)
    assert sudoku.count_solutions(empty, limit=2) == 2
    assert sudoku.count_solutions(empty, limit=1000) == 288  # the known number of 4x4 grids
    assert sudoku.solve_unique(empty) is None
    # valid givens, no solution: row 1 needs 3 and 4 in columns 3-4, but column 3 already holds 3 and 4
    unsolvable = sudoku.parse_sudoku("12.." "..3." "..4." "....")
    assert sudoku.solve(unsolvable) is None and sudoku.count_solutions(unsolvable) == 0
    solution = sudoku.solve(sudoku.parse_sudoku("1..." "..1." ".3.." "...4"), shape)
    assert sudoku.is_valid_solution(solution, shape)


def test_solver_on_all_sudoku_extreme_train(shared_data):
    puzzles, solutions = sudoku.load_hrm_sudoku(shared_data / EXTREME, "train")
    assert puzzles.shape == (1000, 9, 9)
    # the decoded CSV copy holds the same puzzles
    with open(shared_data / EXTREME / "train_decoded.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["question"] for r in rows] == [sudoku.format_sudoku(p) for p in puzzles]
    assert [r["answer"] for r in rows] == [sudoku.format_sudoku(s) for s in solutions]

    start = time.perf_counter()
    for i, (puzzle, answer) in enumerate(zip(puzzles, solutions)):
        solved = sudoku.solve(puzzle)
        assert solved is not None and np.array_equal(solved, answer), f"puzzle {i} solved wrongly"
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"1,000 Sudoku-Extreme solves took {elapsed:.1f}s (about 4s expected on one core)"
    for puzzle in puzzles[:150]:  # the published puzzles have unique solutions
        assert sudoku.count_solutions(puzzle, limit=2) == 1


@pytest.mark.parametrize("size,count", [(4, 20), (6, 20), (9, 3)])
def test_generator_unique_and_seeded(size, count):
    shape = SudokuShape.from_size(size)
    rng = np.random.default_rng(123)
    for _ in range(count):
        puzzle, solution = sudoku.generate_puzzle(shape, rng)
        assert sudoku.is_valid_solution(solution, shape, puzzle=puzzle)
        assert sudoku.count_solutions(puzzle, shape, limit=2) == 1
        # minimal: every remaining clue is needed
        cell = np.flatnonzero(puzzle.reshape(-1))[0]
        weaker = puzzle.reshape(-1).copy()
        weaker[cell] = 0
        assert sudoku.count_solutions(weaker, shape, limit=2) == 2
    a = sudoku.generate_puzzle(shape, np.random.default_rng(7))
    b = sudoku.generate_puzzle(shape, np.random.default_rng(7))
    c = sudoku.generate_puzzle(shape, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], c[1])


def test_min_givens_stops_removal():
    shape = SudokuShape.from_size(6)
    puzzle, _ = sudoku.generate_puzzle(shape, np.random.default_rng(0), min_givens=20)
    assert (puzzle != 0).sum() == 20


@pytest.mark.parametrize("size", [4, 6, 9])
def test_augmentation_keeps_validity_and_uniqueness(size, shared_data):
    shape = SudokuShape.from_size(size)
    rng = np.random.default_rng(size)
    if size == 9:
        puzzles, solutions = sudoku.load_hrm_sudoku(shared_data / EXTREME)
        pairs = list(zip(puzzles[:5], solutions[:5]))
    else:
        pairs = [sudoku.generate_puzzle(shape, rng) for _ in range(5)]
    changed = 0
    for puzzle, solution in pairs:
        for _ in range(6):
            t = sudoku.random_transform(shape, rng)
            aug_p, aug_s = t.apply(puzzle), t.apply(solution)
            assert sudoku.is_valid_solution(aug_s, shape, puzzle=aug_p)
            assert (aug_p != 0).sum() == (puzzle != 0).sum()
            assert np.array_equal(sudoku.solve_unique(aug_p, shape), aug_s)
            # the token version of a transform is the digit version shifted by one
            assert np.array_equal(t.apply(sudoku.to_tokens(puzzle), tokens=True), sudoku.to_tokens(aug_p))
            changed += not np.array_equal(aug_s, solution)
    assert changed > 0


def test_transpose_only_for_square_boxes():
    rng = np.random.default_rng(0)

    def source_rows(shape):  # (n, n): the source row each target cell reads from
        return sudoku.random_transform(shape, rng).cell_source.reshape(shape.size, shape.size) // shape.size

    # 2x3 boxes: every target row always reads one whole source row (a transpose would break the boxes)
    assert all((rows == rows[:, :1]).all() for rows in (source_rows(SudokuShape(2, 3)) for _ in range(50)))
    # 3x3 boxes: some draws transpose, so a target row reads one cell from each of the 9 source rows
    assert any(len(set(rows[0])) == 9 for rows in (source_rows(SudokuShape(3, 3)) for _ in range(50)))


def test_token_encoding():
    grid = sudoku.parse_sudoku("1.3." "..1." "2..." "...4")
    tokens = sudoku.to_tokens(grid)
    assert tokens.dtype == np.uint8 and tokens.shape == (16,)
    assert tokens[0] == 2 and tokens[1] == sudoku.BLANK_TOKEN and tokens.max() == 5
    assert np.array_equal(sudoku.from_tokens(tokens), grid)


def test_csv_loader(tmp_path):
    path = tmp_path / "s.csv"
    puzzle, solution = sudoku.generate_puzzle(SudokuShape(3, 3), np.random.default_rng(1))
    q, a = sudoku.format_sudoku(puzzle), sudoku.format_sudoku(solution)
    path.write_text(f"source,question,answer,rating\nx,{q},{a},3\ny,{q},{a},0\n")
    assert sudoku.load_sudoku_csv(path) == ([q, q], [a, a])
    assert sudoku.load_sudoku_csv(path, min_rating=1) == ([q], [a])
    puzzles, solutions = sudoku.parse_pairs(*sudoku.load_sudoku_csv(path), where=str(path))
    assert puzzles.shape == (2, 9, 9) and np.array_equal(solutions[0], solution)
    bad_answer = a.translate(str.maketrans("123456789", "234567891"))  # a valid grid that breaks every given
    with pytest.raises(ValueError, match="row 0: the answer is not a valid solution"):
        sudoku.parse_pairs([q], [bad_answer], where="x")
    (tmp_path / "bad.csv").write_text("quiz,sol\n1,2\n")
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        sudoku.load_sudoku_csv(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        sudoku.load_sudoku_csv(tmp_path / "missing.csv")


def test_tdoku_files_format(shared_data):
    folder = shared_data / "sudoku-hard-collections-tdoku"
    seventeen = sudoku.load_tdoku(folder / "puzzles2_17_clue.txt", limit=50)  # CRLF line endings, '#' header
    assert len(seventeen) == 50 and all(len(p) == 81 for p in seventeen)
    assert all(sum(ch != "." for ch in p) == 17 for p in seventeen)
    assert len(sudoku.load_tdoku(folder / "puzzles6_forum_hardest_1106.txt")) == 375


def test_build_sudoku_extreme(tmp_path, shared_data):
    folder = shared_data / "sudoku-hard-collections-tdoku"
    files = [folder / "puzzles3_magictour_top1465.txt", folder / "puzzles6_forum_hardest_1106.txt"]
    stats = sudoku.build_sudoku_extreme(tmp_path / "sx", train_dir=shared_data / EXTREME, tdoku_files=files,
                                        limit=15, num_aug=1, seed=0)
    train, test = grids.load_split(tmp_path / "sx", "train"), grids.load_split(tmp_path / "sx", "test")
    assert grids.load_identifiers(tmp_path / "sx") == ["<blank>"]
    m = train.metadata
    assert (m.vocab_size, m.seq_len, m.grid_shape, m.ignore_label_id, m.pad_id) == (11, 81, (9, 9), 0, 0)
    assert (m.total_groups, m.total_puzzles, train.num_examples) == (1000, 2000, 2000)
    kept = sum(stats[f.name]["kept"] for f in files)
    assert test.num_examples == stats["test_puzzles"] == kept and kept >= 25
    for split in (train, test):
        puzzles, solutions = sudoku.from_tokens(split.inputs), sudoku.from_tokens(split.labels)
        assert all(sudoku.is_valid_solution(s, puzzle=p) for p, s in zip(puzzles, solutions))
    # the augmented version of each puzzle is a different board with as many givens
    givens = (train.inputs != sudoku.BLANK_TOKEN).sum(1)
    assert np.array_equal(givens[0::2], givens[1::2]) and not np.array_equal(train.inputs[0::2], train.inputs[1::2])
    test_keys = {sudoku.format_sudoku(p) for p in sudoku.from_tokens(test.inputs)}
    assert test_keys.isdisjoint(sudoku.format_sudoku(p) for p in sudoku.from_tokens(train.inputs))


def test_build_generated_and_dataset(tmp_path):
    stats = sudoku.build_generated(tmp_path / "g6", size=6, num_train=60, num_test=20, seed=3, num_aug=2)
    train, test = grids.load_split(tmp_path / "g6", "train"), grids.load_split(tmp_path / "g6", "test")
    assert (train.metadata.vocab_size, train.metadata.seq_len, train.metadata.task) == (8, 36, "sudoku-6x6")
    assert (train.metadata.total_groups, train.num_examples, test.num_examples) == (60, 180, 20)
    assert 8 <= stats["test_mean_givens"] <= 14
    train_keys = {sudoku.format_sudoku(g) for g in sudoku.from_tokens(np.concatenate([train.inputs, train.labels]))}
    for p, s in zip(sudoku.from_tokens(test.inputs), sudoku.from_tokens(test.labels)):
        assert sudoku.format_sudoku(p) not in train_keys and sudoku.format_sudoku(s) not in train_keys
        assert np.array_equal(sudoku.solve_unique(p), s)
    ds = grids.PuzzleExampleDataset.from_dir(tmp_path / "g6", "test")
    item = ds[3]
    assert len(ds) == 20 and item["inputs"].dtype == torch.long and item["inputs"].shape == (36,)
    assert torch.equal(item["labels"], torch.from_numpy(test.labels[3].astype(np.int64)))  # nothing ignored
    assert int(item["puzzle_identifiers"]) == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["inputs"].shape == (4, 36) and batch["puzzle_identifiers"].shape == (4,)
    # same seed -> same data; a different seed -> different puzzles
    sudoku.build_generated(tmp_path / "again", size=6, num_train=60, num_test=20, seed=3, num_aug=2)
    assert np.array_equal(grids.load_split(tmp_path / "again", "train").inputs, train.inputs)
    sudoku.build_generated(tmp_path / "other", size=6, num_train=60, num_test=20, seed=4)
    assert not np.array_equal(grids.load_split(tmp_path / "other", "test").inputs, test.inputs)


def test_a_validation_split_is_disjoint_and_leaves_train_and_test_as_they_were(tmp_path):
    stats = sudoku.build_generated(tmp_path / "v", size=6, num_train=60, num_test=20, num_val=15, seed=3)
    sudoku.build_generated(tmp_path / "plain", size=6, num_train=60, num_test=20, seed=3)
    assert stats["val_puzzles"] == 15
    for name in ("train", "test"):
        assert np.array_equal(grids.load_split(tmp_path / "v", name).inputs, grids.load_split(tmp_path / "plain", name).inputs)
    val = grids.load_split(tmp_path / "v", "val")
    seen = {sudoku.format_sudoku(g) for name in ("train", "test") for split in [grids.load_split(tmp_path / "v", name)]
            for g in sudoku.from_tokens(np.concatenate([split.inputs, split.labels]))}
    val_puzzles, val_solutions = sudoku.from_tokens(val.inputs), sudoku.from_tokens(val.labels)
    assert val.num_examples == 15 and seen.isdisjoint(sudoku.format_sudoku(g) for g in val_puzzles)
    assert seen.isdisjoint(sudoku.format_sudoku(g) for g in val_solutions)
    assert all(np.array_equal(sudoku.solve_unique(p), s) for p, s in zip(val_puzzles, val_solutions))
    assert not (tmp_path / "plain" / "val").exists()


def test_clue_ranges_and_extra_training_puzzles(tmp_path):
    shape = SudokuShape.from_size(9)
    puzzles, solutions = sudoku.generate_puzzles(shape, 24, np.random.default_rng(0), min_givens=30, max_givens=40)
    givens = (puzzles != 0).reshape(24, -1).sum(1)
    assert givens.min() >= 30 and givens.max() <= 40 and len(set(givens.tolist())) > 3  # drawn per puzzle
    assert all(np.array_equal(sudoku.solve_unique(p), s) for p, s in zip(puzzles, solutions))
    with pytest.raises(ValueError, match="min_givens <= max_givens"):
        sudoku.generate_puzzles(shape, 1, np.random.default_rng(0), min_givens=41, max_givens=40)

    # extra puzzles (here: the first 5 of Sudoku-Extreme's kind, taken from a generated set) join train only
    extra_p, extra_s = sudoku.generate_puzzles(shape, 5, np.random.default_rng(7))
    stats = sudoku.build_generated(tmp_path / "g9", size=9, num_train=10, num_test=6, min_givens=34, max_givens=40,
                                   extra_train=(extra_p, extra_s))
    train, test = grids.load_split(tmp_path / "g9", "train"), grids.load_split(tmp_path / "g9", "test")
    assert (stats["train_puzzles"], stats["generated_train_puzzles"], train.num_examples) == (15, 10, 15)
    assert np.array_equal(sudoku.from_tokens(train.inputs[10:]), extra_p)
    test_givens = (sudoku.from_tokens(test.inputs) != 0).reshape(6, -1).sum(1)
    assert test_givens.min() >= 34 and test.num_examples == 6  # the test keeps the generated clue range
    extra_keys = {sudoku.format_sudoku(p) for p in extra_p}
    assert extra_keys.isdisjoint(sudoku.format_sudoku(p) for p in sudoku.from_tokens(test.inputs))


def test_build_cli_adds_sudoku_extreme_to_9x9_only(tmp_path):
    from puzzles import build

    with pytest.raises(SystemExit, match="--add_extreme needs --size 9"):
        build.main(["--task", "sudoku-gen", "--size", "6", "--add_extreme", "--output_dir", str(tmp_path / "x")])
    if not sudoku.SUDOKU_EXTREME_DIR.is_dir():
        pytest.skip(f"{sudoku.SUDOKU_EXTREME_DIR} is absent (the shared data folder next to the checkout)")
    stats = build.main(["--task", "sudoku-gen", "--size", "9", "--num_train", "4", "--num_test", "2",
                        "--min_givens", "36", "--max_givens", "40", "--add_extreme", "--output_dir", str(tmp_path / "y")])
    extreme, _ = sudoku.load_hrm_sudoku(sudoku.SUDOKU_EXTREME_DIR, "train")
    assert stats["train_puzzles"] == 4 + len(extreme) and stats["test_puzzles"] == 2


def test_format_writer_and_reader_checks(tmp_path):
    builder = grids.SplitBuilder("toy", (2, 2), vocab_size=4)
    builder.add_group([(1, np.array([[1, 2, 3, 0]]), np.array([[1, 2, 3, 3]])),
                       (2, np.ones((2, 4)), np.ones((2, 4)))])
    builder.add_group([(1, np.zeros((1, 4)), np.zeros((1, 4)))])
    split = builder.build(num_puzzle_identifiers=3)
    assert split.puzzle_indices.tolist() == [0, 1, 3, 4] and split.group_indices.tolist() == [0, 2, 3]
    assert split.example_puzzle_identifiers().tolist() == [1, 2, 2, 1]
    assert split.metadata.mean_puzzle_examples == pytest.approx(4 / 3)
    out = grids.write_dataset(tmp_path / "toy", {"train": split}, ["<blank>", "a", "b"])
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    loaded = grids.load_split(out, "train")
    for name in grids.ARRAY_NAMES:
        assert np.array_equal(getattr(loaded, name), getattr(split, name))
    assert loaded.metadata == split.metadata
    # ignore_label_id (0) becomes -100 in the torch dataset
    assert grids.PuzzleExampleDataset(loaded)[0]["labels"].tolist() == [1, 2, 3, 3]
    assert grids.PuzzleExampleDataset(loaded)[3]["labels"].tolist() == [-100] * 4

    with pytest.raises(FileExistsError, match="overwrite"):
        grids.write_dataset(out, {"train": split}, ["<blank>", "a", "b"])
    with pytest.raises(ValueError, match="3 identifiers|2 identifiers"):
        grids.write_dataset(tmp_path / "x", {"train": split}, ["<blank>", "a"])
    assert not (tmp_path / "x").exists()
    grids.write_dataset(out, {"train": split, "test": split}, ["<blank>", "a", "b"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary folder left behind
    assert grids.load_split(out, "test").num_examples == 4
    # a folder written by the official builders (no task / grid_shape in dataset.json) loads too
    meta = json.loads((out / "test" / "dataset.json").read_text())
    official = {k: v for k, v in meta.items() if k not in ("task", "grid_shape")}
    (out / "test" / "dataset.json").write_text(json.dumps(official))
    assert grids.load_split(out, "test").metadata.grid_shape == (2, 2)
    (out / "test" / "dataset.json").write_text(json.dumps({k: v for k, v in official.items() if k != "seq_len"}))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seq_len'\]"):
        grids.load_split(out, "test")

    np.save(out / "train" / "all__puzzle_indices.npy", np.array([0, 2, 1, 4], dtype=np.int32))
    with pytest.raises(ValueError, match="puzzle_indices must rise strictly"):
        grids.load_split(out, "train")
    np.save(out / "train" / "all__inputs.npy", np.full((4, 4), 9, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"inputs tokens span \[9, 9\]"):
        grids.load_split(out, "train")
    (out / "train" / "all__labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="all__labels.npy"):
        grids.load_split(out, "train")
    with pytest.raises(ValueError, match=r"inputs \(2, 4\) and labels \(1, 4\)"):
        grids.SplitBuilder("toy", (2, 2), 4).add_group([(0, np.zeros((2, 4)), np.zeros((1, 4)))])


def test_hub_csv_layout_through_datasets(tmp_path, shared_data):
    """The Hub path (datasets.load_dataset on a repo with train.csv/test.csv holding source,question,answer,rating)
    run offline on a local folder of the same layout: all-digit answers must stay strings, min_rating filters."""
    with open(shared_data / EXTREME / "train_decoded.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:12]
    repo = tmp_path / "fake-hub-repo"
    repo.mkdir()
    for split, part in (("train", rows[:8]), ("test", rows[8:])):
        lines = ["source,question,answer,rating"]
        lines += [f"src,{r['question']},{r['answer']},{i % 4}" for i, r in enumerate(part)]
        (repo / f"{split}.csv").write_text("\n".join(lines) + "\n")
    stats = sudoku.build_sudoku_extreme(tmp_path / "out", hub_id=str(repo), min_rating=2, num_aug=0)
    assert stats == {"train_puzzles": 4, "test_puzzles": 2}  # ratings 2 and 3 kept
    train = grids.load_split(tmp_path / "out", "train")
    assert sudoku.format_sudoku(sudoku.from_tokens(train.labels[0])) == rows[2]["answer"]


def test_build_cli(tmp_path, capsys):
    from puzzles import build

    stats = build.main(["--task", "sudoku-gen", "--size", "4", "--num_train", "10", "--num_test", "5",
                        "--output_dir", str(tmp_path / "s4"), "--num_aug", "1"])
    assert stats["train_puzzles"] == 10 and '"task": "sudoku-gen"' in capsys.readouterr().out
    assert grids.load_split(tmp_path / "s4", "train").num_examples == 20
    with pytest.raises(FileExistsError):
        build.main(["--task", "sudoku-gen", "--size", "4", "--num_train", "10", "--num_test", "5",
                    "--output_dir", str(tmp_path / "s4")])
    with pytest.raises(SystemExit):
        build.main(["--task", "maze", "--num_aug", "3", "--output_dir", str(tmp_path / "m")])
