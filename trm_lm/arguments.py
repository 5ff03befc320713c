"""The flags every training script shares (`TrainingArguments`), YAML configs (`--config`, with `base:`), the
parser that fills several flag dataclasses at once, and smoke runs (TRM_LM_SMOKE=1). Used by trm_lm/training.py
(the loop) and the two tasks, trm_lm/text_task.py and puzzles/train_task.py."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from .cli import HelpFormatter



@dataclass
class TrainingArguments:
    """Flags common to every training script (names follow transformers' run_clm_no_trainer.py)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints, logs and the final model go."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps to run; overrides num_train_epochs when set."})
    num_train_epochs: int = field(
        default=1, metadata={"help": "Passes over the training data (if no max_train_steps)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro-batch size per process."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (after warmup)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay, applied to matrices only (ndim >= 2)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "transformers.get_scheduler name: cosine, linear, constant_with_warmup, ..."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear warmup, in optimizer steps."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; 0 = no clipping."})
    seed: int = field(default=0, metadata={"help": "Seeds the model init, the data order and dropout."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "bf16 on Ampere+/H100 and CPU; fp16 only on CUDA (it is a no-op on CPU)."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N optimizer steps."})
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints (None = keep all)."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'latest' (newest complete checkpoint in output_dir, or a fresh start if there is none) "
                          "or the path of a checkpoint directory."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N optimizer steps (always once at the end)."})
    logging_steps: int = field(default=10, metadata={"help": "Write a log line every N optimizer steps."})
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "EMA of the weights (e.g. 0.999), used for evaluation and the saved model; 0 = off."})
    report_to: str = field(
        default="auto",
        metadata={"help": "Tracker for accelerate: 'auto' (tensorboard if installed), 'none', or a tracker name."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even if an accelerator is present."})
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop once the held-out --metric_for_best_model has not improved for this many evaluations."})
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "An evaluation metric (e.g. 'loss', 'bits_per_byte', 'halting_exact_accuracy_at_halt'). "
                          "Each evaluation that improves it saves the evaluated model to <output_dir>/best_model, and "
                          "the run ends by saving that best model, not the last one. Early stopping watches it too "
                          "(default there: 'loss')."})
    greater_is_better: bool | None = field(
        default=None, metadata={"help": "Whether a larger --metric_for_best_model is better (default: False for names "
                                        "ending in 'loss' or 'bits_per_byte', else True)."})

    @property
    def tracked_metric(self) -> tuple[str, bool]:
        """(name, greater_is_better) of the metric that early stopping and best-model selection watch."""
        name = self.metric_for_best_model or "loss"
        greater = self.greater_is_better
        if greater is None:
            greater = not (name.endswith("loss") or name.endswith("bits_per_byte"))
        return name, greater

    def validate(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir is required (give --output_dir or set it in the --config file)")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.early_stopping_patience is not None and not self.eval_steps:
            raise ValueError("--early_stopping_patience needs --eval_steps (it counts evaluations)")
        if self.metric_for_best_model is not None and not self.eval_steps:
            raise ValueError("--metric_for_best_model needs --eval_steps (the best model is chosen among evaluations)")
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "eval_steps",
                     "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1 (or unset), got {value}")
        if self.num_warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("--num_warmup_steps, --max_grad_norm and --weight_decay must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML file of flag values. `base: other.yaml` (relative to this file) is read first and
    overridden by this file's values, so a variant config only lists what it changes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is not None:
        values = {**load_config(path.parent / base), **values}
    return values


def parse_args(dataclass_types: list[type], argv: list[str] | None = None,
               smoke_limits: dict[str, int] | None = None) -> tuple:
    """Parse command-line flags into instances of `dataclass_types` (HfArgumentParser).

    `--config file.yaml` supplies defaults; flags given explicitly on the command line override them.
    Unknown keys in the YAML file raise a ValueError naming them. With TRM_LM_SMOKE=1 in the environment
    the step counts are shrunk (see `apply_smoke_limits`), plus the script's own `smoke_limits`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)

    parser = HfArgumentParser(dataclass_types, formatter_class=HelpFormatter,
                              epilog=f"{SMOKE_ENV}=1 in the environment: a smoke run that only checks the command "
                                     "works (at most 2 optimizer steps of 2 examples, tiny evaluations), never a "
                                     "real one.")
    parser.add_argument("--config", help="YAML file of flag values; flags on the command line override it")
    if known.config:
        values = load_config(known.config)
        names = {f.name for dtype in dataclass_types for f in fields(dtype)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown}; valid keys are the script's flags")
        parser.set_defaults(**values)
    outputs = tuple(parser.parse_args_into_dataclasses(args=argv)[: len(dataclass_types)])  # drop --config's namespace
    if smoke_run():
        apply_smoke_limits(outputs, {**SMOKE_TRAINING_LIMITS, **(smoke_limits or {})}, SMOKE_TRAINING_PERIODS)
    return outputs


SMOKE_ENV = "TRM_LM_SMOKE"
# TRM_LM_SMOKE=1: every documented command runs end to end in seconds (tests/test_readme.py runs the README's
# commands this way). A limit caps a count whose None means "all"; a period (eval/checkpoint every N steps)
# is capped only when set, so a run that never checkpoints still does not.
SMOKE_TRAINING_LIMITS = {"max_train_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
SMOKE_TRAINING_PERIODS = {"eval_steps": 2, "checkpointing_steps": 1}


def smoke_run() -> bool:
    """Whether TRM_LM_SMOKE is set (to anything but "" or "0"): shrink every long count to a tiny one."""
    return os.environ.get(SMOKE_ENV, "") not in ("", "0")


def apply_smoke_limits(arguments: tuple, limits: dict[str, int], periods: dict[str, int] | None = None) -> None:
    """Cap the named fields of parsed arguments (dataclasses or argparse namespaces): `limits` always (None
    counts as unlimited), `periods` only where set. Says so in one line on stderr, so nobody takes a smoke
    run for a real one."""
    periods = periods or {}
    capped = []
    for args in arguments:
        for name, value in vars(args).items():
            if name in limits:
                value = limits[name] if value is None else min(value, limits[name])
            elif name in periods and value is not None:
                value = min(value, periods[name])
            else:
                continue
            setattr(args, name, value)
            capped.append(f"{name}={value}")
    print(f"{SMOKE_ENV} is set: a smoke run, not a real one ({', '.join(capped)})", file=sys.stderr, flush=True)


__all__ = ["TrainingArguments", "load_config", "parse_args", "smoke_run", "apply_smoke_limits", "SMOKE_ENV"]
