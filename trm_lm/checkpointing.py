"""Resumable training checkpoints that cannot run code: safetensors + JSON only, verified by sha256.

A checkpoint `output_dir/checkpoints/step_<N>/` holds

    model.safetensors                 the (unwrapped) model's weights
    optimizer.{safetensors,json}      optimizer state: tensors in safetensors, the rest (param groups) in JSON
    scheduler.json                    learning-rate scheduler state
    ema.{safetensors,json}            the EMA copy of the weights (when EMA is on)
    task.{safetensors,json}           the task's own state (e.g. the puzzles' carry), when it has one
    rng_<rank>.{safetensors,json}     python / numpy / torch (/ cuda) RNG states of every process
    training_state.json               step, epoch, micro-batches consumed in that epoch, batch geometry
    checkpoint_complete.json          written last: every file's size and sha256

Nothing is pickled, so loading a checkpoint never executes anything it contains (accelerate's
`save_state` pickles the optimizer, RNG states and custom objects, and its loader unpickles them). A
checkpoint is written to `checkpoints/.tmp-step_<N>` and renamed into place, so a crash never leaves a
half-written `step_<N>`; resuming verifies every file against the manifest, and `latest` falls back to the
newest checkpoint that verifies, saying which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TMP_CHECKPOINT_PREFIX = ".tmp-step_"
CHECKPOINT_MARKER = "checkpoint_complete.json"  # written last: its presence means the checkpoint is whole
TRAINING_STATE = "training_state.json"
MODEL_FILE = "model.safetensors"
BEST_MODEL_DIR = "best_model"  # with --metric_for_best_model: the best evaluated model so far
BEST_INFO = "best.json"
REQUIRED_CHECKPOINT_FILES = (MODEL_FILE, "optimizer.safetensors", "optimizer.json", "scheduler.json",
                             "rng_0.safetensors", "rng_0.json", TRAINING_STATE)
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


# ----------------------------------------------------------------------------------------------------
# state trees <-> safetensors + JSON


def _encode(value, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):  # unsigned ints widened to int64 (older safetensors lack uint32)
        stored = value.astype(np.int64) if value.dtype.kind == "u" and value.dtype.itemsize < 8 else value
        tensors[path] = torch.from_numpy(np.ascontiguousarray(stored)).clone()
        return {"__ndarray__": path, "dtype": value.dtype.str}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__} at {path!r}")
        return {"__dict__": [[key, _encode(item, tensors, f"{path}.{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path!r}: only tensors, arrays, numbers, "
                    "strings, None and dicts/lists/tuples of them are saved (no pickle)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
        if "__tuple__" in value:
            return tuple(_decode(item, tensors) for item in value["__tuple__"])
        return {key: _decode(item, tensors) for key, item in value["__dict__"]}
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    return value


def save_state_tree(state: Any, folder: Path, name: str) -> None:
    """`state` (nested dicts/lists of tensors and plain values) as `name.safetensors` + `name.json`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state_tree(folder: Path, name: str) -> Any:
    """Inverse of `save_state_tree`; reads only safetensors and JSON."""
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["cuda"]):
            raise ValueError(f"the checkpoint holds RNG states of {len(state['cuda'])} CUDA devices, which are "
                             "not all available here")
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's state dict as safetensors, each tied tensor once under its first name (as save_pretrained)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(path))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Inverse of `save_weights`: every tensor of the model must be in the file (or tied to one that is)."""
    tensors = load_file(str(path))
    _, unexpected = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded = {(state[name].untyped_storage().data_ptr(), state[name].storage_offset()) for name in tensors
              if name in state}
    missing = [name for name, tensor in state.items()
               if name not in tensors and (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) not in loaded]
    if missing or unexpected:
        raise ValueError(f"model weights do not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")


# ----------------------------------------------------------------------------------------------------
# finding and verifying checkpoints


def _checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_checkpoint(path: str | os.PathLike) -> dict:
    """Check that `path` is a complete, unmodified checkpoint and return its training state.

    Raises ValueError naming the directory and what is wrong: no directory, no completion marker
    (interrupted while saving), a pickle file (refused: it could run code), a file listed in the marker
    missing, of the wrong size or with the wrong sha256, or unreadable JSON.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist or is not a directory")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"checkpoint {path} holds pickle files {pickles}, which can execute code when loaded; "
                         "trm-lm checkpoints are safetensors + JSON only (one written by an older trm-lm cannot "
                         "be resumed: start the run again or resume from a newer checkpoint)")
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        raise ValueError(f"checkpoint {path} is incomplete: no {CHECKPOINT_MARKER} (the save was interrupted)")
    try:
        manifest = json.loads(marker.read_text())
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"checkpoint {path}: {CHECKPOINT_MARKER} is unreadable ({err!r})") from None
    problems = [f"{name} not in manifest" for name in REQUIRED_CHECKPOINT_FILES if name not in expected]
    for name, (size, sha256) in expected.items():
        file = path / name
        if Path(name).name != name:
            problems.append(f"{name!r} is not a file name")
        elif not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, expected {size} (truncated or modified)")
        elif _sha256(file) != sha256:
            problems.append(f"{name} does not match its sha256 (corrupt or modified)")
    if problems:
        raise ValueError(f"checkpoint {path} is corrupt: " + "; ".join(problems))
    try:
        state = json.loads((path / TRAINING_STATE).read_text())
        int(state["step"]), int(state["epoch"]), int(state["micro_batches_in_epoch"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: {TRAINING_STATE} is unreadable ({err!r})") from None
    return state


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`step_<N>` directories under output_dir/checkpoints, oldest first (complete or not)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _checkpoint_step(p) is not None]
    return sorted(found, key=_checkpoint_step)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest checkpoint that verifies; the newer ones that do not are skipped with a warning saying why."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(path)
            return path
        except ValueError as err:
            logger.warning("skipping %s", err)
            print(f"warning: skipping {err}", flush=True)
    return None


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh start), the newest verified one for 'latest', or the
    given path, which must verify (ValueError otherwise)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    validate_checkpoint(resume_from_checkpoint)
    return Path(resume_from_checkpoint)


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted saves and prunes: `.tmp-step_*` folders and `step_*` folders without a
    manifest that are older than the newest complete checkpoint; returns what was removed."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    removed = sorted(root.glob(f"{TMP_CHECKPOINT_PREFIX}*"))
    complete = [p for p in list_checkpoints(output_dir) if (p / CHECKPOINT_MARKER).is_file()]
    if complete:
        newest = _checkpoint_step(complete[-1])
        removed += [p for p in list_checkpoints(output_dir)
                    if not (p / CHECKPOINT_MARKER).is_file() and _checkpoint_step(p) < newest]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------------------------------
# saving and loading


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _write(what: str, folder: Path, action) -> None:
    try:
        action()
    except OSError as err:  # disk full, read-only, ...: say where and why, the previous checkpoint is untouched
        raise OSError(err.errno, f"could not write the {what} of checkpoint {folder}: {err.strerror or err}") from err
    except RuntimeError as err:  # torch/safetensors wrap a failed write ("unexpected pos", ...)
        free = shutil.disk_usage(folder).free if folder.exists() else None
        hint = " (no space left on the device?)" if free is not None and free < (64 << 20) else ""
        raise OSError(f"could not write the {what} of checkpoint {folder}{hint}: {err}") from err


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, training_state: dict, *, model,
                    optimizer, scheduler, ema=None, task=None, total_limit: int | None = None) -> Path:
    """Atomically save a resumable checkpoint as checkpoints/step_<training_state['step']> (all ranks call this)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    step = int(training_state["step"])
    tmp, final = root / f"{TMP_CHECKPOINT_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    task_state = task.state_dict() if task is not None else None  # collective: every rank takes part
    optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        _write("model weights", tmp, lambda: save_weights(accelerator.unwrap_model(model), tmp / MODEL_FILE))
        _write("optimizer state", tmp, lambda: save_state_tree(optimizer_state, tmp, "optimizer"))
        _write("scheduler state", tmp, lambda: (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict())))
        if ema is not None:
            _write("EMA weights", tmp, lambda: save_state_tree(ema.state_dict(), tmp, "ema"))
        if task_state is not None:
            _write("task state", tmp, lambda: save_state_tree(task_state, tmp, "task"))
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    _write("RNG state", tmp, lambda: save_state_tree(rng_state(), tmp, f"rng_{rank}"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write("training state", tmp, lambda: (tmp / TRAINING_STATE).write_text(json.dumps(training_state, indent=2)))
        _fsync_tree(tmp)  # the data must be on disk before the marker says it is
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        _write("manifest", tmp, lambda: (tmp / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "files": files},
                                                                                        indent=2)))
        if final.exists():  # a stale checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            complete = [p for p in list_checkpoints(output_dir) if (p / CHECKPOINT_MARKER).is_file()]
            for old in complete[:-total_limit]:
                # unmark first: a kill mid-prune leaves a manifest-less folder, which the next start removes
                (old / CHECKPOINT_MARKER).unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_best_model(model: torch.nn.Module, folder: Path, info: dict, is_main_process: bool = True) -> None:
    """Replace `folder` by the model (save_pretrained, a loadable model folder) and `info` (best.json).

    Written next to it and swapped in by renames, so a kill leaves the previous best or the new one, whole."""
    if not is_main_process:
        return
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def write() -> None:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            save_weights(model, tmp / MODEL_FILE)
        (tmp / BEST_INFO).write_text(json.dumps(info, indent=2))
        _fsync_tree(tmp)

    _write("best model", tmp, write)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_best_model(model: torch.nn.Module, folder: Path) -> dict:
    """Load the weights `save_best_model` wrote into `model` (in place) and return its info."""
    folder = Path(folder)
    if not (folder / BEST_INFO).is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    if not (folder / BEST_INFO).is_file():
        raise FileNotFoundError(f"{folder}: no saved best model ({BEST_INFO} missing); it is written at each "
                                "evaluation that improves --metric_for_best_model")
    load_weights(model, folder / MODEL_FILE)
    return json.loads((folder / BEST_INFO).read_text())


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, *, model, optimizer, scheduler, ema=None,
                    task=None) -> None:
    """Restore everything `save_checkpoint` wrote (call after `validate_checkpoint`). Any part that does not
    load, this process's RNG state included, is a ValueError: a resume is exact or it does not happen."""
    checkpoint = Path(checkpoint)
    rank = accelerator.process_index
    try:
        load_weights(accelerator.unwrap_model(model), checkpoint / MODEL_FILE)
        optimizer.load_state_dict(load_state_tree(checkpoint, "optimizer"))
        scheduler.load_state_dict(json.loads((checkpoint / "scheduler.json").read_text()))
        if ema is not None:
            if not (checkpoint / "ema.json").is_file():
                raise ValueError("the run uses EMA (--ema_decay > 0) but the checkpoint has no EMA weights")
            ema.load_state_dict(load_state_tree(checkpoint, "ema"))
        if task is not None and (checkpoint / "task.json").is_file():
            task.load_state_dict(load_state_tree(checkpoint, "task"))
        if not (checkpoint / f"rng_{rank}.json").is_file():
            raise ValueError(f"no RNG state for process {rank} (the checkpoint was written by fewer processes)")
        set_rng_state(load_state_tree(checkpoint, f"rng_{rank}"))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {checkpoint} could not be loaded: {type(err).__name__}: {err}") from err


__all__ = [
    "save_checkpoint", "load_checkpoint", "validate_checkpoint", "find_latest_checkpoint", "resolve_checkpoint",
    "list_checkpoints", "remove_partial_checkpoints", "save_state_tree", "load_state_tree", "save_best_model",
    "load_best_model",
]
