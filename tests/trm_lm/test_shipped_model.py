"""Guards on the shipped checkpoint (checkpoints/trm-tinystories-small) that catch a silently broken cache.

A library upgrade that stops the KV cache from reaching `forward` (transformers 5.24 renamed the keyword)
leaves every unit test of the math green on a random tiny model but makes the real model write loops. So,
on the real weights: cached greedy == uncached greedy for 128 tokens; the CLI's and the app's greedy text
equal the argmax of their own per-step tables (which come from an uncached forward); and the greedy
continuation of a fixed prompt equals a stored text.

The stored text is regenerated only when the checkpoint changes:

    python tests/trm_lm/test_shipped_model.py --regenerate
"""

import ast
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import REPO_ROOT, running_app

SHIPPED = REPO_ROOT / "checkpoints" / "trm-tinystories-small"
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "trm-tinystories-small.json"
GOLDEN_PROMPT = "Once upon a time, there was a little girl named Lily."
GOLDEN_NEW_TOKENS = 96
PROMPT = "Once upon a time"


def weights_sha256() -> str:
    return hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["core.py", "modeling_trm.py", "configuration_trm.py"])
def test_shipped_remote_code_is_the_package_code(name):
    """Users loading the folder with trust_remote_code run these files: they must be the package's, byte for byte
    (refresh with `python -m trm_lm.hub export ... --overwrite` or by copying trm_lm/<file>)."""
    assert (SHIPPED / name).read_bytes() == (REPO_ROOT / "trm_lm" / name).read_bytes(), \
        f"{SHIPPED.name}/{name} is not trm_lm/{name}"


def load_shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trm_lm  # noqa: F401  (registers the classes)

    return AutoModelForCausalLM.from_pretrained(SHIPPED).eval(), AutoTokenizer.from_pretrained(SHIPPED)


def greedy(model, tokenizer, prompt, max_new_tokens, **kwargs):
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, ids.shape[1]:]


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.fail(f"the shipped checkpoint is missing: {SHIPPED}")
    return load_shipped()


def test_library_default_loads_float32(shipped):
    model, _ = shipped
    assert model.dtype == torch.float32  # bf16 compute rounds differently with and without the cache


@pytest.mark.parametrize("halt_threshold", [None, 0.5])
def test_cached_equals_uncached_greedy_for_128_tokens(shipped, halt_threshold):
    model, tokenizer = shipped
    kwargs = dict(halt_threshold=halt_threshold, min_new_tokens=128)
    cached = greedy(model, tokenizer, PROMPT, 128, use_cache=True, **kwargs)
    uncached = greedy(model, tokenizer, PROMPT, 128, use_cache=False, **kwargs)
    assert cached.shape[0] == 128
    assert torch.equal(cached, uncached), (
        f"cached and uncached greedy decoding diverge at token "
        f"{int((cached != uncached).nonzero()[0])}: the KV cache is not reaching forward() correctly")


def test_golden_greedy_continuation(shipped):
    model, tokenizer = shipped
    golden = json.loads(GOLDEN.read_text())
    assert golden["model_sha256"] == weights_sha256(), (
        "the shipped weights changed: regenerate the stored text with `python tests/trm_lm/test_shipped_model.py "
        "--regenerate` and review the new story")
    ids = greedy(model, tokenizer, golden["prompt"], golden["max_new_tokens"])
    assert ids.tolist() == golden["token_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == golden["text"]


def first_prediction(cell: str) -> str:
    """The top-1 token of one per-step cell ("' the' 0.412, ' a' 0.101, ...", tokens as Python literals)."""
    for match in re.finditer(r" \d\.\d{3}(, |$)", cell):
        try:
            return ast.literal_eval(cell[: match.start()])
        except (SyntaxError, ValueError):
            continue
    raise AssertionError(f"no prediction in table cell {cell!r}")


def assert_text_is_table_argmax(story: str, prompt: str, rows: list[list]) -> None:
    """rows: [position, repr(token), steps, step-1 cell, step-2 cell, ...] as inspection.trace_rows makes them."""
    assert rows, "empty per-step table"
    tokens = [ast.literal_eval(row[1]) for row in rows]
    for row, token in zip(rows, tokens):
        last_step_cell = row[3 + int(row[2]) - 1]  # the step at which this token stopped
        assert first_prediction(last_step_cell) == token, f"token {row[0]}: text {token!r}, table {row}"
    assert story == prompt + "".join(tokens)


@pytest.mark.parametrize("halt_threshold", ["0", "0.5"])
def test_cli_greedy_text_equals_its_table_argmax(cli, capsys, halt_threshold):
    code = cli.main(["--model", str(SHIPPED), "--prompt", PROMPT, "--max_new_tokens", "80", "--temperature", "0",
                     "--halt_threshold", halt_threshold, "--show_steps", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    story, table = out.split("\n\n", 1)
    assert len(story) > len(PROMPT) + 100
    # Parse the printed table back into rows: cells start where the header's cells start (2+ spaces apart).
    lines = table.rstrip("\n").splitlines()
    header, body = lines[0], lines[1:-1]
    assert header.split()[:3] == ["position", "token", "steps"]
    starts = [0] + [m.end() for m in re.finditer(r"  +", header)]
    rows = [[line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in body]
    assert_text_is_table_argmax(story, PROMPT, rows)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # gradio's own pandas use
def test_app_greedy_text_equals_its_table_argmax():
    gradio_client = pytest.importorskip("gradio_client")
    with running_app(SHIPPED) as (url, model, _):
        client = gradio_client.Client(url, verbose=False)
        steps = model.config.supervision_steps
        #                                    temperature, top_p, max_new_tokens, halt_threshold, steps, seed
        story, _, table, _ = client.predict(PROMPT, 0.0, 1.0, 80, 0.5, steps, 0, api_name="/generate")
    assert len(story) > len(PROMPT) + 100
    assert_text_is_table_argmax(story, PROMPT, table["data"])


def regenerate() -> None:
    model, tokenizer = load_shipped()
    ids = greedy(model, tokenizer, GOLDEN_PROMPT, GOLDEN_NEW_TOKENS)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "prompt": GOLDEN_PROMPT, "max_new_tokens": GOLDEN_NEW_TOKENS, "model_sha256": weights_sha256(),
        "text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids.tolist(),
    }, indent=1) + "\n")
    print(f"wrote {GOLDEN}:\n{GOLDEN_PROMPT}{tokenizer.decode(ids, skip_special_tokens=True)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {Path(__file__).name} --regenerate   (rewrites {GOLDEN.name} from the shipped model)")
    regenerate()
