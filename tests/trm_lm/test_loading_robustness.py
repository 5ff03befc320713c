"""The one model loader (trm_lm.generation.load_model_and_tokenizer) against damaged model folders, through the
generate CLI: each damage is one clear line naming what is wrong, and a float64 checkpoint loads exactly.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli
import torch
from safetensors.torch import load_file, save_file

from trm_lm.generation import GenerationSettings, generate_text, load_model_and_tokenizer

PROMPT = "Once upon a time"


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
def damaged(tiny_model_dir, tmp_path_factory):
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


def test_float64_checkpoint_is_cast_back_exactly(damaged, tiny_model_dir):
    """Weights saved as float64 load as the config's float32, value for value (float32 -> float64 is exact)."""
    reference, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    model, _ = load_model_and_tokenizer(damaged["float64_weights"], device="cpu")
    assert model.dtype == torch.float32
    for (name, expected), (_, loaded) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(expected, loaded), name
    settings = GenerationSettings(max_new_tokens=10, temperature=0.9, seed=3)
    assert generate_text(model, tokenizer, PROMPT, settings).token_ids == \
        generate_text(reference, tokenizer, PROMPT, settings).token_ids


