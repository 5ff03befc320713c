"""The one Accelerate training loop of trm-lm, shared by text (train/train_lm.py) and grids (train/train_puzzles.py).

A small *task* object says WHAT to train (model, data, loss, evaluation, extra files to save); this module
says HOW: mixed precision, gradient accumulation, AdamW + warmup/cosine schedule, gradient clipping, an EMA
of the weights, periodic evaluation, atomic checkpoints with exact resume, logging and DDP.

    args, = parse_args([TrainingArguments])            # flags + `--config file.yaml`
    result = run_training(args, MyTask(...))             # MyTask subclasses TrainingTask

Checkpoints (`--checkpointing_steps N`) live in `output_dir/checkpoints/step_<N>/`: weights, optimizer,
scheduler, EMA, task state and every rank's RNG state as safetensors + JSON (trm_lm/checkpointing.py:
nothing is pickled, so a checkpoint cannot run code), `training_state.json` (step, epoch, micro-batches
consumed in that epoch) and, written last, `checkpoint_complete.json`, a manifest of every file's size and
sha256. A checkpoint is first written to `checkpoints/.tmp-step_<N>` and renamed into place, so a crash
never leaves a half-written `step_<N>`. Resuming (`--resume_from_checkpoint latest|PATH`) verifies and
restores all of it and skips the consumed micro-batches of the seeded sampler, so the run continues exactly
as if it had never stopped (same batches, same dropout masks, same losses). A non-finite loss stops the
run with a clear error before anything is saved.

TRM_LM_SMOKE=1 in the environment turns any training command into a smoke run that only checks it works: at
most 2 optimizer steps of 2 examples, evaluation every 2 steps and a checkpoint every step where those are on,
plus the script's own caps (e.g. evaluation documents); one line on stderr says so. tests/test_readme.py runs
the README's commands this way.

Gradient accumulation averages the micro-batch losses (accelerate divides each by the number of
micro-batches). That equals the token-weighted mean because packed text blocks and fixed-size grids
have the same number of targets in every micro-batch (bar a smaller last batch of an epoch), so the loop
does not pass `num_items_in_batch`.
A map-style dataset is reshuffled every epoch; an iterable (streaming) one is read in its own order.

Outputs in `output_dir`: `log.jsonl` (one JSON object per logging step / evaluation), TensorBoard events in
`runs/` when tensorboard is installed, `results.json`, and the final model (`save_pretrained` of the EMA
weights when `--ema_decay > 0`, else the raw weights) plus whatever the task adds (tokenizer, model card).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import (DataLoaderConfiguration, ProjectConfiguration, is_tensorboard_available,
                              parse_flag_from_env, set_seed)
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import HfArgumentParser, default_data_collator, get_scheduler

from .checkpointing import (BEST_MODEL_DIR, CHECKPOINT_MARKER, CHECKPOINTS_DIR, find_latest_checkpoint,  # noqa: F401
                            list_checkpoints, load_best_model, load_checkpoint, remove_partial_checkpoints,
                            resolve_checkpoint, save_best_model, save_checkpoint, validate_checkpoint)
from .cli import HelpFormatter
from .model_card import render_model_card

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
RESULTS_FILE = "results.json"


# ----------------------------------------------------------------------------------------------------
# arguments


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


# ----------------------------------------------------------------------------------------------------
# the task interface


class TrainingTask(ABC):
    """What the loop needs from a task. Subclass it and override what differs; the defaults fit any
    transformers model whose batches are dicts of tensors and whose forward returns `.loss`.

    Required: a `train_dataset` attribute (a map-style or iterable torch Dataset) and `build_model()`.
    Optional: `state_dict()` + `load_state_dict(state)` for persistent task state (e.g. the puzzles' carry);
    when both exist they are checkpointed and restored with everything else.
    """

    train_dataset = None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Return a freshly initialised model (called after the seed is set, on every process)."""

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return default_data_collator(examples)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one micro-batch (mean over its tokens / items)."""
        return model(**batch).loss

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens (or cells) in a micro-batch, for the tokens/s throughput figure."""
        first = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
        return first.numel()

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return parameter_groups(model, weight_decay)

    def ema_skipped_parameters(self, model: nn.Module) -> list[str]:
        """Names of parameters the EMA does not average: its copy always holds their current values."""
        return []

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Metrics of `model` (the EMA copy when EMA is on). Runs on every process, under no_grad and
        with the RNG state restored afterwards, so evaluating never changes the training trajectory."""
        return {}

    def save_final(self, model: nn.Module, output_dir: Path, metrics: dict, run_info: dict) -> None:
        """Files written next to the saved weights, on the main process only. Default: a model card."""
        render_model_card(model_name=output_dir.name, metrics=metrics, run_info=run_info).save(output_dir / "README.md")


def init_weights_from(model: nn.Module, folder: str) -> nn.Module:
    """Start `model` from the weights saved in `folder` (save_pretrained of the same class). The recursion
    schedule may differ from the saved one, the tensor shapes may not."""
    start = type(model).from_pretrained(folder, dtype=torch.float32)
    try:
        model.load_state_dict(start.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"--init_from {folder}: its weights do not fit the configured architecture ({error})") from None
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay every matrix (ndim >= 2: linear weights and the tied embedding / LM head, as in
    nanoGPT), never vectors (norm scales, biases, halting-head bias). Shared (tied) tensors appear once."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() de-duplicates tied weights
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------
# checkpoints


# ----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainingResult:
    model: nn.Module  # the saved model: EMA weights when EMA is on, else the trained weights (unwrapped)
    metrics: dict[str, float]  # final evaluation
    completed_steps: int
    run_info: dict


def process_state(args: TrainingArguments) -> PartialState:
    """The (distributed) process state, set up as `run_training`'s Accelerator will set it up.

    For work before `run_training`, e.g. `with process_state(args).main_process_first(): <build data>`.
    Honours --cpu and ACCELERATE_USE_CPU=1 (which, unlike Accelerator, a bare PartialState ignores: a
    torchrun job on CPU would otherwise fall back to independent, unsynchronised processes).
    """
    return PartialState(cpu=args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def _make_accelerator(args: TrainingArguments) -> Accelerator:
    tracker = None
    if args.report_to == "auto":
        tracker = "tensorboard" if is_tensorboard_available() else None
    elif args.report_to != "none":
        tracker = args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The seedable sampler makes the shuffled order a function of (seed, epoch) only, which is what lets
        # a resumed run skip exactly the micro-batches it already consumed.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / "runs")),
        log_with=tracker,
        cpu=args.cpu,
    )
    if tracker is not None and not accelerator.log_with:
        raise ValueError(f"--report_to {tracker}: that tracker is not installed (pip install {tracker}) "
                         "or not known to accelerate; use --report_to none")
    return accelerator


def _hardware(accelerator: Accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{accelerator.num_processes} x {name}"


def _resume_settings(args: TrainingArguments, accelerator: Accelerator) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint for it to continue exactly."""
    names = ("max_train_steps", "num_train_epochs", "seed", "per_device_train_batch_size",
             "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
             "lr_scheduler_type", "num_warmup_steps", "max_grad_norm", "ema_decay", "mixed_precision")
    return {"num_processes": accelerator.num_processes, **{name: getattr(args, name) for name in names}}


def _write_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(args: TrainingArguments, task: TrainingTask) -> TrainingResult:
    """Train `task`'s model as `args` says; save the final model in args.output_dir. See the module doc."""
    args.validate()
    if task.train_dataset is None:
        raise ValueError(f"{type(task).__name__}.train_dataset is not set")
    start_time = time.time()
    output_dir = Path(args.output_dir)
    accelerator = _make_accelerator(args)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_partial_checkpoints(output_dir):
            logger.warning("removed the partial checkpoint %s left by an interrupted save", path)
    accelerator.wait_for_everyone()
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)  # fail fast on a bad path
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores; bf16 autocast is unaffected
    set_seed(args.seed)

    iterable = isinstance(task.train_dataset, IterableDataset)
    if not iterable and len(task.train_dataset) == 0:
        raise ValueError("the training dataset is empty: no training example could be made from the data (is the "
                         "training text shorter than one --block_size block, or was it all held out?)")
    model = task.build_model()
    train_dataloader = DataLoader(
        task.train_dataset, batch_size=args.per_device_train_batch_size, shuffle=not iterable,
        collate_fn=task.collate, num_workers=args.dataloader_num_workers,
        # The loader's own generator keeps its per-epoch base-seed draw off the global RNG, which belongs
        # to dropout; otherwise the fresh iterator a resumed run creates would shift every later mask.
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(task.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2))

    # Steps. len() of the prepared loader is per process, so compute after prepare; the scheduler is built
    # first (prepare wraps it) with step counts scaled by num_processes, because the prepared scheduler
    # steps once per process for every optimizer step.
    if iterable and args.max_train_steps is None:
        raise ValueError("an iterable (streaming) training dataset has no length: give --max_train_steps")
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    steps_per_epoch = None if iterable else math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError(f"the training dataset has no batch for this process ({len(task.train_dataset)} examples)")
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = None if iterable else math.ceil(max_train_steps / steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)

    ema, ema_skipped = None, []
    if args.ema_decay > 0:  # an fp32 shadow copy, updated after every optimizer step; never wrapped by DDP
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
        ema.eval()
        ema_skipped = task.ema_skipped_parameters(accelerator.unwrap_model(model))
    stateful_task = callable(getattr(task, "state_dict", None)) and callable(getattr(task, "load_state_dict", None))
    checkpointed = dict(model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                        task=task if stateful_task else None)

    # Resume.
    completed_steps, start_epoch, skip_batches = 0, 0, 0
    best_metric, best_step, evals_without_improvement = None, None, 0  # early stopping and best-model selection
    tracked, greater_is_better = args.tracked_metric
    best_dir = output_dir / BEST_MODEL_DIR
    if checkpoint is not None:
        state = validate_checkpoint(checkpoint)
        load_checkpoint(accelerator, checkpoint, **checkpointed)
        completed_steps, start_epoch = int(state["step"]), int(state["epoch"])
        skip_batches = int(state["micro_batches_in_epoch"])
        best_metric = state.get("best_metric", state.get("best_eval_loss"))  # best_eval_loss: older checkpoints
        best_step, evals_without_improvement = state.get("best_step"), int(state.get("evals_without_improvement", 0))
        if not iterable and skip_batches >= len(train_dataloader):  # saved right at the end of an epoch
            start_epoch, skip_batches = start_epoch + 1, 0
        expected = _resume_settings(args, accelerator)
        changed = {k: (state[k], v) for k, v in expected.items() if k in state and state[k] != v}
        if changed:  # the optimizer/scheduler state and the data position belong to the old settings
            listed = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"resuming {checkpoint} with changed settings ({listed}): the run would not continue "
                             "as it started. Resume with the original settings, or start a new run from these "
                             "weights (train_lm.py --init_from <a saved model>)")
        accelerator.print(f"resumed from {checkpoint} at step {completed_steps} (epoch {start_epoch}, "
                          f"{skip_batches} micro-batches into it)")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"no complete checkpoint in {output_dir / CHECKPOINTS_DIR}; starting from scratch")

    log_path = output_dir / LOG_FILE
    if accelerator.is_main_process and checkpoint is not None:
        _write_log(log_path, {"event": "resume", "step": completed_steps, "checkpoint": str(checkpoint)})
    if accelerator.log_with:
        config = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("trm-lm", config=config)

    def evaluate() -> dict[str, float]:
        eval_model = ema.module if ema is not None else accelerator.unwrap_model(model)
        eval_model.eval()
        devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast():
            metrics = task.evaluate(eval_model, accelerator)
        model.train()
        return {k: float(v) for k, v in metrics.items()}

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            _write_log(log_path, record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_metrics(metrics: dict[str, float]) -> None:
        if metrics:
            log({"step": completed_steps, **{f"eval_{k}": v for k, v in metrics.items()}})

    def track(metrics: dict[str, float]) -> None:
        """Count evaluations without improvement; with --metric_for_best_model, save each new best model."""
        nonlocal best_metric, best_step, evals_without_improvement
        if tracked not in metrics:
            if args.metric_for_best_model is not None:
                raise ValueError(f"--metric_for_best_model {tracked!r} is not among the evaluation metrics: "
                                 f"{sorted(metrics)}")
            return
        value = metrics[tracked]
        improved = math.isfinite(value) and (
            best_metric is None or (value > best_metric if greater_is_better else value < best_metric))
        if not improved:
            evals_without_improvement += 1
            return
        best_metric, best_step, evals_without_improvement = value, completed_steps, 0
        if args.metric_for_best_model is not None:
            save_best_model(ema.module if ema is not None else accelerator.unwrap_model(model), best_dir,
                            {"step": completed_steps, "metric": tracked, "value": value, "metrics": metrics},
                            is_main_process=accelerator.is_main_process)
            accelerator.wait_for_everyone()

    progress = tqdm(total=max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process,
                    desc="training")
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)  # summed micro-batch losses since the last log line
    micro_batches = tokens = 0
    window_start = time.time()
    grad_norm = None
    metrics: dict[str, float] = {}
    last_eval_step = -1
    epoch = start_epoch
    batches = None
    while completed_steps < max_train_steps and (num_epochs is None or epoch < num_epochs):
        train_dataloader.set_epoch(epoch)  # the sampler's order for this epoch = f(seed, epoch)
        batches, consumed = train_dataloader, 0
        if epoch == start_epoch and skip_batches:
            batches, consumed = accelerator.skip_first_batches(train_dataloader, skip_batches), skip_batches
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.compute_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            consumed += 1
            loss_sum += loss.detach().float()
            micro_batches += 1
            tokens += task.num_tokens(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            completed_steps += 1
            if not torch.isfinite(loss_sum).all():
                raise FloatingPointError(
                    f"the training loss is not finite at step {completed_steps} (after {micro_batches} micro-batches "
                    "since the last log line); stopping without saving. Lower --learning_rate, check the data, or "
                    "resume from the last checkpoint.")
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
                for name in ema_skipped:
                    ema.module.get_parameter(name).detach().copy_(accelerator.unwrap_model(model).get_parameter(name))
            progress.update(1)

            if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                mean_loss = accelerator.reduce(loss_sum / micro_batches, reduction="mean").item()
                elapsed = time.time() - window_start
                record = {"step": completed_steps, "epoch": epoch, "loss": mean_loss,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(elapsed, 1e-9),
                          "elapsed_s": time.time() - start_time}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                log(record)
                progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                loss_sum.zero_()
                micro_batches = tokens = 0
                window_start = time.time()

            paused = time.time()  # evaluation and checkpointing do not count against tokens/s
            if args.eval_steps and completed_steps % args.eval_steps == 0:
                metrics, last_eval_step = evaluate(), completed_steps
                log_metrics(metrics)
                track(metrics)

            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                training_state = {
                    "step": completed_steps, "epoch": epoch, "micro_batches_in_epoch": consumed,
                    **_resume_settings(args, accelerator),
                    "best_metric": best_metric, "best_step": best_step,
                    "evals_without_improvement": evals_without_improvement,
                    "rng": "python/numpy/torch(/cuda) states per rank in rng_<rank>.{safetensors,json}",
                }
                save_checkpoint(accelerator, output_dir, training_state, total_limit=args.checkpoints_total_limit,
                                **checkpointed)
            window_start += time.time() - paused
            if args.early_stopping_patience and evals_without_improvement >= args.early_stopping_patience:
                accelerator.print(f"early stop at step {completed_steps}: the held-out {tracked} has not improved on "
                                  f"{best_metric:.4f} (step {best_step}) for {evals_without_improvement} evaluations")
                log({"step": completed_steps, "event": "early_stop", "metric": tracked, "best_metric": best_metric,
                     "best_step": best_step})
                max_train_steps = completed_steps
            if completed_steps >= max_train_steps:
                break
        epoch += 1
    progress.close()

    if last_eval_step != completed_steps:
        metrics = evaluate()
        log_metrics(metrics)
        if args.metric_for_best_model is not None:
            track(metrics)

    final_model = ema.module if ema is not None else accelerator.unwrap_model(model)
    if args.metric_for_best_model is not None:
        if best_step is None:
            raise ValueError(f"no evaluation gave a finite {tracked}: there is no best model to save")
        best = load_best_model(final_model, best_dir)  # the weights of the best evaluation, and its metrics
        metrics = best["metrics"]
        accelerator.print(f"best {tracked} {best['value']:.4f} at step {best['step']} of {completed_steps}: "
                          "that model is the one saved")
    run_info = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "steps": completed_steps,
        "epochs": epoch if num_epochs is None else min(epoch, num_epochs),
        "wall_time_s": round(time.time() - start_time, 1),
        "hardware": _hardware(accelerator),
        "mixed_precision": args.mixed_precision,
        "num_parameters": sum(p.numel() for p in final_model.parameters()),
        "ema_decay": args.ema_decay,
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        **({"best_model": {"metric": tracked, "value": best_metric, "step": best_step}}
           if args.metric_for_best_model is not None else {}),
        "training_args": asdict(args),
    }
    if hasattr(final_model, "save_pretrained"):
        final_model.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
    else:
        accelerator.save_model(final_model, output_dir)
    if accelerator.is_main_process:
        task.save_final(final_model, output_dir, metrics, run_info)
        (output_dir / RESULTS_FILE).write_text(json.dumps({"metrics": metrics, **run_info}, indent=2))
        headline = [name for name, value in metrics.items() if isinstance(value, float)
                    and (name.endswith("bits_per_byte") or name in ("exact_accuracy", "cell_accuracy"))]
        scores = ", ".join(f"{name} {metrics[name]:.4f}" for name in headline or list(metrics)[:3])
        accelerator.print(f"done: {completed_steps} steps in {run_info['wall_time_s']:.0f} s; model saved to "
                          f"{output_dir}; final {scores}", flush=True)

    # Clean DDP exit: drop every reference to the wrapped model and optimizer before tearing down the process
    # group, or gloo occasionally aborts at exit (see docs/ reference notes on the teardown flake).
    accelerator.wait_for_everyone()
    del model, optimizer, scheduler, train_dataloader, batches
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return TrainingResult(model=final_model, metrics=metrics, completed_steps=completed_steps, run_info=run_info)


__all__ = [
    "TrainingArguments", "TrainingTask", "TrainingResult", "run_training", "parse_args", "process_state", "load_config",
    "init_weights_from",
    "parameter_groups", "save_checkpoint", "load_checkpoint", "validate_checkpoint", "find_latest_checkpoint",
    "resolve_checkpoint", "list_checkpoints", "remove_partial_checkpoints",
]
