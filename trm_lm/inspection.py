"""What the recursion did for every generated token, in words: `model.inspect()` plus the tokenizer.

    traces = inspect_generation(model, tokenizer, "Once upon a time", max_new_tokens=20, halt_threshold=0.5)
    print(format_trace_table(traces))

`TRMForCausalLM.inspect` returns ids and probabilities; this module decodes them and lays them out for
the CLI (`generate.py --show_steps`) and the app (its depth view and per-step table).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from transformers import set_seed

from .generation import EncodedPrompt, GenerationSettings, check_trace_top_k, generate_kwargs, prepare_prompt

TOKEN_DECODE_KWARGS = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class StepPrediction:
    """The top-k next-token predictions after one supervision step."""

    step: int  # 1-based
    top_ids: list[int]
    top_tokens: list[str]
    top_probs: list[float]


@dataclass(frozen=True)
class TokenTrace:
    """One generated token and the supervision steps that produced it."""

    position: int  # index in prompt + generation (the prompt's BOS is position 0)
    token_id: int
    token: str  # decoded on its own (a byte of a multi-byte character shows as U+FFFD)
    steps_used: int  # < the model's supervision_steps when the token exited early (ACT)
    step_predictions: list[StepPrediction]  # one per step the token ran


def _decode_token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], **TOKEN_DECODE_KWARGS)


def traces_from_records(records: list[dict], tokenizer) -> list[TokenTrace]:
    """`model.inspect()` records -> TokenTraces with decoded tokens."""
    return [
        TokenTrace(
            position=record["position"],
            token_id=record["token_id"],
            token=_decode_token(tokenizer, record["token_id"]),
            steps_used=record["steps_used"],
            step_predictions=[
                StepPrediction(step=p["step"], top_ids=list(p["top_ids"]),
                               top_tokens=[_decode_token(tokenizer, i) for i in p["top_ids"]],
                               top_probs=[float(q) for q in p["top_probs"]])
                for p in record["step_predictions"]
            ],
        )
        for record in records
    ]


def inspect_generation(model, tokenizer, prompt: str | bytes | EncodedPrompt, max_new_tokens: int = 32,
                       top_k: int = 3, halt_threshold: float | None = None, supervision_steps: int | None = None,
                       seed: int | None = None, **sampling) -> list[TokenTrace]:
    """Generate from `prompt` and report, per generated token, the steps it used and the top-k after each step.

    top_k: predictions kept per step. halt_threshold: None = the model's config, 0 = off.
    sampling: temperature, top_p, repetition_penalty, and `sampling_top_k` (top-k *sampling*; named so
    because `top_k` here is the number of predictions shown). Unset ones take GenerationSettings' defaults.
    """
    if "sampling_top_k" in sampling:
        sampling["top_k"] = sampling.pop("sampling_top_k")
    try:
        settings = GenerationSettings(max_new_tokens=max_new_tokens, halt_threshold=halt_threshold,
                                      supervision_steps=supervision_steps, seed=seed, **sampling)
    except TypeError as error:  # an unknown keyword
        raise ValueError(f"unknown sampling setting: {error}") from error
    return trace_generation(model, tokenizer, prompt, settings, top_k=top_k)


def trace_generation(model, tokenizer, prompt: str | bytes | EncodedPrompt, settings: GenerationSettings,
                     top_k: int = 3) -> list[TokenTrace]:
    """inspect_generation with the settings given as one GenerationSettings (what the CLI uses)."""
    check_trace_top_k(model, top_k)
    if settings.num_return_sequences != 1:
        raise ValueError("inspection follows one sequence: use num_return_sequences=1")
    encoded = prepare_prompt(model, tokenizer, prompt, settings)
    kwargs = generate_kwargs(model, tokenizer, settings)
    input_ids = encoded.input_ids.to(model.device)
    if settings.seed is not None:
        set_seed(settings.seed)
    records = model.inspect(input_ids, top_k=top_k, attention_mask=torch.ones_like(input_ids), **kwargs)
    return traces_from_records(records, tokenizer)


def steps_histogram(traces: list[TokenTrace]) -> dict[int, int]:
    """{steps used: number of tokens}, in step order."""
    return dict(sorted(Counter(trace.steps_used for trace in traces).items()))


def steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def steps_summary(traces: list[TokenTrace]) -> str:
    """"1 step: 13, 2 steps: 50" (or "none")."""
    counts = steps_histogram(traces)
    return ", ".join(f"{steps_label(steps)}: {count}" for steps, count in counts.items()) or "none"


def format_predictions(prediction: StepPrediction) -> str:
    """"' the' 0.412, ' a' 0.101, ..." for one step."""
    return ", ".join(f"{token!r} {prob:.3f}" for token, prob in zip(prediction.top_tokens, prediction.top_probs))


def trace_rows(traces: list[TokenTrace]) -> tuple[list[str], list[list]]:
    """(headers, rows): one row per token, one column per supervision step ('' where the token had exited)."""
    max_steps = max((len(trace.step_predictions) for trace in traces), default=0)
    headers = ["position", "token", "steps"] + [f"step {s + 1} top-k" for s in range(max_steps)]
    rows = []
    for trace in traces:
        steps = [format_predictions(p) for p in trace.step_predictions]
        rows.append([trace.position, repr(trace.token), trace.steps_used] + steps + [""] * (max_steps - len(steps)))
    return headers, rows


def format_trace_table(traces: list[TokenTrace]) -> str:
    """A plain-text table for the terminal: tokens are shown as Python literals, so spaces stay visible."""
    headers, rows = trace_rows(traces)
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = {0, 2}  # right-align position and steps
    lines = ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    mean = sum(trace.steps_used for trace in traces) / max(1, len(traces))
    return "\n".join(lines + [f"{len(traces)} tokens ({steps_summary(traces)}; mean {mean:.2f} steps per token)"])


__all__ = ["StepPrediction", "TokenTrace", "inspect_generation", "trace_generation", "traces_from_records",
           "format_trace_table", "trace_rows", "format_predictions", "steps_histogram", "steps_label",
           "steps_summary"]
