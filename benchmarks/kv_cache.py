"""KV cache that does not grow with recursion: exact slots (one per virtual layer) vs shared step slots.

    python benchmarks/kv_cache.py                                   # shipped model, first 100 valid stories
    python benchmarks/kv_cache.py --documents 200 --halt_thresholds 0.5 --new_tokens 512

`share_step_cache=True` lets the N_sup supervision steps share one step's cache slots: every earlier token is
seen at the last step it computed. That changes what a cached decode computes, so its cost is measured the
way decoding sees the text: each story is scored token by token through the cache (teacher forcing, same
protocol and bytes as `python -m trm_lm.evaluate`). The exact row must equal the full-forward score.
Also: KV memory per token of context, measured from the cache after a greedy decode, and tokens/s.
Writes outputs/benchmarks/kv_cache.{json,md}; with --update-results benchmarks/results/ (committed).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_path import add_results_flags, results_path  # noqa: E402

from trm_lm import TRMForCausalLM  # noqa: E402
from trm_lm.data import read_documents  # noqa: E402
from trm_lm.evaluate import bits_per_byte  # noqa: E402

SHIPPED = REPO / "checkpoints" / "trm-tinystories-small"
VALID = REPO.parent / "shared" / "data" / "tinystories" / "valid.jsonl"


class CachedScorer(nn.Module):
    """model(...).logits computed one token at a time through a fresh DynamicCache, as decoding runs."""

    def __init__(self, model, **forward_kwargs):
        super().__init__()
        self.model, self.forward_kwargs = model, forward_kwargs
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        cache = DynamicCache(config=self.config)
        logits = []
        for t in range(input_ids.shape[1]):  # right padding: a pad only ever follows the real tokens
            out = self.model(input_ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1], cache=cache,
                             use_cache=True, **self.forward_kwargs)
            logits.append(out.logits)
        return type(out)(logits=torch.cat(logits, dim=1))


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.numel())


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--validation_file", default=str(VALID))
    parser.add_argument("--documents", type=int, default=100, help="first N stories")
    parser.add_argument("--halt_thresholds", type=float, nargs="*", default=[0.5])
    parser.add_argument("--new_tokens", type=int, default=512, help="greedy decode for memory and tokens/s")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    add_results_flags(parser, "kv_cache")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TRMForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    documents = read_documents(args.validation_file)[: args.documents]
    cfg = model.config
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 8 + args.new_tokens)  # speed rows only (RoPE)
    prompt = torch.randint(2, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))

    rows = []
    full = {}
    for threshold in [None, *args.halt_thresholds]:
        full[threshold] = bits_per_byte(model, tokenizer, documents, batch_size=args.batch_size,
                                        forward_kwargs={"halt_threshold": threshold or 0})["bits_per_byte"]
        for shared in (False, True):
            kwargs = {"halt_threshold": threshold or 0, "share_step_cache": shared}  # 0 = off
            score = bits_per_byte(CachedScorer(model, **kwargs).eval(), tokenizer, documents, batch_size=args.batch_size,
                                  context_length=512)["bits_per_byte"]
            cache = DynamicCache(config=cfg)
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=0, cache=cache, **kwargs)
            seconds = time.perf_counter() - start
            rows.append({"halt_threshold": threshold, "share_step_cache": shared, "cached_bits_per_byte": score,
                         "full_forward_bits_per_byte": full[threshold],
                         "kv_bytes_per_token": kv_bytes(cache) / cache.get_seq_length(),
                         "tokens_per_s": args.new_tokens / seconds})
    for row in rows:
        exact = next(r for r in rows if r["halt_threshold"] == row["halt_threshold"] and not r["share_step_cache"])
        row["bits_per_byte_change"] = row["cached_bits_per_byte"] / exact["cached_bits_per_byte"] - 1
        row["kv_memory_ratio"] = exact["kv_bytes_per_token"] / row["kv_bytes_per_token"]
        row["speedup"] = row["tokens_per_s"] / exact["tokens_per_s"]

    result = {"model": str(Path(args.model).relative_to(REPO) if Path(args.model).resolve().is_relative_to(REPO)
                           else args.model), "documents": len(documents), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "supervision_steps": cfg.supervision_steps, "rows": rows}
    out = results_path(args, "kv_cache")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# KV cache: exact vs shared step slots ({result['model']}; first {len(documents)} stories of "
             f"{Path(args.validation_file).name} scored token by token through the cache; CPU, "
             f"{result['threads']} threads)", "",
             "| halt threshold | cache slots | bits/byte (cached decode) | vs exact | full forward | KiB / token "
             f"| KV memory | tok/s ({args.new_tokens} new) | speed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['halt_threshold'] if r['halt_threshold'] is not None else 'off'} | "
                     f"{'shared (1 step)' if r['share_step_cache'] else f'exact ({cfg.supervision_steps} steps)'} | "
                     f"{r['cached_bits_per_byte']:.4f} | {100 * r['bits_per_byte_change']:+.2f}% | "
                     f"{r['full_forward_bits_per_byte']:.4f} | {r['kv_bytes_per_token'] / 1024:.1f} | "
                     f"1/{r['kv_memory_ratio']:.1f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
