"""Small devices: an int8 model folder, and the decoding step as an ONNX graph for onnxruntime.

    python -m trm_lm.export --model checkpoints/trm-tinystories-small --format int8 --output out/trm-int8
    python -m trm_lm.export --model checkpoints/trm-tinystories-small --format onnx --output out/trm-onnx

int8 (any causal LM): weight-only, symmetric, one float32 scale per output row ("per channel") for every 2-D
weight, the (tied) embedding / LM head included, which is 40% of the shipped model. safetensors holds the int8
tensor under the weight's own name and its scales under `<name>_scale`; config.json says
`"quantization_config": {"quant_method": "trm_lm_int8", ...}`. `load_int8` dequantizes to float32 at load
(`load_model` loads float and int8 folders alike): the file is ~4x smaller than float32 (~2x smaller than
bf16); compute and memory are the float model's.

onnx (TRM): the cached decoding step, ACT off. Inputs: one token (1, 1), its position (a scalar), and the keys
and values of every virtual layer over a fixed window of W = max_position_embeddings - 1 past slots,
(layers, 1, heads, W, head_dim), left-aligned so that the real entries are the last `position` slots;
outputs: the next-token logits (1, vocab) and the window moved on by one slot (the oldest dropped, this token's
appended), ready to feed back. Why a fixed window: a growing cache's length would be a data-dependent size in
the exported graph (torch.export specializes it to the example's length), and static shapes are what mobile and
web runtimes want (trm_lm/compiled.py decodes on a static cache for the same reason). `OnnxDecoder` runs it with numpy and onnxruntime only
(no torch: what an app on a device would ship), `onnx_greedy` decodes with it, and the export checks that its
greedy tokens equal PyTorch's `generate()` before it returns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from .cli import HelpFormatter
from .generation import check_model_dir, load_model_and_tokenizer, one_line

QUANT_METHOD = "trm_lm_int8"
SCALE_SUFFIX = "_scale"
WEIGHTS = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_INPUTS = ("input_ids", "position", "past_keys", "past_values")
ONNX_OUTPUTS = ("logits", "keys", "values")
ONNX_EXTRA = "pip install 'trm-lm[export]' (onnx, onnxscript, onnxruntime)"
CHECK_PROMPT = "Once upon a time"


# ----------------------------------------------------------------------------------------------------
# int8


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: weight ~ q * scale, q in [-127, 127], scale (rows, 1) float32."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale


def is_int8_folder(path: str | Path) -> bool:
    """Whether `path` is a folder written by `export_int8` (config.json names our quant_method)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return config.get("quantization_config", {}).get("quant_method") == QUANT_METHOD
    except (OSError, ValueError, AttributeError):
        return False


def export_int8(model, tokenizer, output: str | Path) -> Path:
    """Save `model` (float) to `output` with every 2-D weight as per-row int8 + float32 scales."""
    output = Path(output)
    model.float().save_pretrained(output)  # config, remote code, generation config; tied weights stored once
    tokenizer.save_pretrained(output)
    files = sorted(output.glob("*.safetensors"))
    tensors = {}
    for file in files:  # save_pretrained may shard a large model; the int8 file is ~4x smaller, so one is enough
        tensors.update(load_file(file))
        file.unlink()
    (output / "model.safetensors.index.json").unlink(missing_ok=True)
    quantized = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dim() == 2:
            quantized[name], quantized[name + SCALE_SUFFIX] = quantize_rows(tensor)
        else:  # biases, TRM's y/z initial states: small, kept in float32
            quantized[name] = tensor.float().contiguous()
    save_file(quantized, str(output / WEIGHTS), metadata={"format": "pt"})
    config_file = output / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True,
                                     "granularity": "per output row", "scale_suffix": SCALE_SUFFIX}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return output


def dequantized_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 weights of an int8 folder: q * scale for every tensor that has scales."""
    file = Path(path) / WEIGHTS
    state = {}
    with safe_open(str(file), framework="pt") as tensors:
        names = set(tensors.keys())
        for name in sorted(names - {n for n in names if n.endswith(SCALE_SUFFIX)}):
            tensor = tensors.get_tensor(name)
            if name + SCALE_SUFFIX in names:
                scale = tensors.get_tensor(name + SCALE_SUFFIX)
                if tensor.dtype != torch.int8 or scale.shape != (tensor.shape[0], 1):
                    raise ValueError(f"{file}: {name} is not int8 rows with one scale per row "
                                     f"({tensor.dtype}, scales {tuple(scale.shape)})")
                tensor = tensor.float() * scale.float()
            state[name] = tensor
    return state


def load_int8(path: str | Path, trust_remote_code: bool = False):
    """(model in float32, loading info) from an int8 folder: from_pretrained(..., output_loading_info=True)'s
    contract, so `generation.load_model_and_tokenizer` can run its checks on it."""
    path = check_model_dir(path)
    if not is_int8_folder(path):
        raise ValueError(f"{path} is not an int8 folder written by `python -m trm_lm.export --format int8`")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    del config.quantization_config  # the weights given below are plain float32: nothing for transformers to do
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{path}: no causal LM class for model_type {config.model_type!r} (import trm_lm?)")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=dequantized_state_dict(path),
                                       dtype=torch.float32, output_loading_info=True)


def load_model(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a float or an int8 folder, in eval mode on `device`.

    Float folders go through generation.load_model_and_tokenizer, the checked loader of every CLI; int8 folders
    through `load_int8`, with its missing / unexpected / mis-shaped weight check.
    """
    if not is_int8_folder(path):
        return load_model_and_tokenizer(path, device=device)
    model, loading = load_int8(path)
    problems = sorted(loading["missing_keys"]) + sorted(loading["unexpected_keys"])
    if problems or loading["mismatched_keys"]:
        raise ValueError(f"the int8 weights of {path} do not fit its config: {', '.join(problems[:3])}")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------
# ONNX


class DecodingStep(nn.Module):
    """One cached decoding step of a TRMForCausalLM over a fixed KV window (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.window = model.config.max_position_embeddings - 1

    def forward(self, input_ids, position, past_keys, past_values):
        cache = DynamicCache(list(zip(past_keys.unbind(0), past_values.unbind(0))), config=self.model.config)
        # the window is left-aligned: its last `position` slots are real tokens, then this token
        attention_mask = (torch.arange(self.window + 1, device=input_ids.device) >= self.window - position).long()
        out = self.model(input_ids, attention_mask=attention_mask[None], position_ids=position.view(1, 1),
                         cache=cache, use_cache=True, halt_threshold=0)
        keys = torch.stack([layer.keys[:, :, 1:] for layer in cache.layers])  # drop the oldest slot
        values = torch.stack([layer.values[:, :, 1:] for layer in cache.layers])
        return out.logits[:, -1].float(), keys, values


def empty_window(model) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    shape = (cfg.num_hidden_layers, 1, cfg.num_attention_heads, cfg.max_position_embeddings - 1,
             cfg.hidden_size // cfg.num_attention_heads)
    return torch.zeros(shape), torch.zeros(shape)


class OnnxDecoder:
    """The exported step with its KV window, on numpy + onnxruntime only. `decoder(token)` -> next-token logits."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.shape = self.session.get_inputs()[2].shape  # (layers, 1, heads, window, head_dim)
        self.window = self.shape[3]
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = np.zeros(self.shape, np.float32)
        self.position = 0

    def __call__(self, token: int) -> np.ndarray:
        if self.position > self.window:
            raise ValueError(f"the exported step holds at most {self.window + 1} tokens")
        logits, self.keys, self.values = self.session.run(None, {
            "input_ids": np.array([[token]], np.int64), "position": np.array(self.position, np.int64),
            "past_keys": self.keys, "past_values": self.values})
        self.position += 1
        return logits[0]


def onnx_greedy(decoder: OnnxDecoder, prompt_ids: list[int], max_new_tokens: int,
                eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding from the start: the new tokens (stops after eos_token_id, if given)."""
    if not prompt_ids or len(prompt_ids) + max_new_tokens - 1 > decoder.window + 1:
        raise ValueError(f"prompt + new tokens must be 1..{decoder.window + 2} tokens, "
                         f"got {len(prompt_ids)} + {max_new_tokens}")
    decoder.reset()
    for token in prompt_ids:
        logits = decoder(token)
    new = []
    while True:
        new.append(int(logits.argmax()))
        if len(new) == max_new_tokens or new[-1] == eos_token_id:
            return new
        logits = decoder(new[-1])


def export_onnx(model, tokenizer, output: str | Path, check_tokens: int = 64) -> dict:
    """Export `model`'s decoding step to output/model.onnx (+ config and tokenizer) and check that its greedy
    tokens equal `model.generate()`'s for `check_tokens` new tokens (end of text not special-cased).
    Returns {"path", "check_tokens", "same_tokens", "max_logit_difference"}."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as error:
        raise ImportError(f"the ONNX export needs onnx, onnxscript and onnxruntime: {ONNX_EXTRA}") from error
    if getattr(model.config, "model_type", None) != "trm_lm":
        raise ValueError(f"--format onnx exports TRM models (model_type 'trm_lm'), got {model.config.model_type!r}")
    model = model.float().cpu().eval()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    step = DecodingStep(model).eval()
    example = (torch.tensor([[0]]), torch.tensor(3), *empty_window(model))
    with torch.no_grad():  # one file (external_data=False): weights and graph travel together
        torch.onnx.export(step, example, str(output / ONNX_FILE), dynamo=True, external_data=False,
                          input_names=list(ONNX_INPUTS), output_names=list(ONNX_OUTPUTS), verbose=False)
    model.config.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return {"path": str(output / ONNX_FILE), **compare_with_pytorch(model, tokenizer, output / ONNX_FILE,
                                                                    check_tokens)}


@torch.no_grad()
def compare_with_pytorch(model, tokenizer, onnx_path, new_tokens: int, prompt: str = CHECK_PROMPT) -> dict:
    """Greedy tokens of the ONNX step vs model.generate() (cache on, ACT off) for `new_tokens` tokens."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids or [tokenizer.bos_token_id]
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         halt_threshold=0, eos_token_id=[], pad_token_id=tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)
    reference = out.sequences[0, len(prompt_ids):].tolist()
    decoder = OnnxDecoder(onnx_path)
    tokens = onnx_greedy(decoder, prompt_ids, new_tokens)
    # logits of the ONNX step fed the reference tokens: how close the two computations are, step by step
    decoder.reset()
    gaps = []
    for position, token in enumerate(prompt_ids + reference[:-1]):
        logits = decoder(token)
        if position >= len(prompt_ids) - 1:
            gaps.append(float(np.abs(logits - out.logits[position - len(prompt_ids) + 1][0].numpy()).max()))
    return {"check_tokens": new_tokens, "same_tokens": tokens == reference, "max_logit_difference": max(gaps)}


# ----------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (save_pretrained output) or Hub id")
    parser.add_argument("--format", required=True, choices=["int8", "onnx"])
    parser.add_argument("--output", required=True, help="a new (or empty) folder")
    parser.add_argument("--check_tokens", type=int, default=64,
                        help="onnx: greedy tokens compared with PyTorch's after the export")
    args = parser.parse_args(argv)
    if args.check_tokens < 1:
        parser.error(f"--check_tokens must be >= 1, got {args.check_tokens}")
    output = Path(args.output).expanduser()
    existed = output.exists()
    try:
        if existed and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"--output {output} already exists and is not an empty folder: choose a new one")
        if is_int8_folder(args.model):
            raise ValueError(f"{args.model} is already an int8 export: export from the float model")
        model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
        if args.format == "int8":
            result = {"path": str(export_int8(model, tokenizer, output))}
        else:
            result = export_onnx(model, tokenizer, output, args.check_tokens)
    except (OSError, ValueError, ImportError) as error:  # a user error: one line, no traceback
        if not existed:  # no half-written export left behind
            shutil.rmtree(output, ignore_errors=True)
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    result["bytes"] = sum(f.stat().st_size for f in output.iterdir() if f.suffix in (".safetensors", ".onnx"))
    print(json.dumps(result, indent=2))
    if result.get("same_tokens") is False:
        print("error: the ONNX step's greedy tokens differ from PyTorch's", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    hf_logging.set_verbosity_error()  # a command line: no loading / saving chatter around the result
    hf_logging.disable_progress_bar()
    main()
