"""Decode speed of TRMForCausalLM: KV cache on/off (dynamic and static) and compiled decoding at 128/512 new
tokens, ACT on/off at batch 1 and in a batch, and the KV cache's memory per token.

    python benchmarks/decode.py                       # shipped model if present, else a random tiny-stories-size model
    python benchmarks/decode.py --model DIR --new_tokens 128 512 --halt_thresholds 0.5 0.9

Writes outputs/benchmarks/decode.{json,md}; with --update-results benchmarks/results/ (committed).
Greedy decoding with min_new_tokens = max_new_tokens, so every row decodes exactly the same number of tokens. 'net applications / token' counts the network
applications of every position of the decoded sequence (prompt included), from `steps_used`.
In a batch, ACT rows that have halted leave the computation; 'same tokens as batch 1' checks every row
against the same prompt decoded alone with the same setting.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_path import add_results_flags, results_path  # noqa: E402

from trm_lm import TRMConfig, TRMForCausalLM  # noqa: E402
from trm_lm.compiled import CompiledDecoder  # noqa: E402

SHIPPED = REPO / "checkpoints" / "trm-tinystories-small"


def load_model(path: str | None) -> tuple[TRMForCausalLM, str]:
    source = Path(path) if path else SHIPPED
    if source.is_dir():
        return TRMForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), str(source.relative_to(REPO) if source.is_relative_to(REPO)
                                                                   else source)
    torch.manual_seed(0)
    config = TRMConfig(vocab_size=4096, hidden_size=256, num_attention_heads=4, net_layers=2, latent_steps=2, cycles=2,
                       supervision_steps=2, max_position_embeddings=1024)
    return TRMForCausalLM(config).eval(), "random init (default TRMConfig, vocab 4096)"


def compiled_generate(decoder: CompiledDecoder, prompt, new_tokens) -> torch.Tensor:
    """timed_generate's decoding (greedy, exactly `new_tokens`, ACT off) with the compiled decoder."""
    eos = decoder.model.generation_config.eos_token_id
    at_least = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(prompt.shape[1], new_tokens, eos)])
    return decoder.generate(prompt, max_new_tokens=new_tokens, logits_processor=at_least, pad_token_id=0)


def timed_generate(model, prompt, new_tokens, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **kwargs)
    return time.perf_counter() - start, out


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: the shipped model, else random init)")
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--halt_thresholds", type=float, nargs="*", default=[0.5, 0.9])
    parser.add_argument("--halt_criterion", choices=["head", "entropy", "kl"], default="head",
                        help="rule of the ACT rows: the trained halt head (P(halt)), or entropy / KL in nats")
    parser.add_argument("--batch_size", type=int, default=8, help="rows of the batched ACT rows (0: skip)")
    parser.add_argument("--uncached_max", type=int, default=512, help="skip uncached runs longer than this")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached and compiled decodings")
    add_results_flags(parser, "decode")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, source = load_model(args.model)
    cfg = model.config
    # Speed only: RoPE has no learned position table, so let the 8-token prompt + 512 new tokens run even on
    # a model trained with a 512-token context (the guard in forward() protects users, not benchmarks).
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 8 + max(args.new_tokens))
    per_step = cfg.cycles * (cfg.latent_steps + 1)
    prompt = torch.randint(2, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    timed_generate(model, prompt, 4)  # warm-up

    # Compiled decoding: compiled once here (the first call), then timed against the dynamic cache, interleaved
    # so that both see the same machine; the medians of --repeats runs each.
    decoder = CompiledDecoder(model)
    start = time.perf_counter()
    compiled_generate(decoder, prompt, 4)
    compile_seconds = time.perf_counter() - start

    rows = []
    for n in args.new_tokens:
        timings = {"cached": [], "compiled": []}
        for _ in range(args.repeats):
            seconds, cached = timed_generate(model, prompt, n, use_cache=True, halt_threshold=0)
            timings["cached"].append(seconds)
            start = time.perf_counter()
            compiled = compiled_generate(decoder, prompt, n)
            timings["compiled"].append(time.perf_counter() - start)
        cached_s, compiled_s = statistics.median(timings["cached"]), statistics.median(timings["compiled"])
        row = {"new_tokens": n, "cached_tokens_per_s": n / cached_s, "cached_seconds": cached_s,
               "compiled_tokens_per_s": n / compiled_s, "compiled_speedup": cached_s / compiled_s,
               "compiled_identical": bool(torch.equal(compiled, cached)), "compile_seconds": compile_seconds}
        if n <= args.uncached_max:
            uncached_s, uncached = timed_generate(model, prompt, n, use_cache=False, halt_threshold=0)
            row.update(uncached_tokens_per_s=n / uncached_s, uncached_seconds=uncached_s,
                       speedup=uncached_s / cached_s, identical=bool(torch.equal(cached, uncached)))
        static_s, static = timed_generate(model, prompt, n, cache_implementation="static", halt_threshold=0)
        row.update(static_tokens_per_s=n / static_s, static_identical=bool(torch.equal(static, cached)))
        rows.append(row)

    act_rows = []
    n = min(args.new_tokens)
    for threshold in [None, *args.halt_thresholds]:
        act = dict(halt_threshold=threshold or 0, halt_criterion=args.halt_criterion)  # 0 = off
        seconds, out = timed_generate(model, prompt, n, use_cache=True, **act)
        steps = model(out, use_cache=False, **act).steps_used.float()
        act_rows.append({"halt_threshold": threshold, "new_tokens": n, "tokens_per_s": n / seconds,
                         "mean_supervision_steps": steps.mean().item(),
                         "net_applications_per_token": steps.mean().item() * per_step,
                         "max_net_applications_per_token": cfg.net_applications})

    batch_rows = []
    if args.batch_size:
        prompts = torch.randint(2, cfg.vocab_size, (args.batch_size, 8), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(prompts)
        for threshold in [None, *args.halt_thresholds]:
            act = dict(halt_threshold=threshold or 0, halt_criterion=args.halt_criterion)  # 0 = off
            seconds, out = timed_generate(model, prompts, n, attention_mask=mask, **act)
            alone = torch.cat([timed_generate(model, p[None], n, **act)[1] for p in prompts])
            steps = model(out, use_cache=False, **act).steps_used.float()
            batch_rows.append({"halt_threshold": threshold, "batch_size": args.batch_size, "new_tokens": n,
                               "tokens_per_s": args.batch_size * n / seconds,
                               "net_applications_per_token": steps.mean().item() * per_step,
                               "same_tokens_as_batch_1": bool(torch.equal(out, alone))})
        for r in batch_rows:
            r["speedup_vs_off"] = r["tokens_per_s"] / batch_rows[0]["tokens_per_s"]
            r["work_saved"] = 1 - r["net_applications_per_token"] / batch_rows[0]["net_applications_per_token"]

    # Keys and values of every virtual layer, per token of context, in the model's dtype.
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.hidden_size * next(model.parameters()).element_size()

    result = {"model": source, "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "config": {k: getattr(cfg, k) for k in ("hidden_size", "net_layers", "latent_steps", "cycles",
                                                       "supervision_steps", "num_hidden_layers")},
              "kv_cache_bytes_per_token": kv_bytes, "halt_criterion": args.halt_criterion, "cache": rows, "act": act_rows, "batch_act": batch_rows}
    out = results_path(args, "decode")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Decode benchmark ({source}; CPU, {result['threads']} threads, torch {torch.__version__})", "",
             "| new tokens | cached tok/s | uncached tok/s | speed-up | identical tokens | static cache tok/s "
             "| static identical | compiled tok/s | compiled vs cached | compiled identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['new_tokens']} | {r['cached_tokens_per_s']:.1f} | "
                     f"{r.get('uncached_tokens_per_s', float('nan')):.1f} | {r.get('speedup', float('nan')):.1f}x | "
                     f"{r.get('identical', '-')} | {r['static_tokens_per_s']:.1f} | {r['static_identical']} "
                     f"| {r['compiled_tokens_per_s']:.1f} | {r['compiled_speedup']:.2f}x | {r['compiled_identical']} |")
    lines += ["", f"Compiled: `trm_lm.compiled.CompiledDecoder` (`--compile` in generate/generate.py), one "
              f"torch.compile'd decoding step on a static cache of {decoder.max_length} positions; compiling took "
              f"{compile_seconds:.1f} s once (not in the tok/s). Cached and compiled tok/s: medians of "
              f"{args.repeats} interleaved runs; the other columns: one run."]
    lines += ["", f"ACT rule: {args.halt_criterion}", "",
              "| halt threshold | tok/s (cached) | mean supervision steps | net applications / token (max) |",
              "|---|---|---|---|"]
    for r in act_rows:
        lines.append(f"| {r['halt_threshold'] if r['halt_threshold'] is not None else 'off'} | {r['tokens_per_s']:.1f} "
                     f"| {r['mean_supervision_steps']:.2f} | {r['net_applications_per_token']:.2f} "
                     f"({r['max_net_applications_per_token']}) |")
    if batch_rows:
        lines += ["", f"Batch of {args.batch_size} ({n} new tokens each): halted rows leave the computation.", "",
                  "| halt threshold | tok/s (all rows) | vs ACT off | net applications / token | work saved "
                  "| same tokens as batch 1 |", "|---|---|---|---|---|---|"]
        for r in batch_rows:
            lines.append(f"| {r['halt_threshold'] if r['halt_threshold'] is not None else 'off'} | "
                         f"{r['tokens_per_s']:.1f} | {r['speedup_vs_off']:.2f}x | {r['net_applications_per_token']:.2f} "
                         f"| {100 * r['work_saved']:.1f}% | {r['same_tokens_as_batch_1']} |")
    lines += ["", f"KV cache: {kv_bytes / 1024:.1f} KiB per token of context ({cfg.num_hidden_layers} virtual layers "
              f"x keys and values x {cfg.hidden_size} x {next(model.parameters()).element_size()} bytes)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
