"""What the recursion did for every generated token, laid out for people: text tables and summaries.

    traces = inspect_generation(model, tokenizer, "Once upon a time", max_new_tokens=20, halt_threshold=0.5)
    print(format_trace_table(traces))

The traces come from `TRMForCausalLM.inspect` (one TokenTrace per generated token, decoded when it is given
the tokenizer), reached through `trm_lm.generation` (`generate_text` / `stream_generate` with
`trace_top_k`, or `trm_lm.generation.inspect_generation`) or the app's batched decoder. This module only presents them: the
CLI's `--show_steps` table and the app's depth view and per-step table.
"""

from __future__ import annotations

from collections import Counter

from .modeling_trm import StepPrediction, TokenTrace


def steps_histogram(traces: list[TokenTrace]) -> dict[int, int]:
    """{steps used: number of tokens}, in step order."""
    return dict(sorted(Counter(trace.steps_used for trace in traces).items()))


def mean_steps(traces: list[TokenTrace]) -> float:
    """Supervision steps per token, on average (0 for no tokens)."""
    return sum(trace.steps_used for trace in traces) / max(1, len(traces))


def steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def steps_summary(traces: list[TokenTrace]) -> str:
    """"1 step: 13, 2 steps: 50" (or "none")."""
    counts = steps_histogram(traces)
    return ", ".join(f"{steps_label(steps)}: {count}" for steps, count in counts.items()) or "none"


def format_predictions(prediction: StepPrediction) -> str:
    """"' the' 0.412, ' a' 0.101, ..." for one step."""
    tokens = prediction.top_tokens if prediction.top_tokens is not None else [f"#{i}" for i in prediction.top_ids]
    return ", ".join(f"{token!r} {prob:.3f}" for token, prob in zip(tokens, prediction.top_probs))


def trace_rows(traces: list[TokenTrace]) -> tuple[list[str], list[list]]:
    """(headers, rows): one row per token, one column per supervision step ('' where the token had exited)."""
    max_steps = max((len(trace.step_predictions) for trace in traces), default=0)
    headers = ["position", "token", "steps"] + [f"step {s + 1} top-k" for s in range(max_steps)]
    rows = []
    for trace in traces:
        steps = [format_predictions(p) for p in trace.step_predictions]
        token = repr(trace.token) if trace.token is not None else f"#{trace.token_id}"
        rows.append([trace.position, token, trace.steps_used] + steps + [""] * (max_steps - len(steps)))
    return headers, rows


def format_trace_table(traces: list[TokenTrace]) -> str:
    """A plain-text table for the terminal: tokens are shown as Python literals, so spaces stay visible."""
    headers, rows = trace_rows(traces)
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = {0, 2}  # right-align position and steps
    lines = ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    return "\n".join(lines + [f"{len(traces)} tokens ({steps_summary(traces)}; "
                              f"mean {mean_steps(traces):.2f} steps per token)"])


__all__ = ["StepPrediction", "TokenTrace", "format_trace_table", "trace_rows",
           "format_predictions", "steps_histogram", "steps_label", "steps_summary", "mean_steps"]
