"""Every command in README.md works exactly as written.

The README's ```bash blocks are parsed into commands (`\\` continuations joined, comments dropped, `&&`
chains split). Each command matches one rule below: SKIPPED (with the reason it cannot run here) or RUN,
with a check of its output. A command that matches no rule fails the cheap coverage test, so the README
cannot drift away from this file silently.

The slow test runs every runnable command, as written, through bash, in README order within two lanes that
run side by side (the language-model training blocks, and the rest), each in its own scratch copy of
the checkout (the files git tracks or would track, so new files count; `../shared` points at the real data
next to the real checkout). Long commands are shrunk by one environment variable, never by editing them:
TRM_LM_SMOKE=1 (trm_lm.arguments.smoke_run) caps training to 2 optimizer steps of 2 examples and evaluations
to a few documents, and every shrunk command says so on stderr. Servers are started, asked for their page
on loopback and stopped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the real data next to the checkout (conftest.py's)
README = REPO_ROOT / "README.md"
SMOKE_LINE = "TRM_LM_SMOKE is set"
COMMAND_TIMEOUT_S = 600  # a smoke run takes seconds; this only stops a command that ignores TRM_LM_SMOKE
SERVER_START_TIMEOUT_S = 180


# ----------------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class Command:
    text: str  # as written (continuations joined, trailing comment dropped); run as is by bash
    line: int  # README line where it starts
    block: int = 0  # which ```bash block of the README it is in

    def words(self) -> list[str]:
        return shlex.split(self.text)

    def flag(self, name: str) -> str | None:
        """The value of `--name VALUE` in the command (the last one given), or None."""
        words = self.words()
        values = [words[i + 1] for i, word in enumerate(words[:-1]) if word == name]
        return values[-1] if values else None


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """Split `text` at `separator` where it is not inside quotes; a separator `#` only counts at the start
    of a word (as bash reads comments)."""
    parts, start, quote, i = [], 0, None, 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1
            elif char == quote:
                quote = None
        elif char == "\\":
            i += 1
        elif char in "'\"":
            quote = char
        elif text.startswith(separator, i) and (separator != "#" or i == 0 or text[i - 1].isspace()):
            parts.append(text[start:i])
            start = i + len(separator)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return parts


def bash_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line of the first code line, code) of every ```bash block."""
    blocks = []
    for match in re.finditer(r"^```bash[ \t]*\n(.*?)^```", markdown, flags=re.M | re.S):
        blocks.append((markdown.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


def parse_commands(markdown: str) -> list[Command]:
    """The commands of the ```bash blocks, in order."""
    commands = []
    for block, (first_line, code) in enumerate(bash_blocks(markdown)):
        line = first_line
        # bash drops backslash-newline; a continued command counts from the line it starts on
        for logical in re.split(r"(?<!\\)\n", code):
            code_line = _split_outside_quotes(logical.replace("\\\n", ""), "#")[0].strip()
            for part in _split_outside_quotes(code_line, "&&") if code_line else []:
                commands.append(Command(part.strip(), line, block))
            line += logical.count("\n") + 1
    return commands


# ----------------------------------------------------------------------------------------------------
# the rules: every README command is skipped for a reason, or run and checked


@dataclass
class Run:
    """What a command printed and did: its exit code, output and the scratch checkout it ran in."""
    command: Command
    returncode: int
    stdout: str
    stderr: str
    root: Path
    seconds: float  # wall clock
    cpu_seconds: float  # user + system time of the command and its children
    page: str | None = None  # a server's page

    def describe(self) -> str:
        return (f"README line {self.command.line}: `{self.command.text}` exited {self.returncode} after "
                f"{self.seconds:.0f} s\n--- stdout (end) ---\n{self.stdout[-2000:]}\n--- stderr (end) ---\n"
                f"{self.stderr[-3000:]}")


def check_story(run: Run) -> None:
    """A story that starts with the prompt (from --prompt, or the echoed text with `--prompt -`)."""
    prompt = run.command.flag("--prompt")
    if prompt == "-":  # the prompt is what the pipeline's first stage, `echo TEXT`, writes
        prompt = " ".join(shlex.split(_split_outside_quotes(run.command.text, "|")[0])[1:])
    story = run.stdout.strip()
    assert story.startswith(prompt) and len(story) > len(prompt) + 20, "no story that starts with the prompt"
    if "--show_steps" in run.command.words():  # the per-token table: position, token, steps, top-k per step
        assert re.search(r"^\s*position\s+token\s+steps\s+step 1 top-k", run.stdout, flags=re.M), "no steps table"


def check_page(run: Run) -> None:
    """A server's page: the app's (its title is in it)."""
    assert "Tiny Recursive Model" in run.page, "the page is not the app's (its title is not in it)"


def check_smoke(run: Run) -> None:
    assert SMOKE_LINE in run.stderr, "TRM_LM_SMOKE did not shrink this command (no 'TRM_LM_SMOKE is set' line)"


def check_training(run: Run) -> None:
    """The loop's `done:` line, a saved model and results.json where it says; a resume really resumed."""
    check_smoke(run)
    done = re.search(r"^done: (\d+) steps in .*; model saved to (.+); final (.+)$", run.stdout, flags=re.M)
    assert done, "no 'done: N steps ...; model saved to DIR' line"
    assert 1 <= int(done.group(1)) <= 2, "a smoke run trains at most 2 steps"
    saved = run.root / done.group(2)
    assert (saved / "model.safetensors").is_file() and (saved / "results.json").is_file(), f"nothing saved in {saved}"
    if run.command.flag("--resume_from_checkpoint"):
        assert "resumed from " in run.stdout, "it did not resume from a checkpoint"


def check_export(run: Run) -> None:
    output = run.root / run.command.flag("--output")
    assert f"to {run.command.flag('--output')}:" in run.stdout, "no 'exported ... to OUTPUT: files' line"
    for name in ("model.safetensors", "config.json", "modeling_trm.py", "tokenizer.json", "README.md"):
        assert (output / name).is_file(), f"export did not write {name}"


def check_small_device_export(run: Run) -> None:
    """int8 / onnx: the result JSON names what was written; the ONNX step decodes as PyTorch does."""
    result = json.loads(run.stdout)
    assert (run.root / result["path"]).exists() and result["bytes"] > 0, "nothing exported"
    if run.command.flag("--format") == "onnx":
        assert result["same_tokens"] is True, "the ONNX step's greedy tokens differ from PyTorch's"


def check_bits_per_byte(run: Run) -> None:
    check_smoke(run)
    result = json.loads(run.stdout)
    assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] > 0
    assert result["documents"] == 2, "TRM_LM_SMOKE scores 2 documents"


def check_baselines(run: Run) -> None:
    for row in ("trm", "llama-params", "llama-flops"):
        assert re.search(rf"^\| {row} \|", run.stdout, flags=re.M), f"no '{row}' row in the table"


def check_study(run: Run) -> None:
    check_smoke(run)
    results = json.loads((run.root / "outputs" / "benchmarks" / "study.json").read_text())  # not the committed one
    assert results["documents"] == 2, "study.json is not this smoke run's (TRM_LM_SMOKE scores 2 documents)"
    assert results["arms"], "the study scored no arm"
    assert all(math.isfinite(arm["bits_per_byte"]) for arm in results["arms"])
    assert "| arm | parameters | val bits/byte |" in run.stdout


def check_benchmark(run: Run) -> None:
    assert run.stdout.strip(), "the benchmark printed nothing"


def check_hub_push_offline(run: Run) -> None:
    """Offline, a push fails (exit code 2) with one clear line, not a traceback."""
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "offline" in errors[0], "expected one 'error: ... offline ...' line"
    assert "Traceback" not in run.stderr


def check_puzzle_build(run: Run) -> None:
    stats = json.loads(run.stdout)
    data_dir = run.root / run.command.flag("--output_dir")
    assert stats["output_dir"] == run.command.flag("--output_dir") and (data_dir / "train").is_dir()
    assert (data_dir / "test").is_dir()


def check_puzzle_evaluation(run: Run) -> None:
    result = json.loads(run.stdout)
    assert 0.0 <= result["exact_accuracy"] <= 1.0 and result["per_step"], "no accuracy in the result"


def check_puzzle_solution(run: Run) -> None:
    """The solved grid and its checks; the shipped solver (no --model) solves the README's example."""
    assert re.search(r"^solution:$", run.stdout, flags=re.M), "no solution printed"
    valid = re.search(r"^valid: (yes|no)$", run.stdout, flags=re.M)
    assert valid, "no 'valid:' line"
    if run.command.flag("--model") is None:
        assert valid.group(1) == "yes", "the shipped solver does not solve the README's example"
    if "--show_steps" in run.command.words():
        assert re.search(r"^step 1: P\(halt\) ", run.stdout, flags=re.M), "no grid after step 1"


def reads_shared_data(command: Command, root: Path) -> bool:
    """Whether the command names ../shared/data itself or through its --config file (and that file's base)."""
    texts = [command.text]
    config = command.flag("--config")
    while config and (root / config).is_file():
        texts.append((root / config).read_text())
        base = re.search(r"^base:\s*(\S+)", texts[-1], flags=re.M)
        config = str(Path(config).parent / base.group(1)) if base else None
    return any("shared/data" in text for text in texts)


def gpus_wanted(command: Command) -> int:
    """GPUs an `accelerate launch` of the README wants: --num_processes of them (there, it is the GPU recipe),
    none with --cpu."""
    return 0 if "--cpu" in command.words() else int(command.flag("--num_processes") or 1)


@dataclass(frozen=True)
class Rule:
    pattern: str  # regular expression matched at the start of the command
    check: Callable[[Run], None] | None = None  # run it and check what it did ...
    skip: str | None = None  # ... or not, for this reason
    server: bool = False  # start it, fetch its page on loopback, stop it
    # reads ../shared/data (or a model trained on it) even where the command and its --config do not say so
    needs_data: bool | Callable[[Command], bool] = False
    needs_gpus: bool = False  # runs only with the GPUs the command asks for (`gpus_wanted`)
    # Python modules of an optional extra it needs (not in `.[dev]`, which is what CI installs)
    needs_modules: Callable[[Command], tuple[str, ...]] = lambda command: ()
    expected_returncode: int = 0


RULES = [
    Rule(r"pip install\b", skip="installs packages: CI (.ci/run) does exactly this in a fresh virtual environment"),
    Rule(r"git clone\b", skip="clones the repository: CI runs on a fresh clone, this test in a copy of the checkout"),
    Rule(r"cd\b", skip="enters the clone: this test runs every command from the root of its copy"),
    Rule(r"python3? -m venv\b", skip="makes a virtual environment: CI (.ci/run) does exactly this"),
    Rule(r"source \S*activate\b", skip="activates the virtual environment: this test puts the running one on PATH"),
    Rule(r"python -m pytest\b", skip="runs the test suite, which runs this test"),
    Rule(r"python generate/generate\.py\b", check_story),
    Rule(r"python app\.py\b", check_page, server=True),
    Rule(r"python train/train_lm\.py\b", check_training, needs_data=True),
    Rule(r"python train/train_puzzles\.py\b", check_training),
    Rule(r"accelerate launch\b", check_training, needs_data=True, needs_gpus=True),
    Rule(r"python -m trm_lm\.hub export\b", check_export, needs_data=True),
    Rule(r"python -m trm_lm\.hub push\b", check_hub_push_offline, expected_returncode=2),
    Rule(r"python -m trm_lm\.export\b", check_small_device_export,
         needs_modules=lambda c: ("onnx", "onnxscript", "onnxruntime") if c.flag("--format") == "onnx" else ()),
    Rule(r"python -m trm_lm\.evaluate\b", check_bits_per_byte, needs_data=True),
    Rule(r"python -m trm_lm\.baselines\b", check_baselines),
    Rule(r"python benchmarks/study\.py\b", check_study, needs_data=True),
    Rule(r"python benchmarks/\w+\.py\b", check_benchmark),
    Rule(r"python -m puzzles\.build\b", check_puzzle_build, needs_data=lambda c: c.flag("--task") != "sudoku-gen"),
    Rule(r"python -m puzzles\.evaluate\b", check_puzzle_evaluation),
    Rule(r"python -m puzzles\.solve\b", check_puzzle_solution),
]


def program(command: Command) -> str:
    """What the rules match: the last stage of a pipeline (`echo ... | python ...`: the python command),
    without leading VAR=value assignments."""
    last_stage = _split_outside_quotes(command.text, "|")[-1].strip()
    return re.sub(r"^(\w+=\S*\s+)+", "", last_stage)


def rule_for(command: Command) -> Rule | None:
    return next((rule for rule in RULES if re.match(rule.pattern, program(command))), None)


def skip_reason(command: Command, root: Path, data_present: bool, gpus: int) -> str | None:
    """Why a covered command does not run here (None: it runs)."""
    rule = rule_for(command)
    if rule.skip:
        return rule.skip
    needs_data = rule.needs_data(command) if callable(rule.needs_data) else rule.needs_data
    if not data_present and (needs_data or reads_shared_data(command, root)):
        return f"needs ../shared/data, absent next to the checkout ({SHARED_DATA})"
    if rule.needs_gpus and gpus < gpus_wanted(command):
        return f"needs {gpus_wanted(command)} GPU(s), {gpus} here"
    missing = [name for name in rule.needs_modules(command) if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs {', '.join(missing)}, not installed here (an optional extra of pyproject.toml)"
    return None


def readme_commands() -> list[Command]:
    return parse_commands(README.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# cheap tests: the parser and the coverage of the README


def test_parse_commands_joins_continuations_drops_comments_splits_chains():
    markdown = "\n".join([
        "text", "```bash", "# a comment line", "a --x 1 && b 'q && r' \"#no\"   # note", "",
        "c --long \\", "    --flag v  # trailing", 'echo "A # B" | d', "```", "```python", "not_bash()", "```",
    ])
    commands = parse_commands(markdown)
    assert [c.text for c in commands] == ["a --x 1", "b 'q && r' \"#no\"", "c --long     --flag v",
                                          'echo "A # B" | d']
    assert [c.line for c in commands] == [4, 4, 6, 8]
    assert commands[2].flag("--flag") == "v" and commands[2].flag("--other") is None
    assert program(commands[3]) == "d" and program(Command("A=1 B=x python app.py", 1)) == "python app.py"


def test_a_command_no_rule_knows_is_not_covered():
    assert rule_for(Command("python tools/new_tool.py --x 1", 1)) is None
    assert rule_for(Command('echo "x" | python -m puzzles.solve -', 1)).check is check_puzzle_solution


def test_skips_only_what_cannot_run_here(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("train_file: ../shared/data/tinystories/train.jsonl\n")
    (tmp_path / "configs" / "variant.yaml").write_text("base: base.yaml\nmax_train_steps: 5\n")
    training = Command("python train/train_puzzles.py --config configs/variant.yaml", 1)
    assert reads_shared_data(training, tmp_path)  # through the config's `base:` file
    assert skip_reason(training, tmp_path, data_present=True, gpus=0) is None
    assert "shared/data" in skip_reason(training, tmp_path, data_present=False, gpus=0)
    (tmp_path / "configs" / "base.yaml").write_text("data_dir: outputs/sudoku6-data\n")
    assert not reads_shared_data(training, tmp_path)
    assert skip_reason(training, tmp_path, data_present=False, gpus=0) is None
    generated = Command("python -m puzzles.build --task sudoku-gen --size 6 --output_dir outputs/s", 1)
    assert skip_reason(generated, REPO_ROOT, data_present=False, gpus=0) is None
    assert skip_reason(Command("python -m puzzles.build --task maze --output_dir outputs/m", 1), REPO_ROOT,
                       data_present=False, gpus=0)
    eight_gpus = Command("accelerate launch --multi_gpu --num_processes 8 train/train_lm.py --config x.yaml", 1)
    assert "8 GPU(s)" in skip_reason(eight_gpus, REPO_ROOT, data_present=True, gpus=1)
    assert skip_reason(eight_gpus, REPO_ROOT, data_present=True, gpus=8) is None
    assert skip_reason(Command("python -m pytest -q", 1), REPO_ROOT, data_present=True, gpus=8)
    int8, onnx = (Command(f"python -m trm_lm.export --model m --format {kind} --output o", 1)
                  for kind in ("int8", "onnx"))
    assert skip_reason(int8, REPO_ROOT, data_present=False, gpus=0) is None
    onnx_installed = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    assert (skip_reason(onnx, REPO_ROOT, data_present=False, gpus=0) is None) == onnx_installed


def test_lanes_put_the_training_blocks_apart_and_keep_readme_order():
    markdown = "\n".join(["```bash", "python generate/generate.py --prompt a", "```",
                           "```bash", "python train/train_lm.py --config x.yaml", "python -m trm_lm.hub export --model m",
                           "```", "```bash", "python app.py --port 7860", "python -m puzzles.solve 1", "```"])
    training, rest = lanes(parse_commands(markdown))
    assert [c.line for c in training] == [5, 6] and [c.line for c in rest] == [2, 9, 10]
    assert lanes(parse_commands("```bash\npython app.py\n```")) == [[Command("python app.py", 2, 0)]]


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 10, "README.md has (almost) no ```bash commands: is the parser broken?"
    uncovered = [f"line {c.line}: {c.text}" for c in commands if rule_for(c) is None]
    assert not uncovered, ("new README command not covered by tests/test_readme.py (add a rule that runs and "
                           "checks it, or skips it with a reason): " + "; ".join(uncovered))


# ----------------------------------------------------------------------------------------------------
# the slow test: run them


def scratch_checkout(tmp_path: Path) -> Path:
    """A copy of the files git tracks or would track (as a fresh clone of the working tree would have them),
    next to a `shared` link to the real data, so that `../shared/data` resolves from it."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the README test copies the checkout's files with git, which failed here: {error}")
    root = tmp_path / "trm-lm"
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # not a file deleted in the working tree
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    if SHARED_DATA.is_dir():
        (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    return root


def command_environment(root: Path) -> dict[str, str]:
    """The test session's environment (offline, throwaway HF cache) with the running interpreter's `python`
    first on PATH, the copy as the installed package (what `pip install -e .` in a fresh clone gives) and
    TRM_LM_SMOKE=1."""
    env = dict(os.environ)
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=str(root), TRM_LM_SMOKE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_command(command: Command, root: Path, env: dict[str, str], log_dir: Path) -> Run:
    """Run it to the end (killed after COMMAND_TIMEOUT_S); CPU time from the kernel's account of this one child
    and what it waited for (lanes run side by side, so the process-wide children total would mix them)."""
    out_path, err_path = log_dir / f"command-{command.line}.out", log_dir / f"command-{command.line}.err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(["bash", "-c", command.text], cwd=root, env=env, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    timer = threading.Timer(COMMAND_TIMEOUT_S, os.killpg, (process.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if returncode == -signal.SIGKILL and time.perf_counter() - start >= COMMAND_TIMEOUT_S:
        stderr += f"\n[test] timed out after {COMMAND_TIMEOUT_S} s"
    return Run(command, returncode, stdout, stderr, root, time.perf_counter() - start,
               usage.ru_utime + usage.ru_stime)


def tree_cpu_seconds(pid: int) -> float:
    """User + system time of a running process and its descendants so far."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the loopback port now (as servers do, a port a closed connection
    still holds in TIME_WAIT counts as free)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def serve_and_fetch(command: Command, root: Path, env: dict[str, str], log_dir: Path) -> Run:
    """Start the server, wait until it says it serves on loopback, fetch its page, stop it (Ctrl-C)."""
    port = int(command.flag("--port") or 7860)  # app.py's default, as the README says
    address = f"http://127.0.0.1:{port}/"
    start, cpu = time.perf_counter(), 0.0
    if not port_is_free(port):
        return Run(command, -1, "", f"port {port} on 127.0.0.1 is taken by another process: free it and rerun "
                                    "(the README's command uses that port as written)", root, 0.0, 0.0)
    out_path, err_path = log_dir / f"server-{command.line}.out", log_dir / f"server-{command.line}.err"
    # (Ctrl-C reaches it as in a terminal: the test handles SIGINT while the lanes run, see sigint_handled)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        server = subprocess.Popen(["bash", "-c", command.text], cwd=root, env=env, stdout=out, stderr=err,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    page, problem = None, None
    try:
        # Ready once it prints its address (it is still checking itself while the port already answers).
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while address not in out_path.read_text() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.5)
        if server.poll() is not None:
            problem = "it exited instead of serving"
        elif address not in out_path.read_text():
            problem = f"it did not say it serves on {address}"
        else:
            with urllib.request.urlopen(address, timeout=30) as response:
                page = response.read().decode("utf-8", "replace")
    finally:
        cpu = tree_cpu_seconds(server.pid)
        if server.poll() is None:  # Ctrl-C, as a user stops it; the whole session in case bash forked
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                problem = problem or "it did not stop on Ctrl-C"
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if problem:
        stderr += f"\n[test] {problem} (waited {SERVER_START_TIMEOUT_S} s to start, 30 s to stop)"
    return Run(command, 0 if page is not None and not problem else -1, stdout, stderr, root,
               time.perf_counter() - start, cpu, page)


@contextlib.contextmanager
def sigint_handled():
    """SIGINT handled (not ignored) in this process, so that servers started meanwhile stop on Ctrl-C even where
    this test runs as a background job, whose SIGINT is ignored and would stay ignored in them: a handled
    signal, unlike an ignored one, is reset by exec. Only the main thread may set it, hence around the lanes."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def lanes(commands: list[Command]) -> list[list[Command]]:
    """The commands in two lanes that run side by side, each in README order in its own copy of the checkout:
    the ```bash blocks that train language models (they end by exporting over the shipped model, which the
    other commands must not see half-written), and every other block (with the servers, which share a port)."""
    training = {c.block for c in commands if re.match(r"python train/train_lm\.py\b", program(c))}
    split = [[c for c in commands if c.block in training], [c for c in commands if c.block not in training]]
    return [lane for lane in split if lane]


def run_lane(lane: list[Command], lane_dir: Path, gpus: int) -> dict[Command, Run | str]:
    """Each command of the lane: its Run, or the reason it was skipped."""
    root = scratch_checkout(lane_dir)
    env = command_environment(root)
    # The copy, not the checkout the package is installed from, is what every command imports (from anywhere).
    origins = subprocess.run(["python", "-c", "import importlib.util as u; "
                              "print(u.find_spec('trm_lm').origin); print(u.find_spec('puzzles').origin)"],
                             cwd=lane_dir, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(origin).is_relative_to(root) for origin in origins), origins
    outcomes = {}
    for command in lane:
        skip = skip_reason(command, root, SHARED_DATA.is_dir(), gpus)
        if skip:
            outcomes[command] = skip
        elif rule_for(command).server:
            outcomes[command] = serve_and_fetch(command, root, env, lane_dir)
        else:
            outcomes[command] = run_command(command, root, env, lane_dir)
    return outcomes


@pytest.mark.slow
def test_readme_commands_work_as_written(tmp_path):
    import concurrent.futures

    import torch

    commands = readme_commands()
    uncovered = [f"line {c.line}: {c.text}" for c in commands if rule_for(c) is None]
    assert not uncovered, f"new README command not covered: {uncovered}"
    assert len(set(commands)) == len(commands), "two identical commands on one README line"
    gpus, outcomes, start = torch.cuda.device_count(), {}, time.perf_counter()
    with sigint_handled(), concurrent.futures.ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(run_lane, lane, tmp_path / f"lane{i}", gpus) for i, lane in enumerate(lanes(commands))]:
            outcomes.update(done.result())

    failures, report, runs = [], [], []
    for command in commands:
        outcome = outcomes[command]
        if isinstance(outcome, str):
            report.append(f"SKIPPED line {command.line}: {command.text}  ({outcome})")
            continue
        run, rule = outcome, rule_for(command)
        runs.append(run)
        report.append(f"RUN     line {command.line}: {command.text}  ({run.seconds:.1f} s, "
                      f"CPU {run.cpu_seconds:.1f} s)")
        if run.returncode != rule.expected_returncode:
            failures.append(f"exit code {run.returncode}, expected {rule.expected_returncode}:\n{run.describe()}")
            continue
        try:
            rule.check(run)
        except (AssertionError, KeyError, ValueError) as error:
            failures.append(f"wrong output ({type(error).__name__}: {error}):\n{run.describe()}")
    report.append(f"{len(runs)} commands run in two lanes: {time.perf_counter() - start:.0f} s wall, "
                  f"{sum(r.seconds for r in runs):.0f} s of commands, {sum(r.cpu_seconds for r in runs):.0f} s CPU")
    print("\n".join(report))
    assert not failures, f"{len(failures)} README command(s) do not work as written:\n\n" + "\n\n".join(failures)
