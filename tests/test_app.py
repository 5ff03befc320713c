"""app.py through its API endpoint (/generate) with gradio_client, on 127.0.0.1, launched once for the module."""

import pytest
import torch
from fixtures_model import app, client, load_script, running_app, running_decoder, slow_down, tiny_model_dir  # noqa: F401
from transformers import GenerationConfig, set_seed

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
    records = model.inspect(torch.tensor([ids]), top_k=3, halt_threshold=halt_threshold,
                            supervision_steps=supervision_steps,
                            generation_config=GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p,
                                                               top_k=0, max_new_tokens=max_new_tokens,
                                                               pad_token_id=tokenizer.pad_token_id))
    assert story == PROMPT + tokenizer.decode([r["token_id"] for r in records], skip_special_tokens=True)
    assert len(story) > len(PROMPT)
    # depth view: the prompt unlabelled, then one entry per generated token labelled with its steps
    assert depth[0] == {"token": PROMPT, "class_or_confidence": None}
    labels = [entry["class_or_confidence"] for entry in depth[1:]]
    assert labels == [f"{r['steps_used']} step" + ("s" if r["steps_used"] > 1 else "") for r in records]
    assert {"1 step", "2 steps"} <= set(labels)  # halt threshold 0.5 stops some tokens after one step
    # per-step table: one row per token, the steps column agrees, and exited tokens have no step-2 cell
    assert table["headers"][:3] == ["position", "token", "steps"]
    rows = table["data"]
    assert [row[2] for row in rows] == [r["steps_used"] for r in records]
    assert all((row[4] == "") == (row[2] == 1) for row in rows)
    assert f"{len(records)} new tokens" in summary and "mean" in summary


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


def test_newline_tokens_get_a_visible_chip():
    chip_text = load_script("app.py").chip_text
    assert chip_text("\n") == "↵\n" and chip_text(".\n\n") == ".↵\n↵\n" and chip_text(" the") == " the"


def test_main_refuses_a_missing_model(capsys, tmp_path):
    app_module = load_script("app.py")
    assert app_module.main(["--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: model directory not found: {tmp_path / 'nope'}\n"
