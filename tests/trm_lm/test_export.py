"""trm_lm.export: the int8 folder (size, closeness, loading, generation) and the ONNX decoding step (same greedy
tokens as PyTorch), on the tiny random TRM of tests/helpers.py; and the CLI's one-line errors."""

import json

import pytest
import torch

from trm_lm.export import (
    SCALE_SUFFIX,
    WEIGHTS,
    is_int8_folder,
    load_model,
    main,
    onnx_greedy,
    quantize_rows,
)


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    main(["--model", str(tiny_model_dir), "--format", "int8", "--output", str(out)])
    return out


def test_quantize_rows_error_is_at_most_half_a_step():
    weight = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different scales
    weight[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (16, 1) and q.abs().max() <= 127
    assert ((q.float() * scale - weight).abs() <= scale / 2 + 1e-12).all()
    assert (q[3] == 0).all()


def test_int8_folder_is_smaller_and_close(tiny_model_dir, int8_dir):
    assert is_int8_folder(int8_dir) and not is_int8_folder(tiny_model_dir)
    fp32_bytes = (tiny_model_dir / WEIGHTS).stat().st_size
    assert (int8_dir / WEIGHTS).stat().st_size < 0.35 * fp32_bytes  # ~4x smaller (scales and 1-D tensors cost a bit)
    from safetensors import safe_open

    with safe_open(str(int8_dir / WEIGHTS), framework="pt") as tensors:
        dtypes = {name: tensors.get_slice(name).get_dtype() for name in tensors.keys()}
    assert dtypes["model.embed_tokens.weight"] == "I8"  # the tied embedding / LM head is quantized too
    assert dtypes["model.embed_tokens.weight" + SCALE_SUFFIX] == "F32"
    assert "lm_head.weight" not in dtypes  # tied: stored once

    quantized, tokenizer = load_model(int8_dir)
    original, _ = load_model(tiny_model_dir)
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    ids = torch.randint(2, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = quantized(ids).logits, original(ids).logits
    assert (got - want).abs().mean() < 0.05 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.85
    prompt = torch.tensor([tokenizer("Once upon a time").input_ids])
    settings = dict(max_new_tokens=32, do_sample=False, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    agree = quantized.generate(prompt, **settings) == original.generate(prompt, **settings)
    assert agree.float().mean() > 0.8  # greedy tokens mostly agree


def test_int8_folder_with_broken_scales_is_an_error(int8_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(int8_dir, broken)
    tensors = load_file(broken / WEIGHTS)
    name = "model.embed_tokens.weight" + SCALE_SUFFIX
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(broken / WEIGHTS))
    with pytest.raises(ValueError, match="one scale per row"):
        load_model(broken)


def test_generate_cli_runs_an_int8_folder(cli, int8_dir, capsys):
    assert cli.main(["--model", str(int8_dir), "--prompt", "Once upon a time", "--max_new_tokens", "8",
                     "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv, message", [
    (["--format", "int8", "--output", "{tmp}/new"], "model directory not found"),
    (["--model", "{model}", "--format", "int8", "--output", "{int8}"], "already exists and is not an empty folder"),
    (["--model", "{int8}", "--format", "onnx", "--output", "{tmp}/new"], "already an int8 export"),
    (["--model", "{model}", "--format", "onnx", "--output", "{tmp}/new", "--check_tokens", "0"], "--check_tokens"),
    (["--model", "{model}", "--format", "int4", "--output", "{tmp}/new"], "invalid choice"),
])
def test_cli_errors_are_one_line(argv, message, tiny_model_dir, int8_dir, tmp_path, capsys):
    paths = dict(model=tiny_model_dir, int8=int8_dir, tmp=tmp_path)
    argv = [arg.format(**paths) for arg in argv]
    if "--model" not in argv:
        argv = ["--model", str(tmp_path / "missing")] + argv
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "new").exists()  # nothing half-written


@pytest.mark.slow
def test_onnx_step_gives_pytorch_greedy_tokens(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from trm_lm.export import OnnxDecoder

    out = tmp_path / "onnx"
    result = main(["--model", str(tiny_model_dir), "--format", "onnx", "--output", str(out), "--check_tokens", "64"])
    assert result["same_tokens"] and result["check_tokens"] == 64 and result["max_logit_difference"] < 1e-3
    assert json.loads(capsys.readouterr().out)["same_tokens"] is True
    # the decoding loop itself: same tokens as generate() from another prompt, and its length limit
    model, tokenizer = load_model(tiny_model_dir)
    prompt = tokenizer("The little dog was sad").input_ids
    want = model.generate(torch.tensor([prompt]), max_new_tokens=70, do_sample=False, halt_threshold=0,
                          eos_token_id=[], pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    decoder = OnnxDecoder(out / "model.onnx")
    assert onnx_greedy(decoder, prompt, 70) == want
    with pytest.raises(ValueError, match="prompt \\+ new tokens"):
        onnx_greedy(decoder, prompt, decoder.window + 2)
