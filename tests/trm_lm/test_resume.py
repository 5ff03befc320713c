"""Checkpoints and exact resume of the training loop, through the real entry point train/train_lm.py.

One uninterrupted run is the reference. A fresh process resuming from its step-20 checkpoint, and a run
killed with SIGKILL after its first checkpoint and then resumed with `latest`, must log the very same
losses after the resume point and end with bit-identical weights (dropout is on, so the RNG state matters).
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trm_lm.checkpointing import (CHECKPOINT_MARKER, find_latest_checkpoint, list_checkpoints, remove_partial_checkpoints,
                                  resolve_checkpoint, validate_checkpoint)

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
FLAGS = ["--config", str(REPO / "train" / "configs" / "tiny-cpu.yaml"), "--max_train_steps", str(STEPS),
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4", "--checkpointing_steps", "10",
         "--checkpoints_total_limit", "3", "--logging_steps", "1", "--eval_steps", "20", "--max_eval_documents", "6",
         "--embedding_dropout", "0.1", "--ema_decay", "0.9", "--report_to", "none"]


def _command(output_dir, data, *extra):
    train, valid = data
    return [sys.executable, str(REPO / "train" / "train_lm.py"), *FLAGS, "--output_dir", str(output_dir),
            "--train_file", str(train), "--validation_file", str(valid), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: bitwise-reproducible CPU math


def _run(output_dir, data, *extra):
    proc = subprocess.run(_command(output_dir, data, *extra), capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(output_dir):
    """{step: loss} of the LAST record of each step (a killed run may have logged steps it later redid)."""
    records = [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _final(output_dir):
    return json.loads((Path(output_dir) / "results.json").read_text())["metrics"], \
        load_file(Path(output_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """40 training stories (~170 blocks of 64 tokens: ~11 steps of 4 x 4 blocks per epoch, the last one with
    a partial accumulation) and 6 validation stories."""
    folder = tmp_path_factory.mktemp("stories")
    source = shared_data / "tinystories"
    train, valid = folder / "train.jsonl", folder / "valid.jsonl"
    train.write_text("".join(source.joinpath("train.jsonl").read_text().splitlines(keepends=True)[:40]))
    valid.write_text("".join(source.joinpath("valid.jsonl").read_text().splitlines(keepends=True)[:6]))
    return train, valid


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    _run(output_dir, data)
    return output_dir


def _assert_same_as_reference(output_dir, reference, resumed_at):
    losses, expected = _losses(output_dir), _losses(reference)
    after = [step for step in expected if step > resumed_at]
    assert after and [losses[s] for s in after] == [expected[s] for s in after]  # exact, not approximate
    metrics, weights = _final(output_dir)
    ref_metrics, ref_weights = _final(reference)
    assert metrics == ref_metrics
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_uninterrupted_run_keeps_the_newest_checkpoints(reference):
    assert [p.name for p in list_checkpoints(reference)] == ["step_20", "step_30", "step_40"]
    states = [validate_checkpoint(path) for path in list_checkpoints(reference)]
    assert [state["step"] for state in states] == [20, 30, 40]
    assert states[0]["epoch"] < states[-1]["epoch"]  # resuming from step 20 crosses epoch boundaries
    assert sorted(_losses(reference)) == list(range(1, STEPS + 1))


def test_fresh_process_resumes_exactly_from_a_checkpoint(reference, data, tmp_path):
    output_dir = tmp_path / "resumed"
    (output_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_20", output_dir / "checkpoints" / "step_20")
    shutil.copytree(reference / "tokenizer", output_dir / "tokenizer")
    proc = _run(output_dir, data, "--resume_from_checkpoint", str(output_dir / "checkpoints" / "step_20"))
    assert "resumed from" in proc.stdout + proc.stderr
    assert min(_losses(output_dir)) == 21  # nothing before the checkpoint was re-run
    _assert_same_as_reference(output_dir, reference, resumed_at=20)


def test_killed_run_resumes_with_latest_and_finishes_identically(reference, data, tmp_path):
    output_dir = tmp_path / "killed"
    first_checkpoint = output_dir / "checkpoints" / "step_10" / CHECKPOINT_MARKER
    proc = subprocess.Popen(_command(output_dir, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), cwd=REPO)
    try:
        deadline = time.time() + 240
        while not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert first_checkpoint.exists(), "the run never wrote its first checkpoint"
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (output_dir / "results.json").exists()

    # Debris a crash can leave: a half-written save, and a newer step directory without its marker.
    (output_dir / "checkpoints" / ".tmp-step_35").mkdir()
    (output_dir / "checkpoints" / ".tmp-step_35" / "model.safetensors").write_bytes(b"partial")
    (output_dir / "checkpoints" / "step_35").mkdir()
    latest = find_latest_checkpoint(output_dir)
    assert latest is not None and latest.name != "step_35"
    resumed_at = validate_checkpoint(latest)["step"]

    proc = _run(output_dir, data, "--resume_from_checkpoint", "latest")
    assert f"resumed from {latest}" in proc.stdout + proc.stderr
    assert not (output_dir / "checkpoints" / ".tmp-step_35").exists()
    _assert_same_as_reference(output_dir, reference, resumed_at=resumed_at)


def test_corrupt_checkpoints_give_clear_errors_and_latest_skips_them(reference, data, tmp_path):
    root = tmp_path / "out" / "checkpoints"
    for step in (20, 30, 40):
        shutil.copytree(reference / "checkpoints" / f"step_{step}", root / f"step_{step}")
    assert validate_checkpoint(root / "step_20")["step"] == 20

    (root / "step_40" / CHECKPOINT_MARKER).unlink()  # interrupted before the marker
    with pytest.raises(ValueError, match=r"step_40 is incomplete: no checkpoint_complete\.json"):
        validate_checkpoint(root / "step_40")
    weights = root / "step_30" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=r"step_30 is corrupt: model\.safetensors has \d+ bytes, expected \d+"):
        validate_checkpoint(root / "step_30")
    assert find_latest_checkpoint(tmp_path / "out") == root / "step_20"
    with pytest.raises(ValueError, match="step_30 is corrupt"):
        resolve_checkpoint(tmp_path / "out", str(root / "step_30"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "out", str(root / "step_99"))

    (root / "step_20" / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match=r"step_20 is corrupt: optimizer\.safetensors is missing"):
        validate_checkpoint(root / "step_20")
    assert find_latest_checkpoint(tmp_path / "out") is None
    assert resolve_checkpoint(tmp_path / "out", "latest") is None  # 'latest' with nothing usable = fresh start

    (root / ".tmp-step_50").mkdir()
    assert remove_partial_checkpoints(tmp_path / "out") == [root / ".tmp-step_50"]
    assert not (root / ".tmp-step_50").exists()


def test_unloadable_checkpoint_names_the_directory(reference, data, tmp_path):
    # Wrong bytes with a manifest rewritten to match them: verifies, fails to load -> ValueError naming it.
    checkpoint = tmp_path / "out" / "checkpoints" / "step_20"
    shutil.copytree(reference / "checkpoints" / "step_20", checkpoint)
    shutil.copytree(reference / "tokenizer", tmp_path / "out" / "tokenizer")
    optimizer = checkpoint / "optimizer.safetensors"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    _rewrite_manifest(checkpoint)
    proc = subprocess.run(_command(tmp_path / "out", data, "--resume_from_checkpoint", str(checkpoint)),
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert f"error: checkpoint {checkpoint} could not be loaded" in proc.stderr
    assert "Traceback" not in proc.stderr


def _rewrite_manifest(checkpoint):
    """What an attacker who can write the folder can also do: make the manifest match the planted files."""
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != CHECKPOINT_MARKER}
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps({"step": 20, "files": files}))


class _Planted:
    """Unpickling this writes a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_code_from_a_checkpoint_ever_runs(reference, data, tmp_path):
    """A malicious pickle planted as each checkpoint file (and as accelerate's old pickle names), with the manifest
    untouched or rewritten to match: resuming fails with a clear error and the pickle never runs."""
    source = reference / "checkpoints" / "step_20"
    targets = sorted(p.name for p in source.iterdir() if p.name != CHECKPOINT_MARKER)
    targets += ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"]
    for index, target in enumerate(targets):
        for rewrite in (False, True):
            out = tmp_path / f"case{index}-{int(rewrite)}"
            checkpoint = out / "checkpoints" / "step_20"
            shutil.copytree(source, checkpoint)
            shutil.copytree(reference / "tokenizer", out / "tokenizer")
            marker = tmp_path / f"pwned-{index}-{int(rewrite)}"
            payload = pickle.dumps(_Planted(marker))
            original = checkpoint / target
            if original.exists():  # padded to the original size, as an attacker would
                payload = payload.ljust(max(original.stat().st_size, len(payload)), b"\0")
            original.write_bytes(payload)
            if rewrite:
                _rewrite_manifest(checkpoint)
            with pytest.raises(ValueError, match=str(checkpoint)):
                resolve_checkpoint(out, str(checkpoint)) if not rewrite else _load_in_process(out, checkpoint, data)
            assert not marker.exists(), f"code planted in {target} ran"


def _load_in_process(output_dir, checkpoint, data):
    """Validate and load `checkpoint` into a fresh run's objects, as run_training does, without training."""
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from transformers import get_scheduler

    from trm_lm import TRMConfig, TRMForCausalLM
    from trm_lm.checkpointing import load_checkpoint

    validate_checkpoint(checkpoint)
    # tiny-cpu.yaml's architecture (the reference run's)
    model = TRMForCausalLM(TRMConfig(vocab_size=512, hidden_size=64, num_attention_heads=2, net_layers=1,
                                     latent_steps=1, cycles=2, supervision_steps=2, max_position_embeddings=64))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    load_checkpoint(Accelerator(cpu=True), checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)


def test_latest_falls_back_when_same_size_damage_breaks_the_newest(reference, tmp_path, capsys):
    root = tmp_path / "out" / "checkpoints"
    for step in (30, 40):
        shutil.copytree(reference / "checkpoints" / f"step_{step}", root / f"step_{step}")
    weights = root / "step_40" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[20] ^= 0xFF  # a flipped header byte: same size
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its sha256"):
        validate_checkpoint(root / "step_40")
    assert find_latest_checkpoint(tmp_path / "out") == root / "step_30"
    printed = capsys.readouterr().out
    assert "skipping checkpoint" in printed and "step_40" in printed
    rng = root / "step_30" / "rng_0.safetensors"
    rng.write_bytes(b"\0" * rng.stat().st_size)  # zeroed RNG state: refused, never a silent non-exact resume
    assert find_latest_checkpoint(tmp_path / "out") is None


@pytest.mark.parametrize("flag, value", [("--learning_rate", "0.01"), ("--gradient_accumulation_steps", "2")])
def test_resume_with_changed_settings_is_refused(reference, data, tmp_path, flag, value):
    output_dir = tmp_path / "changed"
    shutil.copytree(reference / "checkpoints" / "step_20", output_dir / "checkpoints" / "step_20")
    shutil.copytree(reference / "tokenizer", output_dir / "tokenizer")
    proc = subprocess.run(_command(output_dir, data, "--resume_from_checkpoint", "latest", flag, value),
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert f"changed settings ({flag}" in proc.stderr and "--init_from" in proc.stderr
    assert not (output_dir / "log.jsonl").exists() or "loss" not in (output_dir / "log.jsonl").read_text()
