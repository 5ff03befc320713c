"""Training throughput on CPU: TRM vs a Llama of the same effective depth (same forward FLOPs per token).

    python benchmarks/train_speed.py --config train/configs/tinystories-small.yaml --batch 4 --block 512

Times forward + backward + AdamW step on random tokens for the TRM of the config and the two Llama
baselines of trm_lm.baselines (same parameters; same FLOPs per token). The TRM's first T-1 cycles run
without gradient, so it needs no backward through them: the question is whether that makes it at least
as fast as the equal-depth transformer. Writes outputs/benchmarks/train_speed.{json,md};
with --update-results benchmarks/results/ (committed).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_path import add_results_flags, results_path  # noqa: E402

from transformers import LlamaForCausalLM  # noqa: E402

from trm_lm import TRMForCausalLM  # noqa: E402
from trm_lm.baselines import llama_config_from_trm, trm_config_from_flags  # noqa: E402
from trm_lm.arguments import load_config  # noqa: E402


def tokens_per_second(model, batch: int, block: int, vocab: int, steps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, block), generator=torch.Generator().manual_seed(0))
    elapsed = 0.0
    for step in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            elapsed += time.perf_counter() - start
    return batch * block * steps / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "train" / "configs" / "tinystories-small.yaml"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    add_results_flags(parser, "train_speed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = load_config(args.config)
    trm_config = trm_config_from_flags(values)
    rows = []
    torch.manual_seed(0)
    for name, model in (("trm", TRMForCausalLM(trm_config)),
                        ("llama-params", LlamaForCausalLM(llama_config_from_trm(trm_config, "params"))),
                        ("llama-flops", LlamaForCausalLM(llama_config_from_trm(trm_config, "flops")))):
        tps = tokens_per_second(model, args.batch, args.block, trm_config.vocab_size, args.steps)
        rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()), "tokens_per_s": tps})
        del model
    trm_tps = rows[0]["tokens_per_s"]
    for row in rows:
        row["trm_speed_ratio"] = trm_tps / row["tokens_per_s"]
    result = {"config": args.config, "batch": args.batch, "block": args.block, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    out = results_path(args, "train_speed")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Training throughput (CPU, {result['threads']} threads, batch {args.batch} x {args.block} tokens, "
             f"fwd+bwd+AdamW)", "", "| model | parameters | tokens/s | TRM speed / this |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['tokens_per_s']:.0f} | {r['trm_speed_ratio']:.2f}x |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
