"""generate/generate.py against bad input: its main() in this process and real subprocesses (argv, stdin and
exit codes as a shell sees them). Every bad value is one clear line on stderr and exit code 2, never a traceback.
Cases already in test_generate_cli.py are not repeated here.
"""

import io
import subprocess
import sys
import time

import pytest
from helpers import REPO_ROOT, TINY_CONTEXT, assert_one_line_error, big_prompt, garbage, run_cli

PROMPT = "Once upon a time"


# ----------------------------------------------------------------------------------------------------
# generate CLI, in this process


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
def test_cli_bad_settings_are_one_clear_line(cli, capsys, tiny_model_dir, flags, message):
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
def test_cli_bad_stdin_prompt(cli, capsys, tiny_model_dir, monkeypatch, stdin, message):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", "-")
    assert_one_line_error(code, out, err, message)


def test_cli_one_megabyte_prompt_is_cut_from_the_left(cli, capsys, tiny_model_dir):
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
def test_cli_odd_but_valid_prompts_generate(cli, capsys, tiny_model_dir, prompt):
    code, out, err = run_cli(cli, capsys, "--model", tiny_model_dir, "--prompt", prompt, "--max_new_tokens", 4,
                             "--temperature", 0, "--device", "cpu")
    assert code == 0, err
    assert out.startswith(prompt)


def test_cli_top_k_above_vocabulary_is_no_filtering(cli, capsys, tiny_model_dir):
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


def test_subprocess_one_megabyte_prompt_on_stdin(tiny_model_dir):
    prompt = big_prompt(1_000_000)  # over Linux's 128 KiB limit for one argv string: stdin is the way
    done = run_script("--model", tiny_model_dir, "--prompt", "-", "--max_new_tokens", 5, "--temperature", 0,
                      "--device", "cpu", stdin=prompt.encode())
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert err.startswith("warning: the prompt is ") and "dropped its first" in err and err.count("\n") == 1
    out = done.stdout.decode()
    assert out.startswith(prompt) and len(out) > len(prompt)


def test_subprocess_invalid_utf8_on_stdin_is_one_line(tiny_model_dir):
    done = run_script("--model", tiny_model_dir, "--prompt", "-", stdin=b"Once upon a time " + garbage(2048, seed=1))
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b""
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: the prompt is not valid UTF-8: byte 0x")


