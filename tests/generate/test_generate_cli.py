"""generate/generate.py and the library under it (trm_lm.generation, trm_lm.inspection), on a tiny saved model.

Most runs call the CLI's main() in this process (loading torch once); two run it as a real subprocess
to check exit codes, stdin and that errors are one line without a traceback.
"""

import io
import math
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch
from helpers import REPO_ROOT, run_cli
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel, TopPLogitsWarper, set_seed

from trm_lm.generation import (
    GenerationSettings,
    NumpySortTopP,
    encode_prompt,
    generate_text,
    inspect_generation,
    stream_generate,
)
from trm_lm.inspection import format_trace_table

PROMPT = "Once upon a time"








def prompt_ids(tokenizer, prompt=PROMPT):
    """What the model should see: BOS, then the prompt (how training presents every document)."""
    return torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]])


def sampling_config(tokenizer, max_new_tokens, temperature, top_p=0.95):
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)


def test_stream_equals_non_stream_and_plain_generate(cli, capsys, tiny_model_dir, model_and_tokenizer):
    args = ["--model", tiny_model_dir, "--prompt", PROMPT, "--max_new_tokens", 24, "--temperature", 0.9,
            "--seed", 3, "--device", "cpu"]
    code, plain, err = run_cli(cli, capsys, *args)
    assert code == 0, err
    code, streamed, err = run_cli(cli, capsys, *args, "--stream")
    assert code == 0, err
    assert streamed == plain
    code, compiled, err = run_cli(cli, capsys, *args, "--stream", "--compile")  # one torch.compile'd step
    assert code == 0, err
    assert compiled == plain
    # ... and both are what model.generate samples with the same seed, written here independently
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer)
    set_seed(3)
    sequence = model.generate(ids, generation_config=sampling_config(tokenizer, 24, 0.9))[0, ids.shape[1]:]
    expected = PROMPT + tokenizer.decode(sequence, skip_special_tokens=True)
    assert plain == expected + "\n"
    assert len(expected) > len(PROMPT)
    # a different seed samples something else (the seed is really used)
    code, other, _ = run_cli(cli, capsys, *args[:-4], "--seed", 4, "--device", "cpu")
    assert code == 0 and other != plain


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999])
def test_numpy_sorted_top_p_keeps_exactly_the_tokens_transformers_keeps(top_p):
    generator = torch.Generator().manual_seed(int(top_p * 1000))
    scores = torch.randn(16, 4096, generator=generator) * torch.linspace(0.5, 8.0, 16)[:, None]  # flat to peaked
    scores[3, ::7] = -math.inf  # rows already cut by top-k
    scores[5, :2000] = scores[5].min() - 1  # a large tie, all of it below the cut
    for keep in (1, 3):
        expected = TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, scores.clone())
        got = NumpySortTopP(top_p, min_tokens_to_keep=keep)(None, scores.clone())
        assert torch.equal(got, expected)
        assert torch.isfinite(got).sum(-1).min() >= keep
    assert torch.equal(NumpySortTopP(top_p)(None, scores.double()), TopPLogitsWarper(top_p)(None, scores.double()))


def test_each_generation_samples_with_its_own_generator(model_and_tokenizer):
    """No process-global seeding: seeded generations running at the same time in threads (plain, streamed and
    traced) give what they give one after the other, torch's global RNG is neither read nor changed, and an
    unseeded generation is random even right after torch.manual_seed."""
    model, tokenizer = model_and_tokenizer
    settings = [GenerationSettings(max_new_tokens=30, temperature=1.0, seed=seed) for seed in (1, 2, 3, 4, 5, 6)]

    def run(i):
        if i % 3 == 0:
            return generate_text(model, tokenizer, PROMPT, settings[i]).token_ids[0]
        if i % 3 == 1:
            stream = stream_generate(model, tokenizer, PROMPT, settings[i])
            try:
                while True:
                    next(stream)
            except StopIteration as finished:
                return finished.value.token_ids[0]
        return [t.token_id for t in generate_text(model, tokenizer, PROMPT, settings[i], trace_top_k=2).traces]

    sequential = [run(i) for i in range(len(settings))]
    assert len({tuple(ids) for ids in sequential}) == len(settings)  # the seeds really differ
    state = torch.get_rng_state()
    together = [None] * len(settings)
    barrier = threading.Barrier(len(settings))

    def in_thread(i):
        barrier.wait()
        together[i] = run(i)

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == sequential
    assert torch.equal(torch.get_rng_state(), state)
    unseeded = []
    for _ in range(2):
        torch.manual_seed(0)  # what a seeded generation used to leave behind
        unseeded.append(generate_text(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=30,
                                                                                   temperature=1.0)).token_ids)
    assert unseeded[0] != unseeded[1]


def test_stream_yields_pieces_as_they_come(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = GenerationSettings(max_new_tokens=40, temperature=1.0, seed=0)
    stream = stream_generate(model, tokenizer, PROMPT, settings)
    pieces = []
    with pytest.raises(StopIteration) as finished:
        while True:
            pieces.append(next(stream))
    result = finished.value.value
    assert len(pieces) > 1  # streamed, not delivered at the end in one piece
    assert "".join(pieces) == result.text == generate_text(model, tokenizer, PROMPT, settings).text
    assert len(result.token_ids[0]) == 40 or result.token_ids[0][-1] == tokenizer.eos_token_id


def expected_traces(model, tokenizer, seed, halt_threshold, max_new_tokens, temperature):
    """model.inspect() with the CLI's settings, decoded here (not by trm_lm.inspection)."""
    set_seed(seed)
    traces = model.inspect(prompt_ids(tokenizer), top_k=3, halt_threshold=halt_threshold,
                           generation_config=sampling_config(tokenizer, max_new_tokens, temperature))
    decode = lambda i: tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
    return [replace(t, token=decode(t.token_id),
                    step_predictions=[replace(p, top_tokens=[decode(i) for i in p.top_ids]) for p in t.step_predictions])
            for t in traces]


@pytest.mark.parametrize("stream", [False, True])
def test_show_steps_matches_model_inspect(cli, capsys, tiny_model_dir, model_and_tokenizer, stream):
    model, tokenizer = model_and_tokenizer
    args = ["--model", tiny_model_dir, "--prompt", PROMPT, "--max_new_tokens", 20, "--temperature", 0.9,
            "--seed", 5, "--halt_threshold", 0.5, "--show_steps", "--device", "cpu"] + (["--stream"] if stream else [])
    code, out, err = run_cli(cli, capsys, *args)
    assert code == 0, err
    traces = expected_traces(model, tokenizer, seed=5, halt_threshold=0.5, max_new_tokens=20, temperature=0.9)
    steps = [trace.steps_used for trace in traces]
    assert set(steps) == {1, 2}, "the fixture's halt head should stop some tokens early at threshold 0.5"
    assert all(len(trace.step_predictions) == trace.steps_used for trace in traces)
    story, table = out.split("\n\n", 1)
    assert story == PROMPT + tokenizer.decode([t.token_id for t in traces], skip_special_tokens=True)
    assert table.rstrip("\n") == format_trace_table(traces)
    # the table really shows the numbers: one row per token with its step count and step-1 top-1 probability
    rows = table.splitlines()[1:-1]
    assert len(rows) == len(traces)
    for row, trace in zip(rows, traces):
        assert row.split()[0] == str(trace.position)
        assert f"{trace.step_predictions[0].top_probs[0]:.3f}" in row
    assert table.splitlines()[-1] == (f"{len(traces)} tokens (1 step: {steps.count(1)}, 2 steps: {steps.count(2)}; "
                                      f"mean {sum(steps) / len(steps):.2f} steps per token)")


def test_inspect_generation_follows_the_settings(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    traces = inspect_generation(model, tokenizer, PROMPT, max_new_tokens=12, top_k=2, supervision_steps=1,
                                temperature=0, halt_threshold=0)
    assert len(traces) == 12 or traces[-1].token_id == tokenizer.eos_token_id
    assert all(t.steps_used == 1 and len(t.step_predictions) == 1 for t in traces)
    assert all(len(p.top_ids) == len(p.top_tokens) == 2 for t in traces for p in t.step_predictions)
    # greedy: each token is the previous step's top-1 prediction
    assert all(t.token_id == t.step_predictions[-1].top_ids[0] for t in traces)
    with pytest.raises(ValueError, match="unknown sampling setting"):
        inspect_generation(model, tokenizer, PROMPT, temprature=1.0)


def test_long_prompt_is_cut_from_the_left_with_a_warning(cli, capsys, tiny_model_dir, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompt = "Lily saw a big red ball in the park. " * 20
    total = 1 + len(tokenizer(prompt)["input_ids"])
    context, new = model_and_tokenizer[0].config.max_position_embeddings, 8
    assert total > context
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", prompt, "--max_new_tokens", new,
                             "--temperature", 0, "--device", "cpu")
    assert code == 0
    assert f"dropped its first {total - (context - new)}" in err and err.startswith("warning: ")
    assert out.startswith(prompt)
    encoded = encode_prompt(tokenizer, prompt, new, context)
    assert encoded.input_ids.shape[1] == context - new
    assert encoded.input_ids[0, 0] == tokenizer.bos_token_id  # BOS kept, the prompt's start dropped
    assert encoded.input_ids[0, -5:].tolist() == tokenizer(prompt)["input_ids"][-5:]


def test_several_samples(cli, capsys, tiny_model_dir):
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", PROMPT, "--max_new_tokens", 10,
                             "--num_return_sequences", 3, "--seed", 0, "--device", "cpu")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == [
        f"--- sample {i} of 3 ---" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def broken_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    no_config = root / "no_config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    pickle_only = root / "pickle_only"
    shutil.copytree(tiny_model_dir, pickle_only)
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    return {"missing": root / "does-not-exist", "no_config": no_config, "pickle_only": pickle_only,
            "truncated": truncated, "no_tokenizer": no_tokenizer}


@pytest.mark.parametrize("case, message", [
    ("missing", "model directory not found"),
    ("no_config", "has no config.json"),
    ("pickle_only", "only pickle weights (pytorch_model.bin); refusing"),
    ("truncated", "not a valid safetensors file (truncated or corrupt?)"),
    ("no_tokenizer", "has no tokenizer"),
])
def test_bad_model_folders(cli, capsys, broken_dirs, case, message):
    code, out, err = run_cli(cli, capsys, "--model", broken_dirs[case], "--prompt", PROMPT, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", " \n "], "the prompt is empty"),
    (["--prompt", "Tom \udcff"], "not valid UTF-8"),  # how Python hands over undecodable argv bytes
    (["--prompt", PROMPT, "--temperature", "nan"], "temperature must be a finite number"),
    (["--prompt", PROMPT, "--temperature", "-0.5"], "temperature must be >= 0"),
    (["--prompt", PROMPT, "--top_p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", PROMPT, "--top_k", "-1"], "top_k must be >= 0"),
    (["--prompt", PROMPT, "--repetition_penalty", "0"], "repetition_penalty must be > 0"),
    (["--prompt", PROMPT, "--max_new_tokens", "0"], "max_new_tokens must be in [1, 4096]"),
    (["--prompt", PROMPT, "--max_new_tokens", "127"], "leaves no room for a prompt in the model's context of 128"),
    (["--prompt", PROMPT, "--halt_threshold", "1.5"], "halt_threshold must be in [0, 1]"),
    (["--prompt", PROMPT, "--max_new_tokens", "8", "--supervision_steps", "5"], "supervision_steps must be in [1, 4]"),
    (["--prompt", PROMPT, "--num_return_sequences", "2", "--temperature", "0"], "greedy decoding"),
    (["--prompt", PROMPT, "--max_new_tokens", "8", "--num_return_sequences", "2", "--stream"],
     "streaming shows one sequence"),
    (["--prompt", PROMPT, "--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "device"),
])
def test_bad_input_is_one_clear_line(cli, capsys, tiny_model_dir, flags, message):
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, *flags)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_stdin_prompt_must_be_utf8(cli, capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Tom saw \xff\xfe a cat\n")))
    code, _, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", "-")
    assert code == 2 and "not valid UTF-8: byte 0xff at offset 8" in err


def test_default_model_missing_says_to_pass_model(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)  # a checkout without checkpoints/
    code, _, err = run_cli(cli, capsys, "--prompt", PROMPT)
    assert code == 2
    assert "checkpoints/trm-tinystories-small does not exist: pass --model" in err


def test_settings_reject_nan_and_wrong_types():
    for bad in (dict(top_p=math.nan), dict(max_new_tokens=2.5), dict(seed=-1), dict(temperature="hot"),
                dict(max_new_tokens=True), dict(repetition_penalty=math.inf), dict(share_step_cache="yes")):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
    assert GenerationSettings(max_new_tokens=64.0).max_new_tokens == 64  # sliders send floats


def run_script(*args, stdin=b""):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "generate" / "generate.py"), *map(str, args)],
                          input=stdin, capture_output=True, env=env, cwd=REPO_ROOT.parent, timeout=120)


def test_subprocess_reads_stdin_and_prints_the_story(tiny_model_dir):
    done = run_script("--model", tiny_model_dir, "--prompt", "-", "--max_new_tokens", 6, "--temperature", 0,
                      stdin="Lily and Tom\n".encode())
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("Lily and Tom")  # the newline echo adds is not part of the prompt
    assert done.stderr.decode() == ""


def test_subprocess_error_has_no_traceback(broken_dirs):
    done = run_script("--model", broken_dirs["truncated"], "--prompt", PROMPT)
    err = done.stderr.decode()
    assert done.returncode == 2
    assert "Traceback" not in err and err.count("\n") == 1 and "truncated or corrupt" in err


def test_closing_a_stream_early_stops_the_generation_thread(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    stream = stream_generate(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=120, temperature=1.0))
    next(stream)
    stream.close()  # what Gradio does when the page goes away or Stop is pressed
    assert not [t for t in threading.enumerate() if t.name == "trm-lm-generate"]


def test_any_causal_lm_generates_but_trm_controls_are_refused(cli, capsys, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    code, out, err = run_cli(cli, capsys, "--model", tmp_path, "--prompt", PROMPT, "--max_new_tokens", 5,
                             "--stream", "--device", "cpu")
    assert code == 0 and out.startswith(PROMPT), err
    for flags in (["--halt_threshold", "0.5"], ["--show_steps"]):
        code, _, err = run_cli(cli, capsys, "--model", tmp_path, "--prompt", PROMPT, "--max_new_tokens", 5, *flags)
        assert code == 2 and "TRM" in err
