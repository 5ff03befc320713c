"""The app's /generate endpoint against bad input (gradio_client and the raw REST API, one app on 127.0.0.1 for
the module; after every bad request a good one must still work), and a reduced run of benchmarks/app_load.py.
Cases already in test_app.py are not repeated here.
"""

import json
import math
import re

import pytest
from helpers import big_prompt, load_script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # gradio's own pandas use

PROMPT = "Once upon a time"


# ----------------------------------------------------------------------------------------------------
# the app's /generate endpoint

#        temperature, top_p, max_new_tokens, halt_threshold, supervision_steps, seed
GOOD = (0.9, 0.95, 3, 0.5, 2, 0)
SETTING_NAMES = ("temperature", "top_p", "max_new_tokens", "halt_threshold", "supervision_steps", "seed")


def settings_with(**changes) -> tuple:
    return tuple(changes.get(name, value) for name, value in zip(SETTING_NAMES, GOOD))


def assert_still_serves(client):
    story, depth, _, summary = client.predict(PROMPT, *GOOD, api_name="/generate")
    assert story.startswith(PROMPT) and depth[0]["token"] == PROMPT and "new tokens" in summary


def app_error():
    from gradio_client.exceptions import AppError

    return AppError


@pytest.mark.parametrize("prompt, message", [
    (big_prompt(1_000_000), "The prompt is 1,000,000 characters long; the limit is 4,000."),
    (None, "The prompt is empty"),
    ("\u3000\t\r\n", "The prompt is empty"),
    ("<|endoftext|>", "the prompt '<|endoftext|>' encodes to no tokens"),
])
def test_app_bad_prompt_is_refused_and_the_app_survives(client, prompt, message):
    with pytest.raises(app_error(), match=re.escape(message)):
        client.predict(prompt, *GOOD, api_name="/generate")
    assert_still_serves(client)


@pytest.mark.parametrize("prompt", [123, 4.5, ["a", "b"], {"a": 1}, True])
def test_app_non_string_prompt_is_text_or_refused(client, prompt):
    """Gradio's Textbox turns what the client sends into text; either that text is continued or it is refused."""
    try:
        story, *_ = client.predict(prompt, *GOOD, api_name="/generate")
    except app_error():
        pass
    else:
        assert story.startswith(str(prompt)) and len(story) > len(str(prompt))
    assert_still_serves(client)


@pytest.mark.parametrize("changes, message", [
    (dict(temperature=-1), "Value -1 is less than minimum value 0.0."),
    (dict(top_p=0.0), "Value 0.0 is less than minimum value 0.05."),
    (dict(max_new_tokens=0), "Value 0 is less than minimum value 1."),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number, got 2.5"),
    (dict(halt_threshold=1.5), "Value 1.5 is greater than maximum value 1.0."),
    (dict(supervision_steps=1.5), "supervision_steps must be a whole number, got 1.5"),
    (dict(seed=2**40), "seed must be in [0, 2**32), got 1099511627776"),
    # gradio's own input checks fail on these before the app sees them: an error, whatever its words
    (dict(temperature="hot"), ""),
    (dict(top_p=None), ""),
    (dict(seed="x"), ""),
    pytest.param(dict(temperature=1e-40), "temperature", id="temperature-underflow"),
])
def test_app_bad_settings_are_refused_and_the_app_survives(client, changes, message):
    with pytest.raises(app_error()) as raised:
        client.predict(PROMPT, *settings_with(**changes), api_name="/generate")
    assert message in str(raised.value)
    assert_still_serves(client)


def call_rest(url: str, data: list) -> tuple[str, object]:
    """The REST API gradio serves next to the client's (POST the inputs, then read the event stream): the body is
    written by json.dumps, which sends NaN and Infinity as JSON literals, as any non-Python client may.
    Returns (the final event, its data)."""
    import httpx

    body = json.dumps({"data": data})
    posted = httpx.post(url + "gradio_api/call/generate", content=body, timeout=30,
                        headers={"Content-Type": "application/json"})
    posted.raise_for_status()
    stream = httpx.get(url + f"gradio_api/call/generate/{posted.json()['event_id']}", timeout=60).text
    events = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
    datas = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
    return events[-1], json.loads(datas[-1])


@pytest.mark.parametrize("name", ["temperature", "top_p", "max_new_tokens", "halt_threshold", "supervision_steps"])
def test_app_nan_settings_over_rest_get_a_clear_message(app, client, name):
    # gradio_client refuses to send NaN (strict JSON); the REST endpoint takes it, and the app must say what is wrong
    event, data = call_rest(app[0], [PROMPT, *settings_with(**{name: math.nan})])
    assert event == "error" and data["error"] == f"{name} must be a finite number, got nan"
    assert_still_serves(client)


@pytest.mark.parametrize("data, message", [
    ([PROMPT, *settings_with(seed=math.nan)], None),  # gradio's Number rounding fails first
    ([PROMPT, *settings_with(temperature=math.inf)], "Value inf is greater than maximum value 2.0."),
    (["Tom \ud800", *GOOD], "the prompt is not valid UTF-8 (undecodable input at character 4)"),
    ([PROMPT], None),  # too few inputs
    ([], None),
])
def test_app_malformed_rest_calls_fail_and_the_app_survives(app, client, data, message):
    event, payload = call_rest(app[0], data)
    assert event == "error"
    if message is not None:
        assert payload["error"] == message
    assert_still_serves(client)


# ----------------------------------------------------------------------------------------------------
# bounded load on the app (benchmarks/app_load.py, reduced)


def test_app_load_benchmark_reduced(tiny_model_dir, tmp_path):
    pytest.importorskip("gradio_client")
    app_load = load_script("benchmarks/app_load.py")
    result = app_load.main(["--model", str(tiny_model_dir), "--users", "1", "4", "--requests_per_user", "2",
                            "--max_new_tokens", "8", "--timeout", "240", "--out_dir", str(tmp_path), "--device", "cpu"])
    assert [level["users"] for level in result["levels"]] == [1, 4] and result["server_concurrency"] == 4
    for level, sent in zip(result["levels"], (2, 8)):
        assert level["completed"] == sent and level["failed"] == 0, level["errors"]
        latency = level["latency_s"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["max"] <= level["wall_s"]
        assert level["new_tokens"] > 0 and level["tokens_per_s"] > 0
    memory = result["server_rss_mb"]
    assert memory["ready"] > 50  # a real server process with torch and a model in it was measured
    assert memory["peak"] >= memory["after"] > 0
    assert result["rss_growth_mb"] < 300  # generous: 10 short generations must not grow the server by much
    assert not app_load.process_alive(result["server_pid"])  # it stopped by itself
    assert json.loads((tmp_path / "app_load.json").read_text()) == result
    table = (tmp_path / "app_load.md").read_text()
    assert "| users |" in table and "\n| 4 | 8 / 8 |" in table
