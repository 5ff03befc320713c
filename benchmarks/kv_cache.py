"""KV cache that does not grow with recursion: exact slots (one per virtual layer), shared step slots, and a
model trained with first-step context.

    python benchmarks/kv_cache.py                                   # shipped model, first 100 valid stories
    python benchmarks/kv_cache.py --models outputs/tinystories-v4-cpu-every-step outputs/tinystories-v4-cpu-first-step

Three ways to keep the cache at one supervision step's slots, each compared with the first --models entry's
exact cache (same stories, same bytes):
- `share_step_cache=True` on an every_step model (inference only): the N_sup steps share one step's slots, so
  every earlier token is seen at the last step it computed. That is not what the model was trained on.
- a model trained with `step_context="first_step"`: later steps attend to the earlier tokens' first-step
  keys/values, so its cache holds one step's slots and its cached decode is still exact. Give it next to the
  every_step model trained on the same schedule (train/configs/tinystories-v4-cpu-*.yaml) so that the
  difference is the context alone.
Each story is scored token by token through the cache (teacher forcing, same protocol and bytes as
`python -m trm_lm.evaluate`); an exact row must equal the full-forward score. Also: KV memory per token of
context, measured from the cache after a greedy decode, and tokens/s.
Writes outputs/benchmarks/kv_cache.{json,md}; with --update-results benchmarks/results/ (committed).
"""

import argparse
import json
import statistics
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


def relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def cache_kind(row) -> str:
    if row["share_step_cache"]:
        return "shared step slots (1 step)"
    if row["step_context"] == "first_step":
        return "first-step context (1 step)"
    return f"exact ({row['supervision_steps']} steps)"


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[str(SHIPPED)],
                        help="model folders; the first one's exact cache is the reference of every row")
    parser.add_argument("--validation_file", default=str(VALID))
    parser.add_argument("--documents", type=int, default=100, help="first N stories")
    parser.add_argument("--halt_thresholds", type=float, nargs="*", default=[0.5])
    parser.add_argument("--new_tokens", type=int, default=512, help="greedy decode for memory and tokens/s")
    parser.add_argument("--repeats", type=int, default=3, help="greedy decodes timed per row (median)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    add_results_flags(parser, "kv_cache")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    documents = read_documents(args.validation_file)[: args.documents]

    rows = []
    for model_dir in args.models:
        model = TRMForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cfg = model.config
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, 8 + args.new_tokens)  # speed rows only (RoPE)
        prompt = torch.randint(2, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
        sharing = (False,) if cfg.step_context == "first_step" else (False, True)
        for threshold in [None, *args.halt_thresholds]:
            full = bits_per_byte(model, tokenizer, documents, batch_size=args.batch_size,
                                 forward_kwargs={"halt_threshold": threshold or 0})["bits_per_byte"]
            for shared in sharing:
                kwargs = {"halt_threshold": threshold or 0, "share_step_cache": shared}  # 0 = off
                score = bits_per_byte(CachedScorer(model, **kwargs).eval(), tokenizer, documents,
                                      batch_size=args.batch_size, context_length=512)["bits_per_byte"]
                times = []
                for _ in range(args.repeats):  # the median of a few decodes: one is at the mercy of the machine
                    cache = DynamicCache(config=cfg)
                    start = time.perf_counter()
                    model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=0, cache=cache, **kwargs)
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                rows.append({"model": relative(model_dir), "step_context": cfg.step_context,
                             "supervision_steps": cfg.supervision_steps, "halt_threshold": threshold,
                             "share_step_cache": shared, "cached_bits_per_byte": score,
                             "full_forward_bits_per_byte": full,
                             "kv_bytes_per_token": kv_bytes(cache) / cache.get_seq_length(),
                             "tokens_per_s": args.new_tokens / seconds})
    reference_model = rows[0]["model"]
    for row in rows:
        exact = next(r for r in rows if r["model"] == reference_model and r["halt_threshold"] == row["halt_threshold"]
                     and not r["share_step_cache"])
        row["bits_per_byte_change"] = row["cached_bits_per_byte"] / exact["cached_bits_per_byte"] - 1
        row["kv_memory_ratio"] = exact["kv_bytes_per_token"] / row["kv_bytes_per_token"]
        row["speedup"] = row["tokens_per_s"] / exact["tokens_per_s"]

    result = {"reference": reference_model, "documents": len(documents), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    out = results_path(args, "kv_cache")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# KV cache of one supervision step: shared slots vs first-step context (first {len(documents)} "
             f"stories of {Path(args.validation_file).name} scored token by token through the cache; CPU, "
             f"{result['threads']} threads)", "",
             f"Reference (1/1.0, +0.00%, 1.00x): the exact cache of `{reference_model}` at the same halt "
             "threshold.", "",
             "| model | halt threshold | cache | bits/byte (cached decode) | vs reference | full forward | KiB / token "
             f"| KV memory | tok/s ({args.new_tokens} new, median of {args.repeats}) | speed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['halt_threshold'] if r['halt_threshold'] is not None else 'off'} | "
                     f"{cache_kind(r)} | {r['cached_bits_per_byte']:.4f} | {100 * r['bits_per_byte_change']:+.2f}% | "
                     f"{r['full_forward_bits_per_byte']:.4f} | {r['kv_bytes_per_token'] / 1024:.1f} | "
                     f"1/{r['kv_memory_ratio']:.1f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
