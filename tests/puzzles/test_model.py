"""The grid-puzzle model (puzzles/model.py): stablemax, the persistent carry, halting, save/load, the direct
baseline, and the scoring path of puzzles/evaluate.py with a perfect and an imperfect predictor."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from puzzles.evaluate import PuzzleScorer, flat_metrics, score_predictor
from puzzles.grids import PuzzleExampleDataset
from puzzles.model import PuzzleTRMConfig, TRMPuzzleModel, log_stablemax, token_cross_entropy
from puzzles.sudoku import SudokuShape, build_split, generate_puzzle

CELLS, VOCAB = 16, 6  # 4x4 Sudoku tokens: PAD 0, blank 1, digits 2..5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    values = dict(vocab_size=VOCAB, num_cells=CELLS, hidden_size=32, num_attention_heads=2, net_layers=1,
                  latent_steps=1, cycles=2, supervision_steps=3, puzzle_emb_len=2, num_puzzle_identifiers=3,
                  loss_type="softmax")
    values.update(overrides)
    return PuzzleTRMConfig(**values)


def random_batch(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(1, VOCAB, (rows, CELLS), generator=g),
            "labels": torch.randint(2, VOCAB, (rows, CELLS), generator=g),
            "puzzle_identifiers": torch.randint(0, 3, (rows,), generator=g)}


# ---- losses ------------------------------------------------------------------------------------------------

def test_stablemax_follows_its_formula_and_is_a_log_probability():
    logits = torch.tensor([[-3.0, -0.5, 0.0, 0.7, 2.5], [10.0, -10.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    s = lambda x: x + 1 if x >= 0 else 1 / (1 - x)  # noqa: E731  (Prieto et al. 2025)
    expected = [[math.log(s(x) / sum(s(v) for v in row)) for x in row] for row in logits.tolist()]
    got = log_stablemax(logits)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.exp().sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(got, torch.log_softmax(logits, -1))  # it is not softmax


def test_stablemax_gradient_is_finite_at_the_pole_of_the_unused_branch():
    logits = torch.tensor([[1.0, 0.0, -2.0]], requires_grad=True)  # 1 / (1 - x) is infinite at x = 1
    token_cross_entropy(logits[None], torch.tensor([[0]]), "stablemax").sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_cell_losses_ignore_unlabelled_cells_and_softmax_matches_torch():
    logits = torch.randn(2, 4, VOCAB, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 0, 5]])
    softmax = token_cross_entropy(logits, labels, "softmax")
    torch_ce = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), reduction="none").view(2, 4)
    assert softmax.dtype == torch.float64 and torch.allclose(softmax, torch_ce)
    stable = token_cross_entropy(logits, labels, "stablemax")
    assert (stable[labels == -100] == 0).all() and (stable[labels != -100] > 0).all()
    picked = -log_stablemax(logits.double()).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(stable[labels != -100], picked[labels != -100])


# ---- configuration -----------------------------------------------------------------------------------------

def test_config_derives_lengths_and_rejects_bad_values():
    cfg = tiny_config(mixer="mlp", position_encoding="none")
    assert cfg.sequence_length == cfg.max_position_embeddings == CELLS + 2
    for bad, message in [(dict(causal=True), "causal=False"), (dict(puzzle_emb_len=0), "puzzle_emb_len"),
                         (dict(loss_type="hinge"), "loss_type"), (dict(recursion="direct"), "supervision_steps=1"),
                         (dict(halt_exploration_prob=1.5), "halt_exploration_prob"), (dict(num_cells=0), "num_cells")]:
        with pytest.raises(ValueError, match=message):
            tiny_config(**bad)



# (official parameter count, vocab, cells, mixer): trm-official.md §2.7, counted from the official constructors.
OFFICIAL_PARAMS = [(5_028_866, 11, 81, "mlp"), (6_828_034, 11, 81, "attention"), (6_822_914, 6, 900, "attention"),
                   (18_795_522, 6, 900, "mlp"), (6_829_058, 12, 900, "attention"), (18_801_666, 12, 900, "mlp")]


@pytest.mark.parametrize("official, vocab, cells, mixer", OFFICIAL_PARAMS)
def test_paper_architectures_have_the_official_parameter_count(official, vocab, cells, mixer):
    """Default widths (SwiGLU 1536, token mixer 4*L*2/3 rounded up to 256) rebuild the official networks.

    Two intended differences: the puzzle-embedding table is a parameter here (official: a buffer with its own
    sparse optimizer, not counted), and the official Q head has a second, unused "continue" logit (TRM sets
    no_ACT_continue), D + 1 parameters that this model does not carry.
    """
    cfg = PuzzleTRMConfig(vocab_size=vocab, num_cells=cells, intermediate_size=1536, mixer=mixer,
                          position_encoding="none" if mixer == "mlp" else "rope")
    with torch.device("meta"):
        model = TRMPuzzleModel(cfg)
    counted = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("puzzle_emb."))
    assert counted + cfg.hidden_size + 1 == official

def test_prefix_is_one_learned_vector_then_zeros():
    model = TRMPuzzleModel(tiny_config(puzzle_emb_len=3, position_encoding="none"))
    assert (model.puzzle_emb.weight == 0).all()  # zero-initialised, as the official embedding
    with torch.no_grad():
        model.puzzle_emb.weight.normal_()
    batch = random_batch(4, seed=0)
    x = model.embed(batch["inputs"], batch["puzzle_identifiers"])  # (B, 3 + 16, D)
    scale = math.sqrt(model.config.hidden_size)
    assert torch.allclose(x[:, 0], scale * model.puzzle_emb.weight[batch["puzzle_identifiers"]])
    assert (x[:, 1:3] == 0).all()
    assert torch.allclose(x[:, 3:], scale * model.embed_tokens(batch["inputs"]))
    with pytest.raises(ValueError, match="puzzle identifiers must be in"):
        model.embed(batch["inputs"], torch.full((4,), 3))


# ---- the persistent carry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_halted_slots_take_new_data_and_the_others_continue(mixer):
    torch.manual_seed(0)
    position = "rope" if mixer == "attention" else "none"
    model = TRMPuzzleModel(tiny_config(mixer=mixer, position_encoding=position)).eval()
    first, second = random_batch(4, seed=1), random_batch(4, seed=2)
    out1 = model(None, first)  # a fresh carry: every slot loads the batch
    assert torch.equal(out1.carry.data["inputs"], first["inputs"]) and (out1.carry.steps == 1).all()
    assert out1.carry.y.grad_fn is None and not out1.carry.y.requires_grad  # detached

    carry = out1.carry
    carry.halted = torch.tensor([True, False, True, False])
    mixed = model(carry, second)
    reset, kept = carry.halted, ~carry.halted
    assert torch.equal(mixed.carry.data["inputs"][reset], second["inputs"][reset])
    assert torch.equal(mixed.carry.data["inputs"][kept], first["inputs"][kept])
    assert mixed.carry.steps.tolist() == [1, 2, 1, 2]

    carry.halted = torch.zeros(4, dtype=torch.bool)
    continued = model(carry, second)  # every slot continues its first puzzle
    restarted = model(None, second)  # every slot starts the second batch from scratch
    assert torch.allclose(mixed.logits[kept], continued.logits[kept], atol=1e-6)
    assert torch.allclose(mixed.logits[reset], restarted.logits[reset], atol=1e-6)
    assert not torch.allclose(continued.logits[reset], restarted.logits[reset])  # the carry matters


def test_every_step_backpropagates_alone_through_the_detached_carry():
    torch.manual_seed(0)
    model = TRMPuzzleModel(tiny_config()).train()
    carry = None
    for step in range(4):  # a graph reaching an earlier step would fail on the second backward
        out = model(carry, random_batch(4, seed=step))
        out.loss.backward()
        carry = out.carry
    assert model.embed_tokens.weight.grad is not None and model.puzzle_emb.weight.grad is not None


def test_halting_rules_in_training_and_evaluation():
    torch.manual_seed(0)
    model = TRMPuzzleModel(tiny_config(supervision_steps=3, halt_exploration_prob=0.0)).train()
    batch = random_batch(64, seed=3)

    def run(steps):
        carry, halted = None, []
        for _ in range(steps):
            carry = model(carry, batch).carry
            halted.append(carry.halted.clone())
        return halted

    assert [h.all().item() for h in run(3)] == [False, False, True]  # bias -5: halts only at the step limit
    with torch.no_grad():
        model.core.halt_head.bias.fill_(10.0)  # q_halt > 0 everywhere: "already right"
    assert run(1)[0].all()
    model.config.halt_exploration_prob = 1.0  # every slot must first run randint(2, 3) steps
    halted = run(3)
    assert not halted[0].any() and halted[1].any() and not halted[1].all()
    assert torch.equal(halted[2], ~halted[1])  # the rest halt at step 3; step-2 halters restarted at step 3
    model.eval()  # evaluation ignores q_halt: every slot runs all steps
    assert [h.all().item() for h in run(3)] == [False, False, True]


def test_loss_is_mean_cell_ce_plus_half_the_halting_bce():
    torch.manual_seed(0)
    model = TRMPuzzleModel(tiny_config()).eval()
    batch = random_batch(3, seed=4)
    batch["labels"][0, :5] = -100  # per-slot mean over its own labelled cells
    out = model(None, batch)
    ce = F.cross_entropy(out.logits.transpose(1, 2).double(), batch["labels"], reduction="none")  # (B, L)
    lm = torch.stack([ce[b][batch["labels"][b] != -100].mean() for b in range(3)]).mean()
    correct = ((out.logits.argmax(-1) == batch["labels"]) | (batch["labels"] == -100)).all(-1)
    bce = F.binary_cross_entropy_with_logits(out.q_halt_logits, correct.float())
    assert torch.allclose(out.loss.double(), lm + 0.5 * bce, atol=1e-5)


# ---- direct baseline, save / load --------------------------------------------------------------------------

def test_direct_baseline_is_the_same_network_applied_once():
    trm = TRMPuzzleModel(tiny_config())
    direct = TRMPuzzleModel(tiny_config(recursion="direct", supervision_steps=1))
    assert sum(p.numel() for p in trm.parameters()) == sum(p.numel() for p in direct.parameters())
    direct.load_state_dict(trm.state_dict())
    batch = random_batch(2, seed=5)
    x = direct.embed(batch["inputs"], batch["puzzle_identifiers"])
    rotary = direct.core.rotary(direct.position_ids)
    expected = direct.lm_head(direct.core.net(x, 0, rotary=rotary)[:, 2:])
    out = direct.train()(None, batch)
    assert torch.allclose(out.logits, expected, atol=1e-6) and out.carry.halted.all()


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TRMPuzzleModel(tiny_config(mixer="mlp", position_encoding="learned"))
    with torch.no_grad():
        model.puzzle_emb.weight.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.py")) == \
        ["configuration_trm.py", "core.py", "modeling_trm.py", "modeling_trm_puzzle.py"]  # remote code, as the LM
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, TRMPuzzleModel) and loaded.config.mixer == "mlp"
    batch = random_batch(3, seed=6)
    preds, q = model.predict(batch, supervision_steps=5)  # more steps than trained with is allowed at evaluation
    preds2, q2 = loaded.predict(batch, supervision_steps=5)
    assert preds.shape == (5, 3, CELLS) and torch.equal(preds, preds2) and torch.allclose(q, q2)
    assert torch.equal(loaded.core.y_init, model.core.y_init)


# ---- the scoring path ----------------------------------------------------------------------------------------

def sudoku4_dataset(count=12, seed=0):
    shape, rng = SudokuShape(2, 2), np.random.default_rng(seed)
    pairs = [generate_puzzle(shape, rng) for _ in range(count)]
    split = build_split(np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs]), "sudoku-4x4", shape=shape)
    return PuzzleExampleDataset(split)


def test_a_predictor_returning_the_labels_scores_exactly_one_and_a_wrong_cell_counts():
    dataset = sudoku4_dataset()
    oracle = lambda b: (b["labels"][None].expand(4, -1, -1), torch.full((4, len(b["labels"])), 3.0))  # noqa: E731
    result = score_predictor(oracle, dataset, PuzzleScorer("sudoku", 4, 4), batch_size=5).result()
    assert result["num_examples"] == 12
    assert result["exact_accuracy"] == result["cell_accuracy"] == result["blank_cell_accuracy"] == 1.0
    assert all(row["exact_accuracy"] == 1.0 for row in result["per_step"])
    assert result["halting"]["mean_steps"] == 1.0 and result["halting"]["exact_accuracy_at_halt"] == 1.0
    assert flat_metrics(result)["exact_accuracy_step_4"] == 1.0

    def one_wrong_cell(batch):  # the first row of every batch gets its first blank cell wrong
        preds = batch["labels"].clone()
        blank = int((batch["inputs"][0] == 1).nonzero()[0])
        preds[0, blank] = 2 + (preds[0, blank] - 1) % 4
        return preds[None], torch.full((1, len(preds)), -3.0)

    result = score_predictor(one_wrong_cell, dataset, PuzzleScorer("sudoku", 1, 1), batch_size=5).result()
    assert result["exact_accuracy"] == pytest.approx(9 / 12)  # 3 batches, one wrong row each
    assert result["cell_accuracy"] == pytest.approx(1 - 3 / (12 * 16))
    assert result["blank_cell_accuracy"] < 1.0 and result["halting"]["halt_accuracy"] == pytest.approx(3 / 12)


def test_the_halting_statistics_stop_each_row_at_the_threshold():
    """Steps 1-3 wrong then right, with q_halt 1.0 (P 0.73) at step 2 and 3.5 (P 0.97) at step 4: at the official
    0.5 every row stops at step 2, wrong; at 0.95 at step 4, right."""
    dataset = sudoku4_dataset()
    q = torch.tensor([-1.0, 1.0, 1.0, 3.5])

    def late_solver(batch):
        wrong = batch["labels"].clone()
        wrong[:, 0] = 0  # a pad token is never a label
        preds = torch.stack([wrong, wrong, wrong, batch["labels"]])
        return preds, q[:, None].expand(4, len(preds[0]))

    official = score_predictor(late_solver, dataset, PuzzleScorer("sudoku", 4, 4), batch_size=5).result()["halting"]
    calibrated = score_predictor(late_solver, dataset, PuzzleScorer("sudoku", 4, 4, halt_probability=0.95),
                                 batch_size=5).result()["halting"]
    assert (official["mean_steps"], official["exact_accuracy_at_halt"], official["threshold"]) == (2.0, 0.0, 0.5)
    assert (calibrated["mean_steps"], calibrated["exact_accuracy_at_halt"], calibrated["threshold"]) == (4.0, 1.0, 0.95)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        PuzzleScorer("sudoku", 4, 4, halt_probability=0.0)


def test_saved_folder_loads_as_remote_code_without_the_packages(tmp_path):
    """Like the LM: save_pretrained writes the modeling code beside the weights (auto_map in config.json), and
    a process that cannot import trm_lm or puzzles loads it with trust_remote_code and predicts the same."""
    import textwrap

    from helpers import WITHOUT_TRM_LM, build_tiny_solver, run_isolated

    from puzzles.model import REMOTE_CODE_DEPENDENCIES, REMOTE_CODE_MODULE, TRMPuzzleModel

    folder = build_tiny_solver(tmp_path / "solver")
    model = TRMPuzzleModel.from_pretrained(folder).eval()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["auto_map"]["AutoModel"] == \
        f"{REMOTE_CODE_MODULE}.TRMPuzzleModel"
    for name in (*REMOTE_CODE_DEPENDENCIES, f"{REMOTE_CODE_MODULE}.py"):
        assert (saved / name).is_file(), name
    assert not re.search(r"^from trm_lm", (saved / f"{REMOTE_CODE_MODULE}.py").read_text(), flags=re.M)
    assert isinstance(AutoModel.from_pretrained(saved), TRMPuzzleModel)  # locally: the package's class, no question

    inputs = torch.randint(2, 8, (3, 36))
    batch = {"inputs": inputs, "puzzle_identifiers": torch.zeros(3, dtype=torch.long)}
    expected, _ = model.predict(batch)
    torch.save({"batch": batch, "expected": expected}, tmp_path / "expected.pt")
    script = WITHOUT_TRM_LM + textwrap.dedent(f"""
        sys.modules["puzzles"] = None
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        preds, _ = model.predict(data["batch"])
        assert torch.equal(preds, data["expected"])
        model.save_pretrained({str(tmp_path / "again")!r})  # the remote copy saves itself as remote code too
        print("REMOTE-OK")
    """)
    result = run_isolated(script, tmp_path)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]
    for name in (*REMOTE_CODE_DEPENDENCIES, f"{REMOTE_CODE_MODULE}.py"):
        assert (tmp_path / "again" / name).read_bytes() == (saved / name).read_bytes(), name
