"""Fuzz-style robustness of the public entry points: bad input gets a clear error, and the process survives it.

Covered: generate/generate.py (its main() in this process, plus real subprocesses for stdin), the app's /generate
endpoint (gradio_client and the raw REST API, against one app on 127.0.0.1 for the module; after every bad
request a good one must still work), trm_lm.data file reading, TRMConfig / AutoConfig loading, and a reduced run
of benchmarks/app_load.py. The inputs are a small fixed set (random bytes come from a seeded generator): no
open-ended fuzzing, so every run checks the same cases. Cases already in test_generate_cli.py, test_app.py,
test_data.py and test_model.py are not repeated here.

"""

import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_model import REPO_ROOT, TINY_CONTEXT, app, cli, client, load_script, running_app, tiny_model_dir  # noqa: F401
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from trm_lm import TRMConfig
from trm_lm.data import load_text_datasets, read_documents
from trm_lm.generation import GenerationSettings, generate_text, load_model_and_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # gradio's own pandas use

PROMPT = "Once upon a time"


# ----------------------------------------------------------------------------------------------------
# generate CLI, in this process




def run_cli(cli, capsys, *args):
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, message):
    assert code == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err




@pytest.mark.parametrize("flags, message", [
    (["--prompt", "\t\r\n\u3000 "], "the prompt is empty"),  # \u3000 (ideographic space) is whitespace too
    (["--prompt", "<|endoftext|>"], "encodes to no tokens"),  # only a special token: nothing to continue
    (["--prompt", PROMPT, "--temperature", "inf"], "temperature must be a finite number"),
    (["--prompt", PROMPT, "--temperature=-inf"], "temperature must be a finite number"),
    (["--prompt", PROMPT, "--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", PROMPT, "--top_p", "-0.1"], "top_p must be in (0, 1]"),
    (["--prompt", PROMPT, "--top_p", "nan"], "top_p must be a finite number"),
    (["--prompt", PROMPT, "--top_k", "-100"], "top_k must be >= 0"),
    (["--prompt", PROMPT, "--max_new_tokens", "-1"], "max_new_tokens must be in [1, 4096]"),
    (["--prompt", PROMPT, "--max_new_tokens", str(10**12)], "max_new_tokens must be in [1, 4096]"),
    (["--prompt", PROMPT, "--max_new_tokens", str(TINY_CONTEXT)], "leaves no room for a prompt"),
    (["--prompt", PROMPT, "--halt_threshold", "nan"], "halt_threshold must be a finite number"),
    (["--prompt", PROMPT, "--halt_threshold", "inf"], "halt_threshold must be a finite number"),
    (["--prompt", PROMPT, "--halt_threshold", "-0.01"], "halt_threshold must be in [0, 1]"),
    (["--prompt", PROMPT, "--supervision_steps", "0"], "supervision_steps must be >= 1"),
    (["--prompt", PROMPT, "--supervision_steps", "-3"], "supervision_steps must be >= 1"),
    (["--prompt", PROMPT, "--max_new_tokens", "4", "--supervision_steps", "1000"],
     "supervision_steps must be in [1, 4]"),
    (["--prompt", PROMPT, "--num_return_sequences", "0"], "num_return_sequences must be in [1, 16]"),
    (["--prompt", PROMPT, "--num_return_sequences", "10000"], "num_return_sequences must be in [1, 16]"),
    (["--prompt", PROMPT, "--seed", str(2**32)], "seed must be in [0, 2**32)"),
    (["--prompt", PROMPT, "--repetition_penalty", "-1"], "repetition_penalty must be > 0"),
    (["--prompt", PROMPT, "--show_steps", "--show_top_k", "0"], "--show_top_k must be >= 1"),
    (["--prompt", PROMPT, "--show_steps", "--num_return_sequences", "2"], "--show_steps follows one sequence"),
    (["--prompt", PROMPT, "--device", "cpu:abc"], "unknown device 'cpu:abc'"),
    pytest.param(["--prompt", PROMPT, "--max_new_tokens", "4", "--show_steps", "--show_top_k", "100000"], "top_k", id="show_top_k-over-vocab"),
    pytest.param(["--prompt", PROMPT, "--max_new_tokens", "4", "--show_steps", "--stream", "--show_top_k", "100000"],
                 "top_k", id="show_top_k-over-vocab-stream"),
    pytest.param(["--prompt", PROMPT, "--max_new_tokens", "4", "--temperature", "1e-40"], "temperature", id="temperature-underflow"),
    pytest.param(["--prompt", PROMPT, "--max_new_tokens", "4", "--repetition_penalty", "1e-300"], "repetition_penalty", id="repetition_penalty-underflow"),
    pytest.param(["--prompt", PROMPT, "--max_new_tokens", "4", "--device", "meta"], "device",
                 id="device-meta"),
])
def test_cli_bad_settings_are_one_clear_line(cli, capsys, tiny_model_dir, flags, message):  # noqa: F811
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--device", "cpu", *flags)
    assert_one_line_error(code, out, err, message)


@pytest.mark.parametrize("flags, message", [
    ([], "the following arguments are required: --prompt"),
    (["--prompt", PROMPT, "--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
    (["--prompt", PROMPT, "--max_new_tokens", "1.5"], "argument --max_new_tokens: invalid int value: '1.5'"),
    (["--prompt", PROMPT, "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_cli_unparsable_flags_exit_2(cli, capsys, flags, message):
    with pytest.raises(SystemExit) as exited:
        cli.main(flags)
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.splitlines()[-1].endswith(f"error: {message}")  # argparse: usage, then one error line


@pytest.mark.parametrize("stdin, message", [
    (b"", "the prompt is empty"),
    (b"\n", "the prompt is empty"),  # only the newline echo adds
    ("Tom \u00e9".encode("latin-1"), "not valid UTF-8: byte 0xe9 at offset 4"),
    ("Lily".encode("utf-16"), "not valid UTF-8: byte 0xff at offset 0"),  # a UTF-16 byte-order mark
])
def test_cli_bad_stdin_prompt(cli, capsys, tiny_model_dir, monkeypatch, stdin, message):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", "-")
    assert_one_line_error(code, out, err, message)


def big_prompt(chars: int) -> str:
    """`chars` characters of seeded story-like words (a pasted book, not one repeated token)."""
    words = "Once upon a time there was a little girl named Lily who liked to play in the park with Tom".split()
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(chars // 3))[:chars]


def test_cli_one_megabyte_prompt_is_cut_from_the_left(cli, capsys, tiny_model_dir):  # noqa: F811
    prompt = big_prompt(1_000_000)
    start = time.monotonic()
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", prompt, "--max_new_tokens", 6,
                             "--temperature", 0, "--device", "cpu")
    assert time.monotonic() - start < 60  # tokenizing 1 MB is linear; generation only sees the context
    assert code == 0, err
    assert err.startswith("warning: the prompt is ") and err.count("\n") == 1
    kept = TINY_CONTEXT - 6
    dropped = int(err.split("dropped its first ")[1].split()[0])
    total = int(err.split("the prompt is ")[1].split()[0])
    assert total - dropped == kept  # BOS + the prompt's last tokens fill exactly the room left
    assert out.startswith(prompt) and len(out) > len(prompt)


@pytest.mark.parametrize("prompt", ["\u200b", "\x00", "\U0001f642" * 20, "<|pad|>", "a" * 5000])
def test_cli_odd_but_valid_prompts_generate(cli, capsys, tiny_model_dir, prompt):  # noqa: F811
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", prompt, "--max_new_tokens", 4,
                             "--temperature", 0, "--device", "cpu")
    assert code == 0, err
    assert out.startswith(prompt)


def test_cli_top_k_above_vocabulary_is_no_filtering(cli, capsys, tiny_model_dir):  # noqa: F811
    """top_k >= vocab keeps every token: the same sample as top_k=0 (off), not an error and not a crash."""
    args = ["--model", tiny_model_dir, "--prompt", PROMPT, "--max_new_tokens", 12, "--seed", 7, "--device", "cpu"]
    code, unfiltered, err = run_cli(cli, capsys, *args, "--top_k", 0)
    assert code == 0, err
    code, huge_k, err = run_cli(cli, capsys, *args, "--top_k", 10**6)
    assert code == 0, err
    assert huge_k == unfiltered


# ----------------------------------------------------------------------------------------------------
# generate CLI, real subprocesses (argv, stdin and exit codes as a shell sees them)


def run_script(*args, stdin=b"", timeout=120):
    return subprocess.run([sys.executable, str(REPO_ROOT / "generate" / "generate.py"), *map(str, args)],
                          input=stdin, capture_output=True, cwd=REPO_ROOT.parent, timeout=timeout)


def test_subprocess_one_megabyte_prompt_on_stdin(tiny_model_dir):  # noqa: F811
    prompt = big_prompt(1_000_000)  # over Linux's 128 KiB limit for one argv string: stdin is the way
    done = run_script("--model", tiny_model_dir, "--prompt", "-", "--max_new_tokens", 5, "--temperature", 0,
                      "--device", "cpu", stdin=prompt.encode())
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert err.startswith("warning: the prompt is ") and "dropped its first" in err and err.count("\n") == 1
    out = done.stdout.decode()
    assert out.startswith(prompt) and len(out) > len(prompt)


def test_subprocess_invalid_utf8_on_stdin_is_one_line(tiny_model_dir):  # noqa: F811
    done = run_script("--model", tiny_model_dir, "--prompt", "-", stdin=b"Once upon a time " + garbage(2048, seed=1))
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b""
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: the prompt is not valid UTF-8: byte 0x")


# ----------------------------------------------------------------------------------------------------
# damaged model folders


def with_weights(directory: Path, change) -> None:
    """Rewrite model.safetensors with change(state_dict) -> state_dict."""
    weights = load_file(directory / "model.safetensors")
    save_file(change(weights), directory / "model.safetensors", metadata={"format": "pt"})


def with_config(directory: Path, **values) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **values}))


@pytest.fixture(scope="module")
def damaged(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """name -> a copy of the tiny model folder with one thing broken."""
    root = tmp_path_factory.mktemp("damaged")
    dirs = {}

    def copy(name):
        dirs[name] = shutil.copytree(tiny_model_dir, root / name)
        return dirs[name]

    dirs["a_file"] = tiny_model_dir / "config.json"
    pickle_pt = copy("pickle_pt")
    torch.save(load_file(pickle_pt / "model.safetensors"), pickle_pt / "model.pt")  # a real pickle, not a rename
    (pickle_pt / "model.safetensors").unlink()
    (copy("empty_weights") / "model.safetensors").write_bytes(b"")
    header_only = copy("header_only")
    (header_only / "model.safetensors").write_bytes((header_only / "model.safetensors").read_bytes()[:8])
    (copy("huge_header") / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    (copy("config_not_json") / "config.json").write_text("{'model_type': 'trm_lm',")
    (copy("config_empty") / "config.json").write_text("")
    (copy("config_deep") / "config.json").write_text("[" * 100_000)
    with_config(copy("config_heads"), num_attention_heads=3)
    with_config(copy("config_latent0"), latent_steps=0)
    with_config(copy("config_norm"), norm_position="sideways")
    with_config(copy("config_dropout_str"), embedding_dropout="0.1")
    (copy("tokenizer_garbage") / "tokenizer.json").write_bytes(b"\x00\x01 not a tokenizer")
    (copy("index_bad") / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 1}}))
    with_weights(copy("wrong_shape"), lambda w: {**w, "model.core.y_init": torch.zeros(3, 3)})
    with_weights(copy("missing_tensor"),
                 lambda w: {k: v for k, v in w.items() if k != "model.core.blocks.0.mixer.o_proj.weight"})
    with_weights(copy("nan_weights"), lambda w: {k: torch.full_like(v, math.nan) for k, v in w.items()})
    with_weights(copy("integer_weights"), lambda w: {k: v.to(torch.int8) for k, v in w.items()})
    with_weights(copy("float64_weights"), lambda w: {k: v.to(torch.float64) for k, v in w.items()})
    return dirs


@pytest.mark.parametrize("case, message", [
    ("a_file", "expected a model directory (save_pretrained output), got a file"),
    ("pickle_pt", "has only pickle weights (model.pt); refusing to load them"),
    ("empty_weights", "not a valid safetensors file (truncated or corrupt?)"),
    ("header_only", "not a valid safetensors file (truncated or corrupt?)"),
    ("huge_header", "not a valid safetensors file (truncated or corrupt?)"),
    ("config_not_json", "config.json' is not a valid JSON file"),
    ("config_empty", "config.json' is not a valid JSON file"),
    ("config_deep", "could not load model folder"),
    ("config_heads", "hidden_size (32) must be divisible by num_attention_heads (3)"),
    ("config_latent0", "TRMConfig.latent_steps must be a positive integer, got 0"),
    ("config_norm", "TRMConfig.norm_position must be one of ('post', 'pre'), got 'sideways'"),
    ("tokenizer_garbage", "could not load model folder"),
    pytest.param("config_dropout_str", "embedding_dropout", id="config_dropout_str"),
    pytest.param("index_bad", "model.safetensors.index.json", id="index_bad"),
    pytest.param("missing_tensor", "model.core.blocks.0.mixer.o_proj.weight", id="missing_tensor"),
    pytest.param("wrong_shape", "model.core.y_init", id="wrong_shape"),
    pytest.param("nan_weights", "NaN", id="nan_weights"),
    pytest.param("integer_weights", "int8", id="integer_weights"),
])
def test_damaged_model_folder_is_one_clear_line(cli, capsys, damaged, case, message):
    # sampling (the default) is what a NaN model breaks; greedy argmax would hide it
    code, out, err = run_cli(cli, capsys, "--model", damaged[case], "--prompt", PROMPT, "--max_new_tokens", 4,
                             "--seed", 0, "--device", "cpu")
    assert_one_line_error(code, out, err, message)


def test_float64_checkpoint_is_cast_back_exactly(damaged, tiny_model_dir):  # noqa: F811
    """Weights saved as float64 load as the config's float32, value for value (float32 -> float64 is exact)."""
    reference, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    model, _ = load_model_and_tokenizer(damaged["float64_weights"], device="cpu")
    assert model.dtype == torch.float32
    for (name, expected), (_, loaded) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(expected, loaded), name
    settings = GenerationSettings(max_new_tokens=10, temperature=0.9, seed=3)
    assert generate_text(model, tokenizer, PROMPT, settings).token_ids == \
        generate_text(reference, tokenizer, PROMPT, settings).token_ids


# ----------------------------------------------------------------------------------------------------
# config loading


def config_dict(**overrides) -> dict:
    values = dict(vocab_size=61, hidden_size=32, num_attention_heads=2, net_layers=1, latent_steps=1, cycles=1,
                  supervision_steps=1, max_position_embeddings=16)
    return {**values, **overrides}




@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size="32"), "TRMConfig.hidden_size must be a positive integer, got '32'"),
    (dict(vocab_size=61.0), "TRMConfig.vocab_size must be a positive integer, got 61.0"),
    (dict(vocab_size=None), "TRMConfig.vocab_size must be a positive integer, got None"),
    (dict(max_position_embeddings=-16), "TRMConfig.max_position_embeddings must be a positive integer"),
    (dict(cycles=True), "TRMConfig.cycles must be a positive integer, got True"),
    (dict(num_attention_heads=0), "TRMConfig.num_attention_heads must be a positive integer, got 0"),
    (dict(hidden_size=32, num_attention_heads=3), "must be divisible by num_attention_heads (3)"),
    (dict(hidden_size=6, num_attention_heads=2), "rotary position encoding needs an even head_dim, got 3"),
    (dict(intermediate_size=64.5), "TRMConfig.intermediate_size must be a positive integer or None"),
    (dict(norm_position="Post"), "TRMConfig.norm_position must be one of ('post', 'pre'), got 'Post'"),
    (dict(mixer=["attention"]), "TRMConfig.mixer must be one of ('attention', 'mlp')"),
    (dict(position_encoding="alibi"), "TRMConfig.position_encoding must be one of"),
    (dict(halt_threshold=math.nan), "TRMConfig.halt_threshold must be in (0, 1], or 0 / None = off, got nan"),
    (dict(halt_threshold=1.5), "TRMConfig.halt_threshold must be in (0, 1], or 0 / None = off, got 1.5"),
    (dict(embedding_dropout=1.0), "TRMConfig.embedding_dropout must be in [0, 1)"),
    (dict(halt_loss_weight=-1.0), "TRMConfig.halt_loss_weight must be >= 0"),
    pytest.param(dict(halt_threshold="abc"), "halt_threshold", id="halt_threshold-str"),
    pytest.param(dict(halt_threshold="0.5"), "halt_threshold", id="halt_threshold-numeric-str"),
    pytest.param(dict(embedding_dropout="0.1"), "embedding_dropout", id="embedding_dropout-str"),
    pytest.param(dict(embedding_dropout=None), "embedding_dropout", id="embedding_dropout-None"),
    pytest.param(dict(halt_loss_weight="x"), "halt_loss_weight", id="halt_loss_weight-str"),
    pytest.param(dict(halt_loss_weight=math.nan), "halt_loss_weight", id="halt_loss_weight-nan"),
    pytest.param(dict(rope_theta="big"), "rope_theta", id="rope_theta-str"),
    pytest.param(dict(rope_theta=-1.0), "rope_theta", id="rope_theta-negative"),
    pytest.param(dict(rms_norm_eps=-1.0), "rms_norm_eps", id="rms_norm_eps-negative"),
    pytest.param(dict(initializer_range=-0.1), "initializer_range", id="initializer_range-negative"),
    pytest.param(dict(pad_token_id=61), "pad_token_id", id="pad_token_id-out-of-vocab"),
    pytest.param(dict(bos_token_id="x"), "bos_token_id", id="bos_token_id-str"),
    pytest.param(dict(tie_word_embeddings="no"), "tie_word_embeddings", id="tie_word_embeddings-str"),
    pytest.param(dict(causal="yes"), "causal", id="causal-str"),
])
def test_config_from_dict_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError) as raised:
        TRMConfig.from_dict(config_dict(**overrides))
    assert message in str(raised.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size="32"), "TRMConfig.hidden_size must be a positive integer"),
    (dict(latent_steps=0), "TRMConfig.latent_steps must be a positive integer, got 0"),
    (dict(input_injection="multiply"), "TRMConfig.input_injection must be one of"),
])
def test_auto_config_from_pretrained_rejects_bad_values(tmp_path, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "trm_lm", **config_dict(**overrides)}))
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '"trm_lm"'])
def test_auto_config_from_pretrained_on_non_config_json(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises((OSError, ValueError)) as raised:  # transformers' own errors, both name the folder or file
        AutoConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(raised.value)


# ----------------------------------------------------------------------------------------------------
# data loading


def garbage(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))




@pytest.mark.parametrize("name, content, message", [
    ("garbage.jsonl", garbage(4096), r"garbage\.jsonl line 1: not valid UTF-8 \(byte 0x"),
    ("garbage.txt", garbage(4096), r"garbage\.txt line 1: not valid UTF-8 \(byte 0x"),
    ("garbage.json", garbage(4096), r"garbage\.json line 1: not valid UTF-8 \(byte 0x"),
    ("garbage.parquet", garbage(4096), r"garbage\.parquet: not a readable Parquet file"),
    ("binary.jsonl", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), r"binary\.jsonl line 1: invalid JSON"),
    ("utf16.jsonl", '{"text": "a"}\n'.encode("utf-16"), r"utf16\.jsonl line 1: not valid UTF-8 \(byte 0xff"),
    ("truncated.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c', r"truncated\.jsonl line 3: invalid JSON"),
    ("array.jsonl", json.dumps([{"text": "a"}, {"text": "b"}]).encode(),
     r"array\.jsonl line 1: expected a JSON object with a 'text' field, got list"),
    ("array_pretty.jsonl", json.dumps([{"text": "a"}], indent=2).encode(), r"array_pretty\.jsonl line 1: invalid JSON"),
    ("object.json", json.dumps({"text": "a"}, indent=2).encode(), r"object\.json line 1: invalid JSON"),
    ("nan.jsonl", b'{"text": NaN}\n', r"nan\.jsonl line 1: field 'text' must be a string, got float"),
    ("items.json", json.dumps([{"text": "a"}, "b"]).encode(), r"items\.json item 1: expected a JSON object"),
    pytest.param("deep.jsonl", b"[" * 100_000 + b"\n", r"deep\.jsonl line 1", id="deep.jsonl"),
    pytest.param("deep.json", b"[" * 100_000, r"deep\.json( line \d+)?: invalid JSON",
                 id="deep.json"),
    pytest.param("bigint.jsonl", b'{"text": "a"}\n{"text": "b", "n": ' + b"9" * 5000 + b"}\n", r"bigint\.jsonl line 2", id="bigint.jsonl"),
    pytest.param("surrogate.jsonl", b'{"text": "a"}\n{"text": "Tom \\ud800"}\n', r"surrogate\.jsonl line 2", id="surrogate.jsonl"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_documents(path)
    with pytest.raises(ValueError, match=message):  # also through datasets, whose own errors must not hide ours
        load_text_datasets(train_file=path, validation_file=path, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.txt"])
def test_a_multi_megabyte_single_line_loads(tmp_path, name):
    story = big_prompt(4_000_000)  # one 4 MB document on one line
    path = tmp_path / name
    path.write_text(json.dumps({"text": story}) + "\n" if name.endswith(".jsonl") else story, encoding="utf-8")
    assert read_documents(path) == [story]
    raw = load_text_datasets(train_file=path, validation_file=path, cache_dir=str(tmp_path / "cache"))
    assert list(raw["train"]["text"]) == [story]


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


def test_app_load_benchmark_reduced(tiny_model_dir, tmp_path):  # noqa: F811
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
