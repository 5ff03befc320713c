"""The training loop (trm_lm/training.py), the text entry point (train/train_lm.py) and the baselines sizing."""

import importlib.util
from dataclasses import asdict
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import is_tensorboard_available
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trm_lm import TRMConfig, TRMForCausalLM
from trm_lm.baselines import baseline_table, count_parameters, llama_config_from_trm, main as baselines_main
from trm_lm import text_task
from trm_lm.training import TrainingArguments, TrainingTask, parse_args, run_training

REPO = Path(__file__).resolve().parents[2]
VOCAB, LENGTH = 24, 16


class CountingSequences(Dataset):
    """Sequences start, start+k, start+2k, ... (mod VOCAB): learnable in a few dozen steps."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 3, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(LENGTH)) % VOCAB  # (n, LENGTH)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CountingTask(TrainingTask):
    def __init__(self):
        self.train_dataset = CountingSequences(64, seed=0)
        self.held_out = CountingSequences(32, seed=1).ids

    def build_model(self):
        return TRMForCausalLM(TRMConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, net_layers=1,
                                        latent_steps=1, cycles=2, supervision_steps=2, max_position_embeddings=LENGTH))

    def evaluate(self, model, accelerator):
        return {"loss": held_out_loss(model, self.held_out.to(accelerator.device))}


@torch.no_grad()
def held_out_loss(model, ids):
    logits = model(input_ids=ids).logits  # final supervision step = the generation path
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), max_train_steps=60, per_device_train_batch_size=8, learning_rate=1e-2,
                  num_warmup_steps=5, logging_steps=1, report_to="none", seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def _log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_saves_the_ema_weights(tmp_path):
    task = CountingTask()
    torch.manual_seed(0)
    untrained = held_out_loss(task.build_model().eval(), task.held_out)
    result = run_training(_args(tmp_path, ema_decay=0.9, checkpointing_steps=60, report_to="auto"), task)

    steps = [r for r in _log(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"], (steps[0]["loss"], steps[-1]["loss"])
    assert result.metrics["loss"] < 0.5 * untrained, (untrained, result.metrics)
    # warmup then cosine: the peak right after warmup, zero at the last step
    assert steps[4]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert steps[0]["lr"] < steps[2]["lr"] < steps[4]["lr"] > steps[20]["lr"] > steps[40]["lr"]

    # The saved model is the EMA, not the raw weights (the step-60 checkpoint holds the raw ones).
    saved = load_file(tmp_path / "model.safetensors")
    raw = load_file(tmp_path / "checkpoints" / "step_60" / "model.safetensors")
    ema_state = result.model.state_dict()
    assert saved.keys() <= raw.keys()
    assert all(torch.equal(saved[k], ema_state[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_input_embeddings().weight, result.model.get_input_embeddings().weight)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 60 and results["metrics"] == result.metrics
    assert "optimizer steps: 60" in (tmp_path / "README.md").read_text()
    if is_tensorboard_available():  # report_to="auto" logs to TensorBoard exactly when it is installed
        assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    # 2 micro-batches of 4 must give the same updates as 1 batch of 8 (same examples, equal sizes).
    big = run_training(_args(tmp_path / "big", max_train_steps=4, per_device_train_batch_size=8), CountingTask())
    accumulated = run_training(_args(tmp_path / "acc", max_train_steps=4, per_device_train_batch_size=4,
                                     gradient_accumulation_steps=2), CountingTask())
    for a, b in zip(_log(tmp_path / "big"), _log(tmp_path / "acc")):
        if "loss" in a:
            assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for (name, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


class CarryTask(CountingTask):
    """A task with persistent state, like the puzzles' carry: it must survive a checkpoint/resume."""

    def __init__(self):
        super().__init__()
        self.micro_batches, self.carry = 0, torch.zeros(LENGTH)

    def compute_loss(self, model, batch):
        self.micro_batches += 1
        self.carry = 0.5 * self.carry + batch["input_ids"].float().mean(0)
        return super().compute_loss(model, batch)

    def state_dict(self):
        return {"micro_batches": self.micro_batches, "carry": self.carry.clone()}

    def load_state_dict(self, state):
        self.micro_batches, self.carry = state["micro_batches"], state["carry"].clone()


def test_task_state_is_checkpointed_and_restored(tmp_path):
    full = CarryTask()
    run_training(_args(tmp_path / "full", max_train_steps=10, checkpointing_steps=5), full)
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    (tmp_path / "full" / "checkpoints" / "step_5").rename(resumed_dir / "step_5")
    resumed = CarryTask()
    run_training(_args(tmp_path / "resumed", max_train_steps=10, checkpointing_steps=5,
                       resume_from_checkpoint="latest"), resumed)
    assert full.micro_batches == resumed.micro_batches == 10  # 5 restored + 5 run, not 5
    assert torch.equal(full.carry, resumed.carry)
    full_losses = {r["step"]: r["loss"] for r in _log(tmp_path / "full") if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in _log(tmp_path / "resumed") if "loss" in r}
    assert sorted(resumed_losses) == [6, 7, 8, 9, 10]
    assert all(resumed_losses[s] == full_losses[s] for s in resumed_losses)


def test_config_file_and_flag_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("output_dir: out/base\nlearning_rate: 1.0e-3\nmax_train_steps: 50\nseed: 3\n")
    variant = tmp_path / "variant.yaml"
    variant.write_text("base: base.yaml\nmax_train_steps: 70\nema_decay: 0.99\n")
    (args,) = parse_args([TrainingArguments], ["--config", str(variant), "--seed", "5"])
    assert (args.output_dir, args.learning_rate, args.max_train_steps, args.ema_decay, args.seed) == \
        ("out/base", 1e-3, 70, 0.99, 5)

    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nlearnig_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learnig_rate'\]"):
        parse_args([TrainingArguments], ["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args([TrainingArguments], ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="output_dir is required"):
        run_training(TrainingArguments(max_train_steps=1), CountingTask())
    with pytest.raises(ValueError, match="ema_decay"):
        run_training(_args(tmp_path / "o", ema_decay=1.5), CountingTask())


def test_baselines_match_params_and_flops(capsys):
    trm = TRMConfig(vocab_size=4096, hidden_size=256, num_attention_heads=4, net_layers=2, latent_steps=2, cycles=2,
                    supervision_steps=2, max_position_embeddings=512)
    rows = {row["model"]: row for row in baseline_table(trm)}
    assert rows["trm"]["params"] == TRMForCausalLM(trm).num_parameters()
    # params-matched: same unique weights (the Llama's norm scales vs the TRM's halting head: < 0.1%)
    assert abs(rows["llama-params"]["params"] - rows["trm"]["params"]) < 1e-3 * rows["trm"]["params"]
    # FLOPs-matched: one distinct Llama layer per TRM virtual layer, same forward FLOPs per token
    flops_cfg = llama_config_from_trm(trm, "flops")
    assert flops_cfg.num_hidden_layers == 2 * 2 * 2 * (2 + 1) == rows["trm"]["virtual_layers"]
    assert rows["llama-flops"]["forward_flops_per_token"] == rows["trm"]["forward_flops_per_token"]
    assert rows["llama-params"]["forward_flops_per_token"] < rows["trm"]["forward_flops_per_token"] / 5
    assert count_parameters(flops_cfg)["non_embedding"] == 12 * count_parameters(llama_config_from_trm(trm))[
        "non_embedding"] - 11 * 256  # 24 layers vs 2, one final norm each

    baselines_main(["--config", str(REPO / "train" / "configs" / "tinystories-small.yaml")])
    table = capsys.readouterr().out
    assert "| llama-flops | 24 | 24 |" in table and "| trm | 2 | 24 |" in table
    train_lm = _load_train_lm()
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(["--help"])
    assert exit_info.value.code == 0 and "--baseline_match {params,flops}" in capsys.readouterr().out
    for name in ("tinystories-small", "llama-params", "llama-flops", "tiny-cpu"):
        args, data, model = parse_args([TrainingArguments, train_lm.DataArguments, train_lm.ModelArguments],
                                       ["--config", str(REPO / "train" / "configs" / f"{name}.yaml")])
        assert args.output_dir == f"outputs/{name}"
        assert model.model_type == ("llama" if name.startswith("llama") else "trm")
        if name != "tiny-cpu":  # the baselines inherit the shipped model's data and architecture
            assert (data.block_size, data.vocab_size, model.hidden_size, model.net_layers) == (512, 4096, 256, 2)


def test_study_arms_share_data_tokenizer_and_schedule_and_differ_only_in_the_model():
    """docs/results.md compares the arms 'on the same tokens, tokenizer and schedule': check the configs say so."""
    train_lm = _load_train_lm()
    configs = REPO / "train" / "configs"

    def load(name):
        args, data, model = parse_args([TrainingArguments, train_lm.DataArguments, train_lm.ModelArguments],
                                       ["--config", str(configs / f"{name}.yaml")])
        return asdict(args), asdict(data), asdict(model)

    base_args, base_data, base_model = load("tinystories-cpu")
    arms = {"study-llama-params": {"model_type": "llama"},  # baseline_match defaults to "params"
            "study-llama-flops": {"model_type": "llama", "baseline_match": "flops"},
            "study-trm-shallow": {"cycles": 1, "latent_steps": 1}}
    for name, model_changes in arms.items():
        args, data, model = load(name)
        assert {k: v for k, v in args.items() if k != "output_dir"} == \
            {k: v for k, v in base_args.items() if k != "output_dir"}, name
        assert data == {**base_data, "tokenizer_name": "outputs/tinystories-cpu/tokenizer"}, name  # arm (a)'s
        assert {k: v for k, v in model.items() if model[k] != base_model[k]} == model_changes, name
    # the shipped recipe: the study's arm (d) architecture, 3 epochs instead of 1
    args, data, model = load("tinystories-cpu-long")
    assert (model["cycles"], model["latent_steps"], model["supervision_steps"]) == (1, 1, 2)
    assert args["max_train_steps"] == 3 * base_args["max_train_steps"] and data == base_data

def test_recipe_study_runs_differ_only_as_labelled_and_share_budget_data_and_schedule():
    """benchmarks/recipe_study.py: every run's command parses with the real flags, the arms differ only in the
    model fields their label names, and an arm twice as fast gets twice the steps of the same budget."""
    train_lm = _load_train_lm()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipe_study

    parsed = {}
    for name in recipe_study.RUNS:
        plan = recipe_study.plan_run(name, seed=1, budget=100.0, speed=4096.0, parameters=0, out_dir=REPO / "x")
        argv = recipe_study.command(plan)[2:]  # drop the interpreter and script
        args, data, model = parse_args([TrainingArguments, train_lm.DataArguments, train_lm.ModelArguments], argv)
        assert (args.max_train_steps, args.seed, args.eval_steps) == (100, 1, 10), name  # 100 s x 1 step/s
        parsed[name] = ({k: v for k, v in asdict(args).items() if k != "output_dir"}, asdict(data), asdict(model))
    base_args, base_data, base_model = parsed["trm-recursive"]
    assert (base_model["latent_steps"], base_model["cycles"], base_model["supervision_steps"]) == (2, 2, 4)
    assert base_data["validation_file"] is None and len(base_data["train_file"]) == 2
    expected = {"trm-recursive": {}, "trm-flat": {"latent_steps": 1, "cycles": 1},
                "llama-params": {"model_type": "llama"},  # baseline_match "params" is the default
                "llama-flops": {"model_type": "llama", "baseline_match": "flops"},
                "trm-halt0": {"halt_loss_weight": 0.0}, "trm-allcycles": {"backprop_all_cycles": True},
                "trm-nsup2": {"supervision_steps": 2}}
    assert set(expected) == set(parsed)
    for name, (args, data, model) in parsed.items():
        assert args == base_args and data == base_data, name
        assert {k: v for k, v in model.items() if v != base_model[k]} == expected[name], name
    slow = recipe_study.plan_run("llama-flops", seed=0, budget=100.0, speed=2048.0, parameters=0, out_dir=REPO / "x")
    assert slow["flags"]["max_train_steps"] == 50


def _load_train_lm():
    """train/train_lm.py as a module (train/ is a folder of scripts, not a package); it re-exports nothing but
    `main`, so the flag dataclasses come from the package module it runs."""
    if "train_lm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_lm", REPO / "train" / "train_lm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_lm"] = module
        spec.loader.exec_module(module)
    assert sys.modules["train_lm"].main is text_task.main
    return text_task


@pytest.fixture
def tiny_stories(shared_data, tmp_path):
    """The first 240 training and 12 validation stories of the shared TinyStories copy."""
    source = shared_data / "tinystories"
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(source.joinpath("train.jsonl").read_text().splitlines(keepends=True)[:240]))
    valid.write_text("".join(source.joinpath("valid.jsonl").read_text().splitlines(keepends=True)[:12]))
    return train, valid


def test_train_lm_script_trains_a_trm_that_loads_and_generates(tiny_stories, tmp_path):
    train, valid = tiny_stories
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "train" / "train_lm.py"), "--config",
               str(REPO / "train" / "configs" / "tiny-cpu.yaml"), "--output_dir", str(out), "--train_file", str(train),
               "--validation_file", str(valid), "--max_train_steps", "30", "--eval_steps", "15",
               "--checkpointing_steps", "15", "--report_to", "none"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = _log(out)
    evals = [r for r in log if "eval_bits_per_byte" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["eval_bits_per_byte"] < evals[0]["eval_bits_per_byte"]
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["bits_per_byte"] == evals[1]["eval_bits_per_byte"]
    assert "--max_train_steps 30" in results["command"]
    # the run ends by saying what it produced: where, and the final score
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 30 steps") and f"model saved to {out}" in last
    assert f"bits_per_byte {results['metrics']['bits_per_byte']:.4f}" in last
    card = (out / "README.md").read_text()
    assert "validation_bits_per_byte" in card and "custom_code" in card and "train.jsonl" in card

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, TRMForCausalLM) and len(tokenizer) == model.config.vocab_size == 512
    prompt = tokenizer("Once upon a time", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_train_lm_builds_the_flops_matched_llama(tiny_stories, tmp_path):
    train, valid = tiny_stories
    out = tmp_path / "llama"
    train_lm = _load_train_lm()
    result = train_lm.main(["--config", str(REPO / "train" / "configs" / "tiny-cpu.yaml"), "--output_dir", str(out),
                            "--train_file", str(train), "--validation_file", str(valid), "--max_train_steps", "2",
                            "--checkpointing_steps", "100", "--report_to", "none", "--model_type", "llama",
                            "--baseline_match", "flops"])
    config = json.loads((out / "config.json").read_text())
    # tiny-cpu: net_layers 1, supervision_steps 2, cycles 2, latent_steps 1 -> 1 * 2 * 2 * 2 = 8 layers
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 8 and config["hidden_size"] == 64
    assert result.completed_steps == 2 and result.metrics["bits_per_byte"] > 0
    assert "custom_code" not in (out / "README.md").read_text()


class NaNAtStepFive(CountingTask):
    """The loss turns NaN on the 5th micro-batch, as a diverging run would."""

    calls = 0

    def compute_loss(self, model, batch):
        self.calls += 1
        loss = super().compute_loss(model, batch)
        return loss * float("nan") if self.calls == 5 else loss


def test_non_finite_loss_stops_the_run_and_saves_nothing_non_finite(tmp_path):
    with pytest.raises(FloatingPointError, match="not finite at step 5"):
        run_training(_args(tmp_path, checkpointing_steps=2, max_train_steps=20), NaNAtStepFive())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_4"]  # nothing after the NaN
    assert not (tmp_path / "model.safetensors").exists()
    weights = load_file(tmp_path / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


class WorseningTask(CountingTask):
    """A held-out loss that only gets worse after the first evaluation."""

    evaluations = 0

    def evaluate(self, model, accelerator):
        self.evaluations += 1
        return {"loss": float(self.evaluations)}


def test_early_stopping_on_the_held_out_loss(tmp_path):
    result = run_training(_args(tmp_path, eval_steps=5, early_stopping_patience=2, max_train_steps=60),
                          WorseningTask())
    assert result.completed_steps == 15  # best at step 5, no better at 10 and 15
    assert any(r.get("event") == "early_stop" for r in _log(tmp_path))
    with pytest.raises(ValueError, match="needs --eval_steps"):
        _args(tmp_path, early_stopping_patience=2).validate()


class PeakingTask(CountingTask):
    """A held-out score that peaks at the second evaluation; `fail_at` evaluations in, the run dies (a kill)."""

    scores = [1.0, 3.0, 2.0, 2.5]

    def __init__(self, evaluations=0, fail_at=None):
        super().__init__()
        self.evaluations, self.fail_at = evaluations, fail_at

    def evaluate(self, model, accelerator):
        if self.evaluations == self.fail_at:
            raise RuntimeError("killed")
        self.evaluations += 1
        return {"loss": held_out_loss(model, self.held_out), "score": self.scores[self.evaluations - 1]}


def test_the_best_evaluated_model_is_saved_and_survives_a_resume(tmp_path):
    args = dict(eval_steps=5, checkpointing_steps=5, max_train_steps=20, metric_for_best_model="score")
    with pytest.raises(RuntimeError, match="killed"):  # dies in the step-20 evaluation
        run_training(_args(tmp_path, **args), PeakingTask(fail_at=3))
    assert json.loads((tmp_path / "best_model" / "best.json").read_text())["step"] == 10
    assert not (tmp_path / "model.safetensors").exists()

    result = run_training(_args(tmp_path, resume_from_checkpoint="latest", **args), PeakingTask(evaluations=3))
    assert result.completed_steps == 20 and result.metrics["score"] == 3.0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_model"] == {"metric": "score", "value": 3.0, "step": 10}
    saved, at_best = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "checkpoints/step_10/model.safetensors")
    last = load_file(tmp_path / "checkpoints/step_20/model.safetensors")
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)
    assert [r["eval_score"] for r in _log(tmp_path) if "eval_score" in r] == [1.0, 3.0, 2.0, 2.5]


def test_an_unknown_best_model_metric_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'accuracy' is not among the evaluation metrics"):
        run_training(_args(tmp_path, eval_steps=5, max_train_steps=5, metric_for_best_model="accuracy"), PeakingTask())
    with pytest.raises(ValueError, match="needs --eval_steps"):
        _args(tmp_path, metric_for_best_model="score").validate()
    assert _args(tmp_path, metric_for_best_model="bits_per_byte").tracked_metric == ("bits_per_byte", False)


def test_empty_training_data_is_a_clear_error(tmp_path):
    task = CountingTask()
    task.train_dataset = CountingSequences(0, seed=0)
    with pytest.raises(ValueError, match="training dataset is empty"):
        run_training(_args(tmp_path), task)


@pytest.mark.parametrize("command", ["train/train_lm.py", "train/train_puzzles.py", "generate/generate.py",
                                     "-m puzzles.build", "-m puzzles.evaluate", "-m trm_lm.export"])
def test_help_states_each_default_once(command):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, *command.split(), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "(default: None)" not in text
    assert "(default: " in text  # real defaults are still shown
    entries = re.split(r"\n  (?=-)", out.stdout)  # one entry per flag
    twice = [entry for entry in entries if "(default: " in entry and "default" in entry.split("(default: ")[0].lower()]
    assert not twice, twice
