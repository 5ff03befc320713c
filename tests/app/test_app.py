"""app.py through its API endpoints (/generate, /solve_sudoku) with gradio_client, on 127.0.0.1, launched once for
the module; the Puzzles tab's handler also in-process."""

import contextlib
import re
import shutil

import gradio as gr
import pytest
import torch
from helpers import load_script, running_app, running_decoder, slow_down
from helpers import build_tiny_solver
from transformers import GenerationConfig, set_seed

from puzzles.solve import load_solver
from puzzles.sudoku import count_solutions
from trm_lm.generation import GenerationSettings, generate_text

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # gradio's own pandas use

PROMPT = "Once upon a time"
#           prompt, temperature, top_p, max_new_tokens, halt_threshold, supervision_steps, seed
SETTINGS = (0.9, 0.95, 20, 0.5, 2, 11)




def test_generate_returns_story_and_depth_matching_model_inspect(app, client):
    _, model, tokenizer = app
    story, depth, table, summary = client.predict(PROMPT, *SETTINGS, api_name="/generate")
    # the same generation, done here with model.inspect and the same seed
    temperature, top_p, max_new_tokens, halt_threshold, supervision_steps, seed = SETTINGS
    ids = [tokenizer.bos_token_id] + tokenizer(PROMPT)["input_ids"]
    set_seed(seed)
    traces = model.inspect(torch.tensor([ids]), top_k=3, halt_threshold=halt_threshold,
                           supervision_steps=supervision_steps,
                           generation_config=GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p,
                                                              top_k=0, max_new_tokens=max_new_tokens,
                                                              pad_token_id=tokenizer.pad_token_id))
    assert story == PROMPT + tokenizer.decode([t.token_id for t in traces], skip_special_tokens=True)
    assert len(story) > len(PROMPT)
    # depth view: the prompt unlabelled, then one entry per generated token labelled with its steps
    assert depth[0] == {"token": PROMPT, "class_or_confidence": None}
    labels = [entry["class_or_confidence"] for entry in depth[1:]]
    assert labels == [f"{t.steps_used} step" + ("s" if t.steps_used > 1 else "") for t in traces]
    assert {"1 step", "2 steps"} <= set(labels)  # halt threshold 0.5 stops some tokens after one step
    # per-step table: one row per token, the steps column agrees, and exited tokens have no step-2 cell
    assert table["headers"][:3] == ["position", "token", "steps"]
    rows = table["data"]
    assert [row[2] for row in rows] == [t.steps_used for t in traces]
    assert all((row[4] == "") == (row[2] == 1) for row in rows)
    assert f"{len(traces)} new tokens" in summary and "mean" in summary


def test_story_streams(app, client, monkeypatch):
    # a decoding step of 40 ms, so that 60 tokens take over two seconds: the app updates the story at most 10
    # times a second (the random fixture model emits many partial-UTF-8 byte tokens, which the streamer holds
    # back until a character is complete, so there are fewer pieces than tokens)
    _, model, _ = app
    slow_down(model, monkeypatch, 0.04)
    temperature, top_p, _, halt_threshold, supervision_steps, seed = SETTINGS
    job = client.submit(PROMPT, temperature, top_p, 60, halt_threshold, supervision_steps, seed, api_name="/generate")
    job.result(timeout=60)
    stories = [output[0] for output in job.outputs()]
    assert 3 <= len(stories) < 30  # several updates, not one answer at the end, nor one event per token
    assert all(later.startswith(earlier) for earlier, later in zip(stories, stories[1:]))


@pytest.mark.parametrize("prompt, message", [
    ("", "The prompt is empty"),
    ("   \n", "The prompt is empty"),
    ("x" * 100_000, "The prompt is 100,000 characters long; the limit is 4,000."),
])
def test_bad_prompts_get_a_clear_message(client, prompt, message):
    with pytest.raises(AppError, match=message):
        client.predict(prompt, *SETTINGS, api_name="/generate")


def test_out_of_range_settings_get_a_clear_message(client):
    with pytest.raises(AppError, match="greater than maximum"):
        client.predict(PROMPT, 0.9, 0.95, 10_000, 0.5, 2, 1, api_name="/generate")


def test_prompt_longer_than_context_is_cut_and_said(app, client):
    _, model, tokenizer = app
    prompt = "Tom ran to the park with his dog. " * 30  # under the character cap, over the 128-token context
    story, _, _, summary = client.predict(prompt, *SETTINGS, api_name="/generate")
    dropped = 1 + len(tokenizer(prompt)["input_ids"]) - (model.config.max_position_embeddings - SETTINGS[2])
    assert dropped > 0 and f"dropped its first {dropped}" in summary
    # the story shows what the model saw: "…" and the kept end of the prompt, then the new text
    kept = tokenizer.decode(tokenizer(prompt)["input_ids"][dropped:], skip_special_tokens=True)
    assert story.startswith("…" + kept) and prompt.endswith(kept) and len(kept) < len(prompt)


def test_concurrent_requests_are_decoded_together_and_each_gets_its_own_story(app, client):
    url, model, tokenizer = app
    decoder_batches = running_decoder(url).batch_sizes
    before = len(decoder_batches)
    jobs = [client.submit(f"{PROMPT} {i}", 0.9, 0.95, 12, 0.5, 2, i, api_name="/generate") for i in range(8)]
    results = [job.result(timeout=120) for job in jobs]  # all submitted before any is read
    assert max(decoder_batches[before:]) > 1  # several users in one forward pass
    for i, (story, depth, _, summary) in enumerate(results):
        assert story.startswith(f"{PROMPT} {i}") and len(depth) > 1 and "new tokens" in summary
        # what this seed gives alone, whoever else was decoded with it
        alone = generate_text(model, tokenizer, f"{PROMPT} {i}", GenerationSettings(
            max_new_tokens=12, temperature=0.9, top_p=0.95, halt_threshold=0.5, supervision_steps=2, seed=i))
        assert story == f"{PROMPT} {i}" + alone.text


def test_a_rejected_input_logs_no_traceback_on_the_server(client, capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match="The prompt is empty"):
        client.predict("", *SETTINGS, api_name="/generate")
    server = capfd.readouterr()
    assert "Traceback" not in server.err + server.out


def test_streams_share_an_update_budget_so_many_users_do_not_flood_the_server():
    pacer = load_script("app.py").UpdatePacer(interval=0.1, per_second=40)
    assert pacer.interval == 0.1
    with contextlib.ExitStack() as streams:
        for _ in range(4):
            streams.enter_context(pacer.stream())
        assert pacer.streams == 4 and pacer.interval == 0.1  # a few users: each at the full rate
        for _ in range(12):
            streams.enter_context(pacer.stream())
        assert pacer.streams == 16 and pacer.interval == pytest.approx(0.4)  # 16 x 2.5 = 40 updates a second
    assert pacer.streams == 0 and pacer.interval == 0.1
    with pytest.raises(RuntimeError), pacer.stream():  # a stream that fails still ends
        raise RuntimeError
    assert pacer.streams == 0


def test_newline_tokens_get_a_visible_chip():
    chip_text = load_script("app.py").chip_text
    assert chip_text("\n") == "↵\n" and chip_text(".\n\n") == ".↵\n↵\n" and chip_text(" the") == " the"


def test_main_refuses_a_missing_model(capsys, tmp_path):
    app_module = load_script("app.py")
    assert app_module.main(["--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: model directory not found: {tmp_path / 'nope'}\n"
    for bad in ("0", "-5", "nan"):
        assert app_module.main(["--model", str(tmp_path / "nope"), "--stream_updates_per_second", bad]) == 2
        assert capsys.readouterr().err == f"error: --stream_updates_per_second must be > 0, got {float(bad)}\n"


# ---- the Puzzles tab -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_module():
    return load_script("app.py")


@pytest.fixture(scope="module")
def solver(tiny_solver_dir):
    return load_solver(tiny_solver_dir)


def step_cells(html: str) -> list[list[tuple[set[str], str]]]:
    """Per step figure: its cells as (classes, shown digit), row by row."""
    figures = html.split('<figure class="sudoku-step"')[1:]
    return [[(set(classes.split()), re.sub(r"<sub.*?</sub>|<[^>]+>", "", body))
             for classes, body in re.findall(r'<td class="([^"]*)"[^>]*>(.*?)</td>', figure)] for figure in figures]


def test_puzzle_handler_streams_one_grid_per_step(app_module, solver, one_thread):
    puzzle_text = app_module.example_puzzles(solver.shape, count=1)[0]
    updates = list(app_module.solve_updates(solver, puzzle_text, 5, False))
    assert [status for _, status in updates[:-1]] == [f"Step {k}…" for k in range(1, 6)]  # one update per step
    assert [len(step_cells(html)) for html, _ in updates] == [1, 2, 3, 4, 5, 5]
    result = solver.solve(puzzle_text, 5, halting=False)
    html, summary = updates[-1]
    puzzle = result.puzzle.reshape(-1)
    for step, cells in zip(result.steps, step_cells(html)):
        grid, changed = step.grid.reshape(-1), step.changed.reshape(-1)
        assert [digit for _, digit in cells] == [str(d) if d else "·" for d in grid]
        assert [("clue" in kinds, "changed" in kinds) for kinds, _ in cells] == list(zip(puzzle != 0, changed))
        assert [("clash" in kinds) for kinds, _ in cells] == list((puzzle != 0) & (grid != puzzle))
        assert f"Step {step.step} · P(halt) {step.halt_probability:.2f} · {int(changed.sum())} changed</figcaption>" in html
    assert summary == (f"**Steps:** 5 of 5 (halting off) · **valid Sudoku:** {'yes' if result.valid else 'no'} · "
                       f"**consistent with the clues:** {result.clue_report()}")


def test_puzzle_handler_halts_when_the_model_says_so(app_module, tmp_path, one_thread):
    halting = load_solver(build_tiny_solver(tmp_path / "halts", halt_bias=4.0))
    puzzle_text = app_module.example_puzzles(halting.shape, count=1)[0]
    (html, status), (final_html, summary) = app_module.solve_updates(halting, puzzle_text, 6, True)
    assert status == "Step 1…" and final_html == html and "halts</figcaption>" in html
    assert summary.startswith("**Steps:** 1 of 6 (halted at step 1: P(halt) 0.98 > 0.5; 5 steps saved)")


@pytest.mark.parametrize("puzzle, max_steps, message", [
    ("", 3, "the puzzle is empty"),
    ("1" * 36, 3, "duplicate given 1 at row 1, column 2"),
    ("." * 81, 3, "the puzzle is a 9x9 board but the model"),
    ("." * 36, 7, "max_steps must be a whole number in 1..6"),
])
def test_bad_puzzles_are_user_errors(app_module, solver, puzzle, max_steps, message):
    with pytest.raises(gr.Error) as error:
        next(app_module.solve_updates(solver, puzzle, max_steps, True))
    assert message in error.value.message and not error.value.print_exception  # no server traceback


def test_example_boards_are_fixed_and_solvable(app_module, solver):
    examples = app_module.example_puzzles(solver.shape)
    assert examples == app_module.example_puzzles(solver.shape) and len(set(examples)) == 3
    assert all(count_solutions(solver.parse(board), solver.shape) == 1 for board in examples)


def test_puzzles_tab_without_a_solver_says_so_in_one_line(app_module, app, solver):
    _, model, tokenizer = app
    by_id = {}
    for kwargs in ({}, {"puzzle_solver": solver}):
        demo = app_module.build_demo(model, tokenizer, **kwargs)
        demo.decoder.close()
        by_id[bool(kwargs)] = {block.elem_id: block for block in demo.blocks.values() if block.elem_id}
    assert by_id[False]["puzzle-note"].value == app_module.NO_SOLVER_NOTE and "puzzle" not in by_id[False]
    assert "prompt" in by_id[False] and "generate-btn" in by_id[False]  # the story tab is all there
    assert "puzzle-note" not in by_id[True]
    assert by_id[True]["puzzle"].value == app_module.example_puzzles(solver.shape)[0]


class Built(Exception):
    """Raised instead of serving: main got as far as building the demo."""


def test_main_loads_the_shipped_solver_or_says_it_is_missing(app_module, tiny_model_dir, tiny_solver_dir, tmp_path,
                                                             monkeypatch, capsys):
    built = {}

    def build_demo(model, tokenizer, **kwargs):
        built.update(kwargs)
        raise Built

    monkeypatch.setattr(app_module, "build_demo", build_demo)
    monkeypatch.setattr(app_module, "REPO_ROOT", tmp_path)  # a checkout without checkpoints/trm-sudoku6
    with pytest.raises(Built):
        app_module.main(["--model", str(tiny_model_dir)])
    assert built["puzzle_solver"] is None
    assert built["puzzle_note"] == (f"No Sudoku solver: the shipped Sudoku solver {tmp_path}/checkpoints/trm-sudoku6 "
                                    "does not exist: pass --puzzle_model with a Sudoku model folder "
                                    "(train/train_puzzles.py --task sudoku writes one).")
    shutil.copytree(tiny_solver_dir, tmp_path / "checkpoints" / "trm-sudoku6")
    with pytest.raises(Built):
        app_module.main(["--model", str(tiny_model_dir)])
    assert built["puzzle_solver"].shape.size == 6
    # a solver asked for by name must load
    assert app_module.main(["--model", str(tiny_model_dir), "--puzzle_model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: model directory not found: {tmp_path / 'nope'}\n"


@pytest.fixture(scope="module")
def puzzle_client(tiny_model_dir, solver):
    with running_app(tiny_model_dir, puzzle_solver=solver, puzzle_step_delay=0.0) as (url, _, _):
        yield gradio_client.Client(url, verbose=False)


def test_solve_sudoku_endpoint_streams_and_rejects_bad_puzzles(puzzle_client, solver, capfd):
    board = "." * 36
    job = puzzle_client.submit(board, 4, False, api_name="/solve_sudoku")
    html, summary = job.result(timeout=60)
    assert summary.startswith("**Steps:** 4 of 4 (halting off)") and len(step_cells(html)) == 4
    assert [len(step_cells(update[0])) for update in job.outputs()][-5:] == [1, 2, 3, 4, 4]
    capfd.readouterr()
    with pytest.raises(AppError, match="duplicate given 2 at row 1, column 2"):
        puzzle_client.predict("22" + "." * 34, 4, True, api_name="/solve_sudoku")
    server = capfd.readouterr()
    assert "Traceback" not in server.err + server.out
