"""What several test modules share that is not a fixture (the fixtures are in conftest.py, built from these).

`build_tiny_model`: a tiny saved TRM language model + byte-level BPE tokenizer (config.json, model.safetensors,
the remote-code .py files, tokenizer.json, tokenizer_config.json), in about a second. The weights are random
(seeded), so generations are gibberish but deterministic for a given seed. `build_tiny_solver`: the same for a
random 6x6 Sudoku grid model (puzzles/). `load_script` (import generate/generate.py or app.py as a module),
`running_app` (the Gradio app on a free loopback port), `run_isolated` (a fresh user's interpreter that cannot
import trm_lm), and the CLI-call and bad-input helpers of the robustness tests.
"""

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from puzzles.model import PuzzleTRMConfig, TRMPuzzleModel
from puzzles.sudoku import SudokuShape
from trm_lm import TRMConfig, TRMForCausalLM
from trm_lm.data import train_bpe_tokenizer

# A few sentences in the TinyStories style: enough merges for a ~300-token vocabulary, no data files needed.
TOKENIZER_TEXT = [
    "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.",
    "One day, Tom found a big red ball under the tree. He was very happy and ran to show his mom.",
    "The cat and the bird were friends. They played in the garden every day until the sun went down.",
    "Lily said, \"Mom, can we go to the park?\" Her mom smiled and said, \"Yes, we can go after lunch.\"",
    "Tim wanted to help his friend. He gave him a toy car, and they both laughed and played together.",
    "The little dog was sad because it lost its bone. A kind boy helped the dog look for it in the grass.",
] * 4

TINY_VOCAB_SIZE = 300
TINY_CONTEXT = 128  # small, so that prompt truncation is easy to trigger in tests


def build_tiny_model(path: Path, seed: int = 0, **config_overrides) -> Path:
    """Train the tokenizer, build a random tiny TRM (TRMConfig fields in `config_overrides` change it), and
    `save_pretrained` both into `path`."""
    tokenizer = train_bpe_tokenizer(TOKENIZER_TEXT, vocab_size=TINY_VOCAB_SIZE)
    tokenizer.model_max_length = TINY_CONTEXT
    config = TRMConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=2, net_layers=1, latent_steps=1, cycles=2,
        supervision_steps=2, max_position_embeddings=TINY_CONTEXT, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config_overrides,
    )
    torch.manual_seed(seed)
    model = TRMForCausalLM(config).eval()
    # A fresh halt head never halts (weight 0, bias -5); give it random weights and no bias, so that at
    # halt_threshold=0.5 about half the tokens exit after the first supervision step and half run both.
    halt_head = model.model.core.halt_head
    with torch.no_grad():
        halt_head.weight.normal_(0.0, 0.5)
        halt_head.bias.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path




SOLVER_SHAPE = SudokuShape.from_size(6)
SOLVER_TRAINED_STEPS = 3


def build_tiny_solver(path: Path, seed: int = 0, halt_bias: float | None = None, task: str | None = "sudoku",
                      **config) -> Path:
    """A random tiny 6x6 Sudoku TRMPuzzleModel saved to `path`; `halt_bias` sets q_halt for every step (the
    halting head's weight is zeroed), `task` goes into puzzle_task.json (None: no such file)."""
    config = PuzzleTRMConfig(**{"vocab_size": SOLVER_SHAPE.vocab_size, "num_cells": SOLVER_SHAPE.num_cells,
                                "hidden_size": 16, "num_attention_heads": 2, "net_layers": 1, "latent_steps": 1,
                                "cycles": 2, "supervision_steps": SOLVER_TRAINED_STEPS, "puzzle_emb_len": 2,
                                "loss_type": "softmax", **config})
    torch.manual_seed(seed)
    model = TRMPuzzleModel(config)
    if halt_bias is not None:
        with torch.no_grad():
            model.core.halt_head.weight.zero_()
            model.core.halt_head.bias.fill_(halt_bias)
    model.save_pretrained(path)
    if task is not None:
        grid_shape = [SOLVER_SHAPE.size, SOLVER_SHAPE.size]
        (path / "puzzle_task.json").write_text(json.dumps({"task": task, "grid_shape": grid_shape}))
    return path




REPO_ROOT = Path(__file__).resolve().parents[1]


# Prelude for a "fresh user" subprocess (run with `python -I`): trm_lm must not be importable there, also when
# it is pip-installed in this environment (CI installs it in editable mode), so the only TRM code that can
# load is the remote code saved next to the weights.
WITHOUT_TRM_LM = """
import sys
sys.modules["trm_lm"] = None  # any `import trm_lm` now raises ImportError
try:
    import trm_lm
except ImportError:
    pass
else:
    raise AssertionError("trm_lm must not be importable here")
"""


def run_isolated(script: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` as a fresh user would: `python -I` (neither the cwd nor PYTHONPATH on sys.path) from `tmp_path`
    (the repository invisible), no stdin, with its own transformers remote-code module cache."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    return subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def load_script(relative_path: str):
    """Import a repo script (e.g. 'generate/generate.py', 'app.py') as a module, wherever pytest runs from."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"trm_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slow_down(model, monkeypatch, seconds: float) -> None:
    """Every forward pass of `model` takes `seconds` longer (until the test ends): the tiny model decodes faster
    than streaming or a Stop click can be observed."""
    import time

    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)


_DECODERS = {}  # url -> the BatchedDecoder of the app serving there


def running_decoder(url: str):
    """The BatchedDecoder behind a running_app's url (its batch_sizes show what was decoded together)."""
    return _DECODERS[url]


@contextmanager
def running_app(model_dir: Path, **build_kwargs):
    """Yield (url, model, tokenizer) while app.py's demo serves the model on 127.0.0.1 (queue as in main)."""
    app = load_script("app.py")
    model, tokenizer = app.load_model_and_tokenizer(model_dir, device="cpu")
    demo = app.build_demo(model, tokenizer, **build_kwargs)
    app.serve(demo)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    _DECODERS[url] = demo.decoder
    try:
        yield url, model, tokenizer
    finally:
        demo.close()
        demo.decoder.close()
        del _DECODERS[url]


def run_cli(cli, capsys, *args):
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, message):
    assert code == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def big_prompt(chars: int) -> str:
    """`chars` characters of seeded story-like words (a pasted book, not one repeated token)."""
    words = "Once upon a time there was a little girl named Lily who liked to play in the park with Tom".split()
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(chars // 3))[:chars]


def garbage(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))
