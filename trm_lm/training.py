"""The one Accelerate training loop of trm-lm, shared by text (trm_lm/text_task.py) and grids (puzzles/train_task.py).

A small *task* object says WHAT to train (model, data, loss, evaluation, extra files to save); this module
says HOW: mixed precision, gradient accumulation, AdamW + warmup/cosine schedule, gradient clipping, an EMA
of the weights, periodic evaluation, early stopping and best-model selection, atomic checkpoints with exact
resume, logging and DDP. The flags live in trm_lm/arguments.py, the checkpoint files in trm_lm/checkpointing.py.

    args, = parse_args([TrainingArguments])            # flags + `--config file.yaml`
    result = run_training(args, MyTask(...))             # MyTask subclasses TrainingTask

`run_training` reads like the loop it is: build the run (`_TrainingRun`: accelerator, model, data, optimizer,
schedule, EMA), `resume()` from a checkpoint, `train()` (micro-steps; after each optimizer step: log,
evaluate + track the best, checkpoint, stop early), `finish()` (final evaluation, the saved model, results).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DataLoaderConfiguration, ProjectConfiguration, is_tensorboard_available,
                              parse_flag_from_env, set_seed)
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import default_data_collator, get_scheduler

# The flags and the checkpoint functions are re-exported: `from trm_lm.training import parse_args, ...` works.
from .arguments import TrainingArguments, load_config, parse_args  # noqa: F401
from .checkpointing import (BEST_MODEL_DIR, CHECKPOINTS_DIR, find_latest_checkpoint, list_checkpoints,  # noqa: F401
                            load_best_model, load_checkpoint, remove_partial_checkpoints, resolve_checkpoint,
                            save_best_model, save_checkpoint, validate_checkpoint)
from .model_card import render_model_card

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
RESULTS_FILE = "results.json"


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


@dataclass
class _Position:
    """Where a run stands; written into every checkpoint's training_state.json and read back on resume."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    skip_batches: int = 0  # micro-batches of `epoch` a resumed run has already consumed
    best_metric: float | None = None  # of the tracked metric (early stopping, --metric_for_best_model)
    best_step: int | None = None
    evals_without_improvement: int = 0

    def state(self, consumed: int) -> dict:
        return {"step": self.step, "epoch": self.epoch, "micro_batches_in_epoch": consumed,
                "best_metric": self.best_metric, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}

    @classmethod
    def from_state(cls, state: dict) -> "_Position":
        return cls(step=int(state["step"]), epoch=int(state["epoch"]), skip_batches=int(state["micro_batches_in_epoch"]),
                   best_metric=state.get("best_metric", state.get("best_eval_loss")),  # best_eval_loss: older runs
                   best_step=state.get("best_step"),
                   evals_without_improvement=int(state.get("evals_without_improvement", 0)))


class _TrainingRun:
    """The state `run_training`'s steps share. Order of construction matters for exact resume: seed, model,
    loader, optimizer, prepare, scheduler, EMA, then the checkpoint's state on top."""

    def __init__(self, args: TrainingArguments, task: TrainingTask):
        args.validate()
        if task.train_dataset is None:
            raise ValueError(f"{type(task).__name__}.train_dataset is not set")
        self.args, self.task, self.start_time = args, task, time.time()
        self.output_dir = Path(args.output_dir)
        self.accelerator = accelerator = _make_accelerator(args)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in remove_partial_checkpoints(self.output_dir):
                logger.warning("removed the partial checkpoint %s left by an interrupted save", path)
        accelerator.wait_for_everyone()
        self.checkpoint = resolve_checkpoint(self.output_dir, args.resume_from_checkpoint)  # fail fast on a bad path
        if accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores; bf16 autocast is unaffected
        set_seed(args.seed)
        self._build_model_and_data()
        self._build_schedule()
        self.ema, self.ema_skipped = None, []
        if args.ema_decay > 0:  # an fp32 shadow copy, updated after every optimizer step; never wrapped by DDP
            self.ema = AveragedModel(self.unwrapped, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
            self.ema.eval()
            self.ema_skipped = task.ema_skipped_parameters(self.unwrapped)
        stateful = callable(getattr(task, "state_dict", None)) and callable(getattr(task, "load_state_dict", None))
        self.checkpointed = dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                                 task=task if stateful else None)
        self.tracked, self.greater_is_better = args.tracked_metric
        self.best_dir = self.output_dir / BEST_MODEL_DIR
        self.log_path = self.output_dir / LOG_FILE
        self.position = _Position()
        self.metrics: dict[str, float] = {}
        self.last_eval_step = -1

    # ----- setup -----------------------------------------------------------------------------------------------
    def _build_model_and_data(self) -> None:
        args, task = self.args, self.task
        self.iterable = isinstance(task.train_dataset, IterableDataset)
        if not self.iterable and len(task.train_dataset) == 0:
            raise ValueError("the training dataset is empty: no training example could be made from the data (is "
                             "the training text shorter than one --block_size block, or was it all held out?)")
        if self.iterable and args.max_train_steps is None:
            raise ValueError("an iterable (streaming) training dataset has no length: give --max_train_steps")
        model = task.build_model()
        loader = DataLoader(
            task.train_dataset, batch_size=args.per_device_train_batch_size, shuffle=not self.iterable,
            collate_fn=task.collate, num_workers=args.dataloader_num_workers,
            # The loader's own generator keeps its per-epoch base-seed draw off the global RNG, which belongs
            # to dropout; otherwise the fresh iterator a resumed run creates would shift every later mask.
            generator=torch.Generator().manual_seed(args.seed),
        )
        optimizer = torch.optim.AdamW(task.parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2))
        self.model, self.optimizer, self.train_dataloader = self.accelerator.prepare(model, optimizer, loader)

    def _build_schedule(self) -> None:
        # len() of the prepared loader is per process, so count after prepare; the scheduler is built first
        # (prepare wraps it) with step counts scaled by num_processes, because the prepared scheduler steps
        # once per process for every optimizer step.
        args, accelerator = self.args, self.accelerator
        steps_per_epoch = None if self.iterable else math.ceil(len(self.train_dataloader) /
                                                                args.gradient_accumulation_steps)
        if steps_per_epoch == 0:
            raise ValueError(f"the training dataset has no batch for this process ({len(self.task.train_dataset)} "
                             "examples)")
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        self.num_epochs = None if self.iterable else math.ceil(self.max_train_steps / steps_per_epoch)
        scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                  num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                  num_training_steps=self.max_train_steps * accelerator.num_processes)
        self.scheduler = accelerator.prepare(scheduler)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def evaluated_model(self) -> nn.Module:
        """What evaluation scores and the run saves: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def resume(self) -> None:
        """Restore the checkpoint (if any) on top of the freshly built run; check it was made with these settings."""
        args, accelerator, checkpoint = self.args, self.accelerator, self.checkpoint
        if checkpoint is not None:
            state = validate_checkpoint(checkpoint)
            load_checkpoint(accelerator, checkpoint, **self.checkpointed)
            self.position = position = _Position.from_state(state)
            if not self.iterable and position.skip_batches >= len(self.train_dataloader):  # saved at an epoch's end
                position.epoch, position.skip_batches = position.epoch + 1, 0
            expected = _resume_settings(args, accelerator)
            changed = {k: (state[k], v) for k, v in expected.items() if k in state and state[k] != v}
            if changed:  # the optimizer/scheduler state and the data position belong to the old settings
                listed = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(f"resuming {checkpoint} with changed settings ({listed}): the run would not continue "
                                 "as it started. Resume with the original settings, or start a new run from these "
                                 "weights (--init_from <a saved model>)")
            accelerator.print(f"resumed from {checkpoint} at step {position.step} (epoch {position.epoch}, "
                              f"{position.skip_batches} micro-batches into it)")
            if accelerator.is_main_process:
                _write_log(self.log_path, {"event": "resume", "step": position.step, "checkpoint": str(checkpoint)})
        elif args.resume_from_checkpoint == "latest":
            accelerator.print(f"no complete checkpoint in {self.output_dir / CHECKPOINTS_DIR}; starting from scratch")
        if accelerator.log_with:
            config = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("trm-lm", config=config)

    # ----- what happens between optimizer steps ---------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            _write_log(self.log_path, record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def evaluate(self) -> dict[str, float]:
        """Score the evaluated model without touching the training RNG; log the metrics."""
        eval_model = self.evaluated_model
        eval_model.eval()
        devices = [torch.cuda.current_device()] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.accelerator.autocast():
            metrics = self.task.evaluate(eval_model, self.accelerator)
        self.model.train()
        self.metrics, self.last_eval_step = {k: float(v) for k, v in metrics.items()}, self.position.step
        if self.metrics:
            self.log({"step": self.position.step, **{f"eval_{k}": v for k, v in self.metrics.items()}})
        return self.metrics

    def track(self, metrics: dict[str, float]) -> None:
        """Count evaluations without improvement; with --metric_for_best_model, save each new best model."""
        position, tracked = self.position, self.tracked
        if tracked not in metrics:
            if self.args.metric_for_best_model is not None:
                raise ValueError(f"--metric_for_best_model {tracked!r} is not among the evaluation metrics: "
                                 f"{sorted(metrics)}")
            return
        value, best = metrics[tracked], position.best_metric
        if not (math.isfinite(value) and (best is None or (value > best if self.greater_is_better else value < best))):
            position.evals_without_improvement += 1
            return
        position.best_metric, position.best_step, position.evals_without_improvement = value, position.step, 0
        if self.args.metric_for_best_model is not None:
            save_best_model(self.evaluated_model, self.best_dir,
                            {"step": position.step, "metric": tracked, "value": value, "metrics": metrics},
                            is_main_process=self.accelerator.is_main_process)
            self.accelerator.wait_for_everyone()

    def save_checkpoint(self, consumed: int) -> None:
        state = {**self.position.state(consumed), **_resume_settings(self.args, self.accelerator),
                 "rng": "python/numpy/torch(/cuda) states per rank in rng_<rank>.{safetensors,json}"}
        save_checkpoint(self.accelerator, self.output_dir, state, total_limit=self.args.checkpoints_total_limit,
                        **self.checkpointed)

    def stop_early(self) -> bool:
        args, position = self.args, self.position
        if not (args.early_stopping_patience and position.evals_without_improvement >= args.early_stopping_patience):
            return False
        self.accelerator.print(f"early stop at step {position.step}: the held-out {self.tracked} has not improved on "
                               f"{position.best_metric:.4f} (step {position.best_step}) for "
                               f"{position.evals_without_improvement} evaluations")
        self.log({"step": position.step, "event": "early_stop", "metric": self.tracked,
                  "best_metric": position.best_metric, "best_step": position.best_step})
        return True

    # ----- the loop ----------------------------------------------------------------------------------------------
    def micro_step(self, batch) -> torch.Tensor:
        """Forward and backward of one micro-batch; the optimizer steps when accumulation is complete."""
        args, accelerator = self.args, self.accelerator
        with accelerator.accumulate(self.model):
            loss = self.task.compute_loss(self.model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                self.grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def after_optimizer_step(self, loss_sum: torch.Tensor, micro_batches: int) -> None:
        if not torch.isfinite(loss_sum).all():
            raise FloatingPointError(
                f"the training loss is not finite at step {self.position.step} (after {micro_batches} micro-batches "
                "since the last log line); stopping without saving. Lower --learning_rate, check the data, or "
                "resume from the last checkpoint.")
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped)
            for name in self.ema_skipped:
                self.ema.module.get_parameter(name).detach().copy_(self.unwrapped.get_parameter(name))

    def train(self) -> None:
        args, accelerator, position = self.args, self.accelerator, self.position
        progress = tqdm(total=self.max_train_steps, initial=position.step,
                        disable=not accelerator.is_local_main_process, desc="training")
        self.model.train()
        loss_sum = torch.zeros((), device=accelerator.device)  # summed micro-batch losses since the last log line
        micro_batches = tokens = 0
        window_start = time.time()
        self.grad_norm = None
        start_epoch = position.epoch
        while position.step < self.max_train_steps and (self.num_epochs is None or position.epoch < self.num_epochs):
            self.train_dataloader.set_epoch(position.epoch)  # the sampler's order for this epoch = f(seed, epoch)
            batches, consumed = self.train_dataloader, 0
            if position.epoch == start_epoch and position.skip_batches:
                batches = accelerator.skip_first_batches(self.train_dataloader, position.skip_batches)
                consumed = position.skip_batches
            for batch in batches:
                loss = self.micro_step(batch)
                consumed += 1
                loss_sum += loss.detach().float()
                micro_batches += 1
                tokens += self.task.num_tokens(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                position.step += 1
                self.after_optimizer_step(loss_sum, micro_batches)
                progress.update(1)

                if position.step % args.logging_steps == 0 or position.step == self.max_train_steps:
                    mean_loss = accelerator.reduce(loss_sum / micro_batches, reduction="mean").item()
                    elapsed = time.time() - window_start
                    record = {"step": position.step, "epoch": position.epoch, "loss": mean_loss,
                              "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(elapsed, 1e-9),
                              "elapsed_s": time.time() - self.start_time}
                    if self.grad_norm is not None:
                        record["grad_norm"] = float(self.grad_norm)
                    self.log(record)
                    progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    loss_sum.zero_()
                    micro_batches = tokens = 0
                    window_start = time.time()

                paused = time.time()  # evaluation and checkpointing do not count against tokens/s
                if args.eval_steps and position.step % args.eval_steps == 0:
                    self.track(self.evaluate())
                if args.checkpointing_steps and position.step % args.checkpointing_steps == 0:
                    self.save_checkpoint(consumed)
                window_start += time.time() - paused
                if self.stop_early():
                    self.max_train_steps = position.step
                if position.step >= self.max_train_steps:
                    break
            position.epoch += 1
        progress.close()

    def finish(self) -> TrainingResult:
        """Final evaluation, the saved model (the best evaluated one with --metric_for_best_model), results.json."""
        args, accelerator, position = self.args, self.accelerator, self.position
        if self.last_eval_step != position.step:
            self.evaluate()
            if args.metric_for_best_model is not None:
                self.track(self.metrics)
        final_model, metrics = self.evaluated_model, self.metrics
        if args.metric_for_best_model is not None:
            if position.best_step is None:
                raise ValueError(f"no evaluation gave a finite {self.tracked}: there is no best model to save")
            best = load_best_model(final_model, self.best_dir)  # the weights of the best evaluation, and its metrics
            metrics = best["metrics"]
            accelerator.print(f"best {self.tracked} {best['value']:.4f} at step {best['step']} of {position.step}: "
                              "that model is the one saved")
        epochs = position.epoch if self.num_epochs is None else min(position.epoch, self.num_epochs)
        run_info = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "steps": position.step,
            "epochs": epochs,
            "wall_time_s": round(time.time() - self.start_time, 1),
            "hardware": _hardware(accelerator),
            "mixed_precision": args.mixed_precision,
            "num_parameters": sum(p.numel() for p in final_model.parameters()),
            "ema_decay": args.ema_decay,
            "resumed_from": str(self.checkpoint) if self.checkpoint is not None else None,
            **({"best_model": {"metric": self.tracked, "value": position.best_metric, "step": position.best_step}}
               if args.metric_for_best_model is not None else {}),
            "training_args": asdict(args),
        }
        if hasattr(final_model, "save_pretrained"):
            final_model.save_pretrained(self.output_dir, is_main_process=accelerator.is_main_process)
        else:
            accelerator.save_model(final_model, self.output_dir)
        if accelerator.is_main_process:
            self.task.save_final(final_model, self.output_dir, metrics, run_info)
            (self.output_dir / RESULTS_FILE).write_text(json.dumps({"metrics": metrics, **run_info}, indent=2))
            headline = [name for name, value in metrics.items() if isinstance(value, float)
                        and (name.endswith("bits_per_byte") or name in ("exact_accuracy", "cell_accuracy"))]
            scores = ", ".join(f"{name} {metrics[name]:.4f}" for name in headline or list(metrics)[:3])
            accelerator.print(f"done: {position.step} steps in {run_info['wall_time_s']:.0f} s; model saved to "
                              f"{self.output_dir}; final {scores}", flush=True)

        # Clean DDP exit: drop every reference to the wrapped model and optimizer before tearing down the process
        # group, or gloo occasionally aborts at exit (see docs/ reference notes on the teardown flake).
        accelerator.wait_for_everyone()
        self.model = self.optimizer = self.scheduler = self.train_dataloader = self.checkpointed = None
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
        return TrainingResult(model=final_model, metrics=metrics, completed_steps=position.step, run_info=run_info)


def run_training(args: TrainingArguments, task: TrainingTask) -> TrainingResult:
    """Train `task`'s model as `args` says; save the final model in args.output_dir. See the module doc."""
    run = _TrainingRun(args, task)  # accelerator, model, data, optimizer, schedule, EMA
    run.resume()
    run.train()
    return run.finish()


__all__ = [
    "TrainingArguments", "TrainingTask", "TrainingResult", "run_training", "parse_args", "process_state", "load_config",
    "init_weights_from",
    "parameter_groups", "save_checkpoint", "load_checkpoint", "validate_checkpoint", "find_latest_checkpoint",
    "resolve_checkpoint", "list_checkpoints", "remove_partial_checkpoints",
]
