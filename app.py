"""Gradio app: write a story with a Tiny Recursive Model and see how long it thought about each token.

    python app.py [--model DIR_OR_HUB_ID] [--puzzle_model DIR] [--host 127.0.0.1] [--port 7860]

The story streams in as it is generated. Then every generated token is coloured by the number of
supervision steps it ran: with a halt threshold, a token the model is already sure of exits after the
first step(s) (per-token ACT). The table under "Per-step predictions" lists the top predictions after
each step. Runs offline and local-only: analytics off, no share link, 127.0.0.1 unless --host says otherwise.
The same function is an API endpoint, `/generate` (gradio_client: `Client(url).predict(..., api_name="/generate")`).
The Puzzles tab solves a Sudoku with a grid TRM (--puzzle_model, default checkpoints/trm-sudoku6 when it exists)
and shows the grid after every supervision step as it is computed (puzzles/solve.py; endpoint `/solve_sudoku`).
Many users at once: their requests are decoded together in one batch (trm_lm/serving.py), so serving 16 users
costs little more than serving one; a seeded request gives the same story whoever else is being served.
"""

import argparse
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from puzzles.solve import SolveStep, SudokuSolver, default_solver_path, load_solver  # noqa: E402
from puzzles.sudoku import SudokuShape, format_sudoku, generate_puzzle  # noqa: E402
from trm_lm.generation import (  # noqa: E402
    TEST_TIME_DEPTH,
    GenerationSettings,
    context_length,
    default_model_path,
    encode_prompt,
    is_trm,
    load_model_and_tokenizer,
    one_line,
)
from trm_lm.inspection import mean_steps, steps_label, steps_summary, trace_rows  # noqa: E402
from trm_lm.serving import BatchedDecoder  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent
MAX_PROMPT_CHARS = 4000  # checked before tokenizing, so a pasted book cannot tie up the server
MAX_NEW_TOKENS_CAP = 512
PREDICTIONS_PER_STEP = 3
CONCURRENCY = 16  # requests served at once (gradio worker threads), all decoded in one batch
# Story updates while streaming: every update is an event through gradio's queue and the client's connection,
# which with many users costs more CPU than the decoding itself (16 users on 2 cores, 64 tokens each: p95
# latency 4.1 s at 10 updates a second each, 3.2 s at 40 a second in all, 2.7 s at 16: one run each of
# benchmarks/app_load.py).
# One user gets 10 a second (still reads as streaming); all users together at most --stream_updates_per_second.
STREAM_INTERVAL = 0.1
STREAM_UPDATES_PER_SECOND = 20
EXAMPLES = ["Once upon a time, there was a little dog named Max.", "Lily and Tom went to the park.",
            "The sun was hot, so the cat"]
# cool to hot: green = exited after the first step, dark red = ran every supervision step
DEPTH_COLOURS = ["#48bb78", "#ecc94b", "#ed8936", "#e53e3e", "#9b2c2c"]
# Puzzles tab: example boards from the project's generator with a seed no data build uses (builds spawn theirs
# from --seed, default 0), and a pause between step grids so the eye can follow the refinement
PUZZLE_EXAMPLE_SEED = 2025
NUM_PUZZLE_EXAMPLES = 3
PUZZLE_STEP_DELAY = 0.25
CHANGED_COLOUR = "#fde68a"  # amber: the digit differs from the previous step's
CLASH_COLOUR = "#fca5a5"  # red: the model's digit overwrites a clue
NO_SOLVER_NOTE = "No Sudoku solver is loaded: start the app with --puzzle_model DIR (a Sudoku grid TRM folder)."


def user_error(message: str) -> gr.Error:
    """A message for the user; not a server-side traceback (the server is fine)."""
    return gr.Error(message, print_exception=False)


# A slider's number box sets a typed value outside its range to the nearest end without a word; this says so.
# Capturing on the document sees the typed value before the slider clamps it.
RANGE_NOTE_JS = """
document.addEventListener('change', (event) => {
  const box = event.target;
  if (!(box instanceof HTMLInputElement) || box.type !== 'number' || box.value === '' || !box.closest('#component-0, .gradio-container')) return;
  const value = Number(box.value);
  const low = box.min === '' ? -Infinity : Number(box.min), high = box.max === '' ? Infinity : Number(box.max);
  if (value >= low && value <= high) { props.value = ''; return; }
  const block = box.closest('.block');
  const label = block && block.querySelector('label') ? block.querySelector('label').textContent.trim() : 'This setting';
  props.value = `<p>${label}: ${value} is outside ${box.min} to ${box.max}, so ${value > high ? box.max : box.min} is used.</p>`;
}, true);
"""


class UpdatePacer:
    """How often each story stream may update: at most one update every `interval` seconds, and at most
    `per_second` updates a second from all the streams under way together."""

    def __init__(self, interval: float = STREAM_INTERVAL, per_second: float = STREAM_UPDATES_PER_SECOND):
        self.min_interval, self.per_second = interval, per_second
        self.streams = 0
        self._lock = threading.Lock()

    @contextmanager
    def stream(self):
        """Count one stream while the block runs (a generator's block ends when gradio closes it)."""
        with self._lock:
            self.streams += 1
        try:
            yield self
        finally:
            with self._lock:
                self.streams -= 1

    @property
    def interval(self) -> float:
        return max(self.min_interval, self.streams / self.per_second)


def build_demo(model, tokenizer, *, max_new_tokens_cap: int = MAX_NEW_TOKENS_CAP,
               max_prompt_chars: int = MAX_PROMPT_CHARS, default_seed: int | None = None,
               max_batch_size: int = CONCURRENCY, stream_interval: float = STREAM_INTERVAL,
               stream_updates_per_second: float = STREAM_UPDATES_PER_SECOND,
               puzzle_solver: SudokuSolver | None = None, puzzle_note: str = NO_SOLVER_NOTE,
               puzzle_step_delay: float = PUZZLE_STEP_DELAY) -> gr.Blocks:
    """The app around a loaded model; `serve(demo, ...)` it (see main). `demo.decoder` is its BatchedDecoder.
    Without a `puzzle_solver` the Puzzles tab shows `puzzle_note` (why there is none) instead."""
    trm = is_trm(model)
    trained_steps = model.config.supervision_steps if trm else 1
    max_steps = TEST_TIME_DEPTH * trained_steps if trm else 1  # thinking longer than trained: up to 2x
    context = context_length(model)
    if context is not None:  # room for BOS and at least one prompt token
        max_new_tokens_cap = max(1, min(max_new_tokens_cap, context - 2))
    colour_map = {steps_label(s): DEPTH_COLOURS[round((s - 1) * (len(DEPTH_COLOURS) - 1) / max(1, max_steps - 1))]
                  for s in range(1, max_steps + 1)}

    decoder = BatchedDecoder(model, tokenizer, max_batch_size=max_batch_size)
    pacer = UpdatePacer(stream_interval, stream_updates_per_second)

    def generate(prompt, temperature, top_p, max_new_tokens, halt_threshold, supervision_steps, seed):
        """Stream the story; end with the depth view, the per-step table and a summary."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise user_error("The prompt is empty: type the beginning of a story, e.g. 'Once upon a time'.")
        if len(prompt) > max_prompt_chars:
            raise user_error(f"The prompt is {len(prompt):,} characters long; the limit is {max_prompt_chars:,}.")
        try:
            settings = GenerationSettings(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                halt_threshold=halt_threshold if trm else None, supervision_steps=supervision_steps if trm else None,
                seed=None if seed is None or seed < 0 else seed,
            )
            if settings.max_new_tokens > max_new_tokens_cap:
                raise ValueError(f"max new tokens must be at most {max_new_tokens_cap} here, "
                                 f"got {settings.max_new_tokens}")
            encoded = encode_prompt(tokenizer, prompt, settings.max_new_tokens, context)
            stream = decoder.submit(encoded, settings, trace_top_k=PREDICTIONS_PER_STEP if trm else 0)
        except ValueError as error:
            raise user_error(one_line(error)) from error
        notes = []
        if encoded.warning:
            gr.Warning(encoded.warning)
            notes.append(f"Note: {encoded.warning}.")
            # the story is what the model saw: the kept end of the prompt, marked as cut
            prompt = "…" + tokenizer.decode(encoded.input_ids[0].tolist(), skip_special_tokens=True)

        story = prompt
        # every update sends all four outputs: gr.skip() would make gradio build three components per update
        generating = ([], None, "Generating…")
        yield story, *generating
        last_update = time.monotonic()
        with pacer.stream():
            while True:
                try:
                    story += next(stream)
                except StopIteration as finished:
                    result = finished.value
                    break
                if time.monotonic() - last_update >= pacer.interval:
                    last_update = time.monotonic()
                    yield story, *generating

        if not trm:
            count = len(result.token_ids[0])
            yield story, [], None, " ".join(notes + [f"{count} new token{'' if count == 1 else 's'}."])
            return
        traces = result.traces
        depth = [(prompt, None)] + [(chip_text(trace.token), steps_label(trace.steps_used)) for trace in traces]
        headers, rows = trace_rows(traces)
        mean = mean_steps(traces)
        plural = "" if len(traces) == 1 else "s"
        summary = (f"{len(traces)} new token{plural}; supervision steps per token: {steps_summary(traces)} "
                   f"(mean {mean:.2f} of {max_steps}).")
        yield story, depth, {"headers": headers, "data": rows}, " ".join(notes + [summary])

    with gr.Blocks(title="Tiny Recursive Model", analytics_enabled=False) as demo:
        with gr.Tab("Story", id="story"):
            gr.Markdown("# Tiny Recursive Model: stories\nType the start of a story. Tokens are coloured by the "
                        "number of supervision steps (recursion depth) the model spent on them.")
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=3, value=EXAMPLES[0], elem_id="prompt")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                        stop = gr.Button("Stop", elem_id="stop-btn")
                    temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(1, max_new_tokens_cap, value=min(128, max(1, max_new_tokens_cap // 2)),
                                               step=1, label="Max new tokens", elem_id="max-new-tokens")
                    # on by default (the config's value, else 0.9): with it off every token runs every step
                    halt_threshold = gr.Slider(
                        0.0, 1.0, value=(model.config.halt_threshold or 0.9) if trm else 0.0, step=0.01, visible=trm,
                        elem_id="halt-threshold", label="Halt threshold (a token stops once P(halt) >= this; 0 = off)")
                    supervision_steps = gr.Slider(1, max(max_steps, 2), value=trained_steps, step=1, visible=trm,
                                                  label=f"Supervision steps (trained with {trained_steps}; up to "
                                                        f"{max_steps} thinks longer than trained)")
                    seed = gr.Number(value=-1 if default_seed is None else default_seed, precision=0,
                                     label="Seed (-1 = random)")
                    gr.HTML("", js_on_load=RANGE_NOTE_JS, elem_id="range-note")
                    gr.Examples(EXAMPLES, inputs=[prompt])
                with gr.Column(scale=2):
                    story = gr.Textbox(label="Story", lines=10, interactive=False, elem_id="story")
                    depth = gr.HighlightedText(label="Supervision steps per generated token", color_map=colour_map,
                                               show_legend=True, show_inline_category=False, elem_id="depth",
                                               visible=trm)
                    status = gr.Markdown(label="Summary", elem_id="status")
                    with gr.Accordion("Per-step predictions (top-3 after each supervision step)", open=False,
                                      visible=trm, elem_id="predictions-accordion"):
                        predictions = gr.Dataframe(label="Per-step predictions", interactive=False, wrap=True,
                                                   elem_id="predictions")
            event = run.click(generate, inputs=[prompt, temperature, top_p, max_new_tokens, halt_threshold,
                                                supervision_steps, seed],
                              outputs=[story, depth, predictions, status], api_name="generate")
            # the story so far stays; the summary says it was stopped instead of "Generating…" forever
            stop.click(lambda: "Stopped: the story above is as far as it got.", outputs=[status], cancels=[event],
                       queue=False)
        with gr.Tab("Puzzles", id="puzzles"):
            puzzle_tab(puzzle_solver, puzzle_note, puzzle_step_delay)
    demo.decoder = decoder
    return demo


def puzzle_tab(solver: SudokuSolver | None, note: str, step_delay: float) -> None:
    """The Puzzles tab's layout and its Solve event (inside a gr.Tab of build_demo)."""
    if solver is None:
        gr.Markdown(note, elem_id="puzzle-note")
        return
    size, trained = solver.shape.size, solver.trained_steps
    examples = example_puzzles(solver.shape)
    gr.Markdown(f"# Sudoku, step by step\nA {size}x{size} Sudoku solver (`{solver.name}`) refines its whole grid at "
                "every supervision step. Clues are **bold**, cells that changed since the previous step are amber, "
                "a clue the model overwrote is red (the clue struck through); the small number is the model's "
                "confidence (%), and faint digits are unsure ones. With halting on, it stops at the first step "
                f"whose P(halt) > {solver.halt_threshold:g} (the model's own belief that its grid is right).")
    with gr.Row():
        with gr.Column(scale=1):
            puzzle = gr.Textbox(label=f"Puzzle: {size * size} characters row by row, '.' or 0 = blank", lines=2,
                                value=examples[0], elem_id="puzzle")
            solve = gr.Button("Solve", variant="primary", elem_id="solve-btn")
            max_steps = gr.Slider(1, solver.max_allowed_steps, value=trained, step=1, elem_id="puzzle-max-steps",
                                  label=f"Max supervision steps (trained with {trained}; up to "
                                        f"{solver.max_allowed_steps} thinks longer)")
            halting = gr.Checkbox(value=solver.halts_by_default, elem_id="puzzle-halting",
                                  label=f"Halt at the first step with P(halt) > {solver.halt_threshold:g} (ACT)")
            gr.Examples(examples, inputs=[puzzle], label="Example boards (generated, seed "
                                                          f"{PUZZLE_EXAMPLE_SEED})")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="puzzle-status")
            boards = gr.HTML(elem_id="puzzle-steps")

    def solve_sudoku(text, steps, halt):
        yield from solve_updates(solver, text, steps, halt, step_delay)

    solve.click(solve_sudoku, inputs=[puzzle, max_steps, halting], outputs=[boards, status], api_name="solve_sudoku")


def example_puzzles(shape: SudokuShape, count: int = NUM_PUZZLE_EXAMPLES, seed: int = PUZZLE_EXAMPLE_SEED) -> list[str]:
    """`count` minimal unique-solution boards from the project's generator, the same at every start."""
    rng = np.random.default_rng(seed)
    return [format_sudoku(generate_puzzle(shape, rng)[0]) for _ in range(count)]


def solve_updates(solver: SudokuSolver, text: str, max_steps, halting: bool, step_delay: float = 0.0):
    """The Solve event: yield (HTML of every step's grid so far, status) after each supervision step, then the
    final summary. A bad puzzle or setting is a user error (gr.Error), not a server traceback."""
    try:
        puzzle = solver.parse(text)
        steps = solver.steps(puzzle, max_steps, halting)
    except ValueError as error:
        raise user_error(one_line(error)) from error
    done: list[SolveStep] = []
    for step in steps:
        if done and step_delay:
            time.sleep(step_delay)
        done.append(step)
        yield boards_html(done, puzzle, solver.shape), f"Step {step.step}…"
    result = solver.result(puzzle, done, max_steps, halting)
    yield boards_html(done, puzzle, solver.shape), (
        f"**Steps:** {result.steps_description()} · **valid Sudoku:** {'yes' if result.valid else 'no'} · "
        f"**consistent with the clues:** {result.clue_report()}")


def boards_html(steps: list[SolveStep], puzzle: np.ndarray, shape: SudokuShape) -> str:
    return ('<div class="sudoku-steps" style="display:flex;flex-wrap:wrap;gap:14px">'
            + "".join(board_html(step, puzzle, shape) for step in steps) + "</div>")


def board_html(step: SolveStep, puzzle: np.ndarray, shape: SudokuShape) -> str:
    """One step's grid as a table: clue cells bold, changed cells amber, overwritten clues red, other digits
    shaded by confidence (faint = unsure) with the confidence in % in small print; thick lines around boxes."""
    n, rows = shape.size, []
    for r in range(n):
        cells = []
        for c in range(n):
            digit, clue, confidence = int(step.grid[r, c]), int(puzzle[r, c]), float(step.confidence[r, c])
            changed, clash = bool(step.changed[r, c]), bool(clue) and digit != clue
            kinds = [kind for kind, on in (("clue", clue), ("changed", changed), ("clash", clash)) if on]
            background = CLASH_COLOUR if clash else CHANGED_COLOUR if changed else "#fff"
            box_edge = {"top": r % shape.box_rows == 0, "left": c % shape.box_cols == 0, "bottom": r == n - 1,
                        "right": c == n - 1}
            edges = "".join(f"border-{side}:{'2px solid #333' if thick else '1px solid #bbb'};"
                            for side, thick in box_edge.items())
            text = str(digit) if digit else "·"
            if clash:  # the model's digit, and the clue it replaced struck through
                body = f'<b>{text}</b><sub style="font-size:9px"><s>{clue}</s></sub>'
            elif clue:
                body = f'<b>{text}</b>'
            else:
                body = (f'<span style="opacity:{0.35 + 0.65 * confidence:.2f}">{text}</span>'
                        f'<sub style="font-size:9px;color:#666">{round(100 * confidence)}</sub>')
            cells.append(f'<td class="{" ".join(["cell", *kinds])}" title="confidence {confidence:.3f}" '
                         f'style="width:30px;height:30px;text-align:center;color:#111;background:{background};{edges}">'
                         f'{body}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    halts = " · halts" if step.halts else ""
    return (f'<figure class="sudoku-step" data-step="{step.step}" style="margin:0">'
            f'<figcaption style="font-size:13px">Step {step.step} · P(halt) {step.halt_probability:.2f} · '
            f'{int(step.changed.sum())} changed{halts}</figcaption>'
            f'<table style="border-collapse:collapse;font-size:16px">{"".join(rows)}</table></figure>')


def chip_text(token: str) -> str:
    """A token as the depth view shows it: a line break gets a visible "↵" before it, so that a newline
    token has a chip to colour and the story keeps its lines."""
    return token.replace("\n", "↵\n")


def serve(demo: gr.Blocks, concurrency: int = CONCURRENCY) -> gr.Blocks:
    """Queue `demo` as main does: `concurrency` requests in flight (decoded together), 64 more may wait."""
    return demo.queue(default_concurrency_limit=concurrency, max_size=64)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradio app for TRM story generation (local, offline)")
    parser.add_argument("--model", default=None,
                        help="model folder or Hugging Face Hub id (default: checkpoints/trm-tinystories-small)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help="requests served at once, decoded together in one batch (seeded results do not "
                             "depend on it)")
    parser.add_argument("--max_new_tokens_cap", type=int, default=MAX_NEW_TOKENS_CAP)
    parser.add_argument("--stream_updates_per_second", type=float, default=STREAM_UPDATES_PER_SECOND,
                        help="story updates a second from all streaming users together (each gets at most 10); "
                             "raise it on a machine with more cores")
    parser.add_argument("--seed", type=int, default=None, help="the seed box's initial value (default: random)")
    parser.add_argument("--puzzle_model", default=None,
                        help="Sudoku grid-model folder for the Puzzles tab (default: checkpoints/trm-sudoku6 "
                             "when it exists)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if args.concurrency < 1 or args.max_new_tokens_cap < 1:
            raise ValueError("--concurrency and --max_new_tokens_cap must be >= 1")
        if not args.stream_updates_per_second > 0:  # also NaN
            raise ValueError(f"--stream_updates_per_second must be > 0, got {args.stream_updates_per_second}")
        model, tokenizer = load_model_and_tokenizer(args.model or default_model_path(REPO_ROOT), device=args.device)
        # a solver asked for must load; the shipped default may be absent, then the Puzzles tab says so
        puzzle_solver = load_solver(args.puzzle_model, device=args.device) if args.puzzle_model else None
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    puzzle_note = NO_SOLVER_NOTE
    if puzzle_solver is None:
        try:
            puzzle_solver = load_solver(default_solver_path(REPO_ROOT, flag="--puzzle_model"), device=args.device)
        except (ValueError, OSError) as error:
            puzzle_note = f"No Sudoku solver: {one_line(error)}."
    demo = build_demo(model, tokenizer, max_new_tokens_cap=args.max_new_tokens_cap, default_seed=args.seed,
                      max_batch_size=args.concurrency, stream_updates_per_second=args.stream_updates_per_second,
                      puzzle_solver=puzzle_solver, puzzle_note=puzzle_note)
    # quiet: gradio's banner suggests a public share link, which this local app never makes; say where it is instead
    serve(demo, args.concurrency).launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                                         quiet=True, prevent_thread_lock=True)
    print(f"Serving the story and puzzle app on http://{args.host}:{demo.server_port}/ (Ctrl-C stops it)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.decoder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
