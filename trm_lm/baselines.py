"""Standard Llama baselines sized against a TRM, and the parameter / FLOP counts that justify the sizes.

A claim that recursion helps needs two comparisons (trm-language.md §5.2):
  * params: the same unique parameters. Llama with the TRM's width, MLP and heads and `net_layers`
    layers, each applied once.
  * flops:  the same forward compute per token. A TRM applies its `net_layers` blocks
    supervision_steps * cycles * (latent_steps + 1) times per token, so the Llama gets that many layers
    (each one its own weights).

    python -m trm_lm.baselines --config train/configs/tinystories-small.yaml

FLOPs are forward FLOPs per token at inference (every supervision step run, no early exit), counted as
2 per multiply-accumulate of the weight matrices, plus attention scores and the weighted sum of values
(2 * 2 * head_dim * heads per attended position, averaged over a causal block of `context_length`
tokens), plus the LM head once. Norms, activations and the TRM's additive injections are not counted
(less than 1% here). Training costs more for a TRM: T-1 of its cycles run without gradient, and the
LM head runs after every supervision step.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedConfig

from .configuration_trm import TRMConfig

TRM_FIELDS = frozenset(f.name for f in dataclasses.fields(TRMConfig))


def trm_config_from_flags(values: Mapping, **overrides) -> TRMConfig:
    """A TRMConfig from a flat mapping of flags / YAML keys: keys that are TRMConfig fields are used,
    None values mean the TRMConfig default, everything else is ignored. `overrides` win."""
    kwargs = {k: v for k, v in values.items() if k in TRM_FIELDS and v is not None}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    kwargs.pop("num_hidden_layers", None)  # derived by TRMConfig
    return TRMConfig(**kwargs)


def llama_config_from_trm(trm: TRMConfig, match: Literal["params", "flops"] = "params") -> LlamaConfig:
    """A LlamaConfig with the TRM's width, MLP width, heads, vocabulary, context, RoPE base and tied
    embeddings, and as many layers as `match` asks: net_layers ("params") or the TRM's number of
    virtual layers, net_layers * supervision_steps * cycles * (latent_steps + 1) ("flops")."""
    if match not in ("params", "flops"):
        raise ValueError(f"match must be 'params' or 'flops', got {match!r}")
    layers = trm.net_layers if match == "params" else trm.net_layers * trm.net_applications
    return LlamaConfig(
        vocab_size=trm.vocab_size,
        hidden_size=trm.hidden_size,
        intermediate_size=trm.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=trm.num_attention_heads,
        num_key_value_heads=trm.num_attention_heads,
        max_position_embeddings=trm.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": trm.rope_theta},
        rms_norm_eps=trm.rms_norm_eps,
        tie_word_embeddings=trm.tie_word_embeddings,
        bos_token_id=trm.bos_token_id,
        eos_token_id=trm.eos_token_id,
        pad_token_id=trm.pad_token_id,
    )


def count_parameters(config: PreTrainedConfig) -> dict[str, int]:
    """Exact parameter counts of the model `config` builds (instantiated on the meta device: no memory).

    Returns {"total", "embedding", "non_embedding"}; tied embedding / LM head weights count once.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    embedding = model.get_input_embeddings().weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.get_output_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def virtual_layers(config: PreTrainedConfig) -> int:
    """Transformer blocks one token passes through in a forward (TRM: every application of every block)."""
    if isinstance(config, TRMConfig):
        return config.net_layers * config.net_applications
    return config.num_hidden_layers


def forward_flops_per_token(config: PreTrainedConfig, context_length: int) -> int:
    """Forward FLOPs per token (see the module docstring for what is counted)."""
    d, inner = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    projections = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d  # q, k, v, o
    mlp = 3 * d * inner  # SwiGLU: gate, up, down
    mean_context = (context_length + 1) / 2  # causal: position t attends to t + 1 positions
    attention = 2 * 2 * heads * head_dim * mean_context  # q.k scores and the weighted sum of v
    per_layer = 2 * (projections + mlp) + attention
    lm_head = 2 * d * config.vocab_size
    return int(virtual_layers(config) * per_layer + lm_head)


def baseline_table(trm: TRMConfig, context_length: int | None = None) -> list[dict]:
    """One row per model (TRM, Llama params-matched, Llama FLOPs-matched): layers, params, FLOPs/token."""
    context_length = context_length or trm.max_position_embeddings
    rows = []
    for name, config in (("trm", trm), ("llama-params", llama_config_from_trm(trm, "params")),
                         ("llama-flops", llama_config_from_trm(trm, "flops"))):
        params = count_parameters(config)
        rows.append({
            "model": name,
            "unique_layers": trm.net_layers if name == "trm" else config.num_hidden_layers,
            "virtual_layers": virtual_layers(config),
            "params": params["total"],
            "non_embedding_params": params["non_embedding"],
            "forward_flops_per_token": forward_flops_per_token(config, context_length),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["model", "unique layers", "virtual layers", "params", "non-emb params", "fwd FLOPs/token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['unique_layers']} | {r['virtual_layers']} | {r['params']:,} | "
                     f"{r['non_embedding_params']:,} | {r['forward_flops_per_token'] / 1e6:.1f} M |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from .arguments import load_config

    parser = argparse.ArgumentParser(description="Parameter- and FLOP-matched Llama baselines for a TRM config.")
    parser.add_argument("--config", required=True, help="a training YAML config (train/configs/*.yaml)")
    parser.add_argument("--context_length", type=int, default=None, help="default: block_size of the config")
    args = parser.parse_args(argv)
    values = load_config(args.config)
    block_size = values.get("block_size", 512)
    trm = trm_config_from_flags(values, max_position_embeddings=values.get("max_position_embeddings") or block_size)
    context_length = args.context_length or block_size
    rows = baseline_table(trm, context_length)
    print(f"{args.config}: vocab {trm.vocab_size}, hidden {trm.hidden_size}, context {context_length}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
