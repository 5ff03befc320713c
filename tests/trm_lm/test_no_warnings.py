"""A normal train, evaluate, generate and app run prints no deprecation text from our own call sites.

transformers announces API renames (such as `past_key_values` -> `cache` in 5.24) with FutureWarning /
DeprecationWarning attributed to the caller. Every run here turns those into errors when they are
attributed to this project's modules, and fails on any "deprecated" text on stderr, so a rename shows up
in CI on the day a new release resolves, not as a user's report.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import REPO_ROOT, running_app

OUR_MODULES = r"(trm_lm|puzzles|__main__|app|generate|train_lm)(\.|$)"
# Runs a script (or a module with -m) with our call sites' FutureWarning/DeprecationWarning made errors.
STRICT_RUNNER = f"""
import runpy, sys, warnings
for category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("error", category=category, module={OUR_MODULES!r})
target, sys.argv = sys.argv[1], sys.argv[1:]
if target == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def is_our_file(filename: str) -> bool:
    """A project source file, not a test and not an installed package: a venv made inside the checkout
    (README's `python3 -m venv .venv`) puts site-packages under REPO_ROOT too."""
    path = Path(filename).resolve()
    installed = Path(sys.prefix).resolve()
    return path.is_relative_to(REPO_ROOT) and not path.is_relative_to(installed) and "tests" not in path.parts


def run_strict(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", STRICT_RUNNER, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stderr.splitlines():
        assert "deprecat" not in line.lower(), f"deprecation text on stderr of {args}: {line}"
    return proc


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("strict-data")
    lines = (shared_data / "tinystories" / "train.jsonl").read_text().splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(lines[:120]))
    (folder / "valid.jsonl").write_text("".join(lines[120:130]))
    return folder


def test_train_evaluate_generate_print_no_deprecation(small_files, tmp_path):
    out = tmp_path / "run"
    run_strict(REPO_ROOT / "train" / "train_lm.py", "--config", REPO_ROOT / "train" / "configs" / "tiny-cpu.yaml",
               "--output_dir", out, "--train_file", small_files / "train.jsonl", "--validation_file",
               small_files / "valid.jsonl", "--report_file", small_files / "valid.jsonl", "--max_train_steps", 4,
               "--eval_steps", 4, "--checkpointing_steps", 2, "--report_to", "none")
    run_strict("-m", "trm_lm.evaluate", "--model", out, "--validation_file", small_files / "valid.jsonl")
    story = run_strict(REPO_ROOT / "generate" / "generate.py", "--model", out, "--prompt", "Once upon a time",
                       "--max_new_tokens", 16, "--halt_threshold", 0.5, "--show_steps", "--device", "cpu")
    assert story.stdout.startswith("Once upon a time")


def test_app_generation_warns_nothing_from_our_code(tiny_model_dir):
    gradio_client = pytest.importorskip("gradio_client")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with running_app(tiny_model_dir) as (url, _, _):
            client = gradio_client.Client(url, verbose=False)
            story, *_ = client.predict("Once upon a time", 0.9, 0.95, 12, 0.5, 2, 1, api_name="/generate")
    assert story.startswith("Once upon a time")
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and is_our_file(w.filename)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
