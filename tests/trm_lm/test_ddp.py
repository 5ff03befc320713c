"""Two-process DDP on CPU (gloo) through train/train_lm.py, launched with torchrun.

torchrun alone on a CPU box starts two *independent* processes (accelerate sees DistributedType.NO and
never averages gradients); ACCELERATE_USE_CPU=1 turns them into one MULTI_CPU job. The test checks
that: the ranks train on different data, end with identical parameters (equal to the saved model),
report the same (all-reduced) evaluation, save per-rank RNG states, and exit cleanly.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import trm_lm  # noqa: F401  (registers the TRM classes with the Auto classes)

REPO = Path(__file__).resolve().parents[2]

# Runs trm_lm.text_task.main() (train/train_lm.py) in each rank, recording which blocks the rank trained on and a checksum of its
# final parameters.
DRIVER = r'''
import hashlib, json, os, sys
from pathlib import Path

repo, report_dir, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
sys.path.insert(0, str(repo))
from trm_lm import text_task as train_lm  # what train/train_lm.py runs
from accelerate import PartialState

seen, info = [], {}
compute_loss = train_lm.CausalLMTask.compute_loss

def recording_compute_loss(self, model, batch):
    state = PartialState()
    info.update(distributed_type=str(state.distributed_type), num_processes=state.num_processes,
                process_index=state.process_index)
    seen.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in batch["input_ids"].cpu())
    return compute_loss(self, model, batch)

train_lm.CausalLMTask.compute_loss = recording_compute_loss
result = train_lm.main(argv)
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
report = {**info, "seen": seen, "checksum": digest.hexdigest(), "metrics": result.metrics}
(report_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))
'''


def _checksum(state_dict):
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_process_cpu_ddp_shards_data_and_keeps_replicas_identical(shared_data, tmp_path):
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torch.distributed.run (torchrun) is not available in this torch build")
    source = shared_data / "tinystories"
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(source.joinpath("train.jsonl").read_text().splitlines(keepends=True)[:200]))
    valid.write_text("".join(source.joinpath("valid.jsonl").read_text().splitlines(keepends=True)[:6]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    steps, batch = 6, 4
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
               str(REPO), str(reports), "--config", str(REPO / "train" / "configs" / "tiny-cpu.yaml"),
               "--output_dir", str(out), "--train_file", str(train), "--validation_file", str(valid),
               "--max_train_steps", str(steps), "--per_device_train_batch_size", str(batch),
               "--checkpointing_steps", str(steps), "--eval_steps", "100", "--ema_decay", "0", "--report_to", "none"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]  # includes a clean gloo teardown

    rank0, rank1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    for rank, report in enumerate((rank0, rank1)):
        assert report["distributed_type"] == "DistributedType.MULTI_CPU"
        assert (report["num_processes"], report["process_index"]) == (2, rank)
        assert len(report["seen"]) == steps * batch  # one epoch has far more blocks than 2 x 24
    # different shards: no block trained on by both ranks
    assert len(set(rank0["seen"])) == steps * batch and not set(rank0["seen"]) & set(rank1["seen"])
    # gradients were averaged: the replicas are identical, and so is what rank 0 saved
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert rank0["checksum"] == rank1["checksum"] == _checksum(saved)
    assert rank0["metrics"] == rank1["metrics"] and rank0["metrics"]["bits_per_byte"] > 0
    checkpoint = json.loads((out / "checkpoints" / f"step_{steps}" / "checkpoint_complete.json").read_text())
    assert {"rng_0.safetensors", "rng_1.safetensors", "model.safetensors"} <= set(checkpoint["files"])
    assert json.loads((out / "results.json").read_text())["hardware"].startswith("2 x cpu")
