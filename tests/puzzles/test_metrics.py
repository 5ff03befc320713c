"""Metrics: ground truth scores 1.0, corrupted predictions score lower, ARC voting after de-augmentation."""
import numpy as np
import pytest
import torch

from puzzles import arc, grids, maze, metrics, sudoku


@pytest.fixture(scope="module")
def sudoku_batch():
    shape = sudoku.SudokuShape.from_size(6)
    rng = np.random.default_rng(0)
    pairs = [sudoku.generate_puzzle(shape, rng) for _ in range(8)]
    inputs = sudoku.to_tokens(np.stack([p for p, _ in pairs]))
    labels = sudoku.to_tokens(np.stack([s for _, s in pairs]))
    return inputs, labels


def test_exact_and_cell_accuracy(sudoku_batch):
    inputs, labels = sudoku_batch
    assert metrics.exact_accuracy(labels, labels) == 1.0 and metrics.cell_accuracy(labels, labels) == 1.0
    # torch tensors work too
    assert metrics.exact_accuracy(torch.from_numpy(labels), torch.from_numpy(labels)) == 1.0
    blank = metrics.blank_mask(inputs)
    assert metrics.cell_accuracy(inputs, labels, mask=blank) == 0.0  # copying the input gets no blank cell right
    assert metrics.exact_accuracy(inputs, labels) == 0.0
    wrong = labels.copy()
    first_blank = np.argmax(blank[:4], axis=1)
    wrong[np.arange(4), first_blank] = np.where(labels[np.arange(4), first_blank] == 2, 3, 2)  # one wrong cell in 4 boards
    assert metrics.exact_accuracy(wrong, labels) == 0.5
    assert metrics.exact_matches(wrong, labels).tolist() == [False] * 4 + [True] * 4
    assert metrics.cell_accuracy(wrong, labels) == pytest.approx(1 - 4 / labels.size)
    assert metrics.cell_accuracy(wrong, labels, mask=blank) == pytest.approx(1 - 4 / blank.sum())
    # ignored cells (-100) do not count
    ignored = labels.astype(np.int64)
    ignored[np.arange(4), first_blank] = grids.IGNORE_INDEX
    assert metrics.exact_accuracy(wrong, ignored) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.exact_accuracy(wrong[:, :3], labels)


def test_accuracy_per_step(sudoku_batch):
    inputs, labels = sudoku_batch
    half = np.where(np.arange(len(labels))[:, None] < 4, labels, inputs)
    steps = metrics.accuracy_per_step([inputs, half, labels], labels)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["exact_accuracy"] for s in steps] == [0.0, 0.5, 1.0]
    assert steps[0]["cell_accuracy"] < steps[1]["cell_accuracy"] < steps[2]["cell_accuracy"] == 1.0


def test_halting_summary():
    out = metrics.halting_summary([1, 2, 2, 4], max_steps=4, halt_logits=[3.0, -1.0, 0.5, -2.0],
                                  is_correct=[True, True, True, False])
    assert out["mean_steps"] == 2.25 and out["median_steps"] == 2.0
    assert out["histogram"] == [1, 2, 0, 1] and out["halted_early"] == 0.75
    assert out["halt_accuracy"] == 0.75  # example 2 is correct but its logit says "continue"
    with pytest.raises(ValueError, match="1..4"):
        metrics.halting_summary([0, 5], max_steps=4)


def test_maze_accuracy(shared_data):
    inputs, labels = maze.load_hrm_maze(shared_data / "maze-30x30-hard-1k", "test")
    inputs, labels = inputs[:50], labels[:50]
    assert metrics.maze_accuracy(inputs, labels) == 1.0
    assert metrics.maze_accuracy(inputs, inputs) == 0.0
    half = labels.copy()
    half[:25] = inputs[:25]
    assert metrics.maze_accuracy(inputs, half) == 0.5


# ---- ARC voting -------------------------------------------------------------------------------------------
def g(rows):
    return np.asarray(rows, dtype=np.uint8)


TASKS = {
    "a": arc.ARCTask("a", [(g([[1]]), g([[2]]))], [(g([[1, 2], [3, 0]]), g([[4, 5, 6]]))]),
    "b": arc.ARCTask("b", [(g([[1]]), g([[2]]))], [(g([[7, 0, 0]]), g([[1], [2]])), (g([[0, 8]]), g([[3, 3], [0, 3]]))]),
}


def versions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [arc.ARCAugmentation()] + [arc.ARCAugmentation.random(rng) for _ in range(n - 1)]


def rows_for(answers, augs, confidence=None):
    """Build test-split rows: every version shows the test input in its own frame and "predicts" the given
    answer (a function of the version index and the test pair), also in its own frame."""
    names = ["<blank>"] + [aug.name(task_id) for task_id in TASKS for aug in augs]
    ids, inputs, preds, conf = [], [], [], []
    for t, task_id in enumerate(TASKS):
        for v, aug in enumerate(augs):
            for k, (test_in, test_out) in enumerate(TASKS[task_id].test):
                ids.append(1 + t * len(augs) + v)
                inputs.append(arc.encode_grid(aug.apply(test_in)))
                preds.append(arc.encode_grid(aug.apply(answers(task_id, v, k, test_out))))
                conf.append(0.5 if confidence is None else confidence(task_id, v, k))
    return names, np.array(ids), np.stack(inputs), np.stack(preds), np.array(conf)


def vote(names, ids, inputs, preds, conf, batch=5):
    voter = metrics.ARCVoter(names, TASKS)
    for i in range(0, len(ids), batch):  # batched updates accumulate
        voter.update(ids[i:i + batch], inputs[i:i + batch], preds[i:i + batch], conf[i:i + batch])
    return voter.result(pass_ks=(1, 2, 10))


WRONG = g([[9, 9]])


def test_arc_ground_truth_scores_one():
    augs = versions(8)
    result, submission = vote(*rows_for(lambda task, v, k, out: out, augs))
    assert result == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0, "ARC/pass@10": 1.0}
    assert submission["b"][1]["attempt_1"] == TASKS["b"].test[1][1].tolist()
    assert submission["b"][1]["attempt_2"] == submission["b"][1]["attempt_1"]  # padded to 2 attempts


def test_arc_vote_majority_after_deaugmentation():
    augs = versions(9)
    # 5 of 9 versions agree (after undoing their augmentation) on a wrong grid, 4 on the truth
    result, submission = vote(*rows_for(lambda task, v, k, out: WRONG if v < 5 else out, augs))
    assert result == {"ARC/pass@1": 0.0, "ARC/pass@2": 1.0, "ARC/pass@10": 1.0}
    assert submission["a"][0]["attempt_1"] == WRONG.tolist()
    result, _ = vote(*rows_for(lambda task, v, k, out: WRONG if v >= 5 else out, augs))
    assert result["ARC/pass@1"] == 1.0
    # the same raw grid written in every version's frame is not a consensus: after de-augmentation the
    # versions disagree, so the 4 consistent truthful versions win the vote
    names, ids, inputs, preds, conf = rows_for(lambda task, v, k, out: out, augs)
    raw = arc.encode_grid(g([[4, 4, 1]]))
    preds[np.isin(ids, [1 + t * 9 + v for t in range(2) for v in range(1, 6)])] = raw
    result, _ = vote(names, ids, inputs, preds, conf)
    assert result["ARC/pass@1"] == 1.0


def test_arc_vote_ties_by_confidence_and_task_averaging():
    augs = versions(4)
    answers = lambda task, v, k, out: WRONG if v % 2 else out  # noqa: E731  2 vs 2 votes
    confident_wrong = lambda task, v, k: 0.9 if v % 2 else 0.1  # noqa: E731
    result, _ = vote(*rows_for(answers, augs, confident_wrong))
    assert result["ARC/pass@1"] == 0.0 and result["ARC/pass@2"] == 1.0
    result, _ = vote(*rows_for(answers, augs, lambda task, v, k: 0.1 if v % 2 else 0.9))
    assert result["ARC/pass@1"] == 1.0
    # task b: only its first test input solved -> b scores 0.5; task a scores 1 -> mean 0.75
    answers = lambda task, v, k, out: WRONG if (task, k) == ("b", 1) else out  # noqa: E731
    result, submission = vote(*rows_for(answers, augs))
    assert result["ARC/pass@1"] == 0.75 and result["ARC/pass@10"] == 0.75
    # padding rows (blank identifier) are skipped; missing predictions count as failures
    names, ids, inputs, preds, conf = rows_for(lambda task, v, k, out: out, augs)
    keep = ids <= len(augs)  # only task a's rows
    ids_padded = np.concatenate([ids[keep], [0, 0]])
    pad_rows = np.zeros((2, 900), dtype=np.uint8)
    result, submission = vote(names, ids_padded, np.concatenate([inputs[keep], pad_rows]),
                              np.concatenate([preds[keep], pad_rows]), np.concatenate([conf[keep], [1.0, 1.0]]))
    assert result["ARC/pass@1"] == 0.5 and submission["b"] == []
