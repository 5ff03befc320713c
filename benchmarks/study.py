"""The TRM-vs-transformer study on TinyStories: score trained arms, draw the curves, write the tables.

Train the arms first (same data, tokenizer and schedule; see docs/results.md):
    python train/train_lm.py --config train/configs/tinystories-cpu.yaml          # (a) TRM -> outputs/tinystories-cpu
    python train/train_lm.py --config train/configs/study-llama-params.yaml       # (b) Llama, same parameters
    python train/train_lm.py --config train/configs/study-llama-flops.yaml        # (c) Llama, same FLOPs/token
    python train/train_lm.py --config train/configs/study-trm-shallow.yaml        # (d) TRM, T=1, n=1
then
    python benchmarks/study.py [--arms trm llama-params llama-flops trm-shallow] [--act_documents 200]

For every arm that has a trained model: bits/byte on all 1,000 validation stories (trm_lm.evaluate,
generation path, context 512), parameters, training tokens/s (from its log.jsonl), decode tokens/s
with the KV cache. For the TRM arm: the ACT trade-off (halting threshold vs bits/byte vs network
applications per token) for the trained halt head and two training-free rules (entropy, KL between
steps). Writes outputs/benchmarks/study.{json,md,png}; with --update-results benchmarks/results/study.{json,md}
and docs/*.png (committed). TRM_LM_SMOKE=1 in the environment makes
it a smoke run (2 documents, 8 decoded tokens, one threshold per ACT rule) that only checks the script works.
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

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import trm_lm  # noqa: E402,F401  (registers the TRM classes)
from trm_lm.data import read_documents  # noqa: E402
from trm_lm.evaluate import bits_per_byte  # noqa: E402
from trm_lm.arguments import apply_smoke_limits, smoke_run  # noqa: E402

from results_path import add_results_flags, results_path  # noqa: E402

ARMS = {  # arm -> label; its run lives in outputs/study/<arm>, except the TRM arm (the shipped model's run)
    "trm": "(a) TRM, n=2 T=2 N_sup=2",
    "llama-params": "(b) Llama, same parameters",
    "llama-flops": "(c) Llama, same FLOPs/token",
    "trm-shallow": "(d) TRM, recursion down (T=1, n=1)",
}
ACT_SWEEP = {
    "head": [0.99, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3],
    "entropy": [0.25, 0.5, 1.0, 2.0, 3.0, 5.0],
    "kl": [0.001, 0.01, 0.05, 0.2, 1.0],
}


class StepCounter(torch.nn.Module):
    """Wraps a TRM so that bits_per_byte's forwards also count supervision steps per real token."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.steps = self.positions = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, **kwargs)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        self.steps += int(out.steps_used[real].sum())
        self.positions += int(real.sum())
        return out


def training_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, new_tokens: int = 128) -> float:
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)
    return new_tokens / (time.perf_counter() - start)


def act_curve(model, tokenizer, documents, sweep: dict[str, list[float]] = ACT_SWEEP) -> list[dict]:
    cfg = model.config
    per_step = cfg.cycles * (cfg.latent_steps + 1)
    points = []
    for criterion, thresholds in sweep.items():
        for threshold in [None] + thresholds if criterion == "head" else thresholds:
            counter = StepCounter(model)
            scores = bits_per_byte(counter, tokenizer, documents, batch_size=8,
                                   forward_kwargs=dict(halt_threshold=threshold or 0, halt_criterion=criterion))  # 0 = off
            mean_steps = counter.steps / counter.positions
            points.append({"criterion": criterion if threshold is not None else "off", "threshold": threshold,
                           "bits_per_byte": scores["bits_per_byte"], "mean_supervision_steps": mean_steps,
                           "net_applications_per_token": mean_steps * per_step})
            print(f"  ACT {criterion:7s} {threshold!s:6s} bpb={scores['bits_per_byte']:.4f} "
                  f"net/token={mean_steps * per_step:.2f}", flush=True)
    return points


def plot(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in results["arms"]:
        log = [r for r in arm["log"] if "loss" in r]
        if log:
            ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=ARMS[arm["arm"]])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats; TRM: mean over steps + 0.5 halt BCE)")
    ax.set_title("Training loss, same tokens / tokenizer / schedule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "study_loss_curves.png", dpi=110)
    written.append("study_loss_curves.png")
    if results.get("act"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for criterion, marker in (("head", "o"), ("entropy", "s"), ("kl", "^")):
            pts = sorted((p for p in results["act"] if p["criterion"] in (criterion, "off")),
                         key=lambda p: p["net_applications_per_token"])
            ax.plot([p["net_applications_per_token"] for p in pts], [p["bits_per_byte"] for p in pts],
                    marker=marker, label={"head": "trained halt head", "entropy": "entropy (training-free)",
                                          "kl": "KL between steps (training-free)"}[criterion])
        ax.set_xlabel("network applications per token (mean)")
        ax.set_ylabel(f"bits/byte ({results['act_documents']} validation stories)")
        ax.set_title("ACT trade-off of the TRM arm")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "study_act_curve.png", dpi=110)
        written.append("study_act_curve.png")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(REPO / "outputs" / "study"))
    parser.add_argument("--trm_run", default=str(REPO / "outputs" / "tinystories-cpu"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--validation_file", default=str(REPO.parent / "shared" / "data" / "tinystories" /
                                                         "valid.jsonl"))
    parser.add_argument("--act_documents", type=int, default=200)
    parser.add_argument("--max_documents", type=int, default=None, help="score the first N documents (default: all)")
    parser.add_argument("--decode_tokens", type=int, default=128, help="tokens decoded to time the KV-cache decoding")
    add_results_flags(parser, "study")
    parser.add_argument("--plots", default=None,
                        help="folder for the plots (default: docs/ with --update-results, else next to the tables)")
    args = parser.parse_args(argv)
    act_sweep = ACT_SWEEP
    if smoke_run():
        apply_smoke_limits((args,), {"max_documents": 2, "act_documents": 2, "decode_tokens": 8})
        act_sweep = {criterion: thresholds[:1] for criterion, thresholds in ACT_SWEEP.items()}
    documents = read_documents(args.validation_file)[: args.max_documents]
    results = {"validation_file": Path(args.validation_file).name, "documents": len(documents),
               "threads": torch.get_num_threads(), "arms": [], "act_documents": args.act_documents}
    for arm in args.arms:
        run = Path(args.trm_run) if arm == "trm" else Path(args.runs) / arm
        if not (run / "model.safetensors").exists():
            print(f"{arm}: no trained model in {run}, skipped", flush=True)
            continue
        model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(run)
        start = time.perf_counter()
        scores = bits_per_byte(model, tokenizer, documents, batch_size=8)
        log = training_log(run)
        train_tps = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
        row = {"arm": arm, "label": ARMS[arm], "parameters": sum(p.numel() for p in model.parameters()),
               "bits_per_byte": scores["bits_per_byte"], "loss_per_token": scores["loss_per_token"],
               "tokens": scores["tokens"], "bytes": scores["bytes"], "eval_seconds": time.perf_counter() - start,
               "train_tokens_per_s": sum(train_tps) / len(train_tps) if train_tps else None,
               "train_wall_s": log[-1].get("elapsed_s") if log else None,
               "decode_tokens_per_s": decode_tokens_per_s(model, tokenizer, args.decode_tokens), "log": log}
        print(f"{arm}: bpb={row['bits_per_byte']:.4f} params={row['parameters']:,}", flush=True)
        results["arms"].append(row)
        if arm == "trm":
            results["act"] = act_curve(model, tokenizer, documents[:args.act_documents], act_sweep)
    out = results_path(args, "study")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plots_dir = Path(args.plots) if args.plots else REPO / "docs" if args.update_results else out.parent
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(results, plots_dir)
    lines = [f"# TRM vs transformer on TinyStories ({results['documents']} validation stories, bits/byte)", "",
             "| arm | parameters | val bits/byte | nats/token | train tok/s (log) | decode tok/s (cache) |",
             "|---|---|---|---|---|---|"]
    for r in results["arms"]:
        lines.append(f"| {r['label']} | {r['parameters']:,} | {r['bits_per_byte']:.4f} | {r['loss_per_token']:.4f} "
                     f"| {r['train_tokens_per_s'] or float('nan'):.0f} | {r['decode_tokens_per_s']:.1f} |")
    if results.get("act"):
        lines += ["", f"ACT trade-off (TRM arm, first {args.act_documents} validation stories):", "",
                  "| rule | threshold | bits/byte | mean supervision steps | net applications / token |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['criterion']} | {p['threshold'] if p['threshold'] is not None else '-'} | "
                  f"{p['bits_per_byte']:.4f} | {p['mean_supervision_steps']:.3f} | "
                  f"{p['net_applications_per_token']:.2f} |" for p in results["act"]]
    shown = plots_dir.relative_to(REPO) if plots_dir.is_relative_to(REPO) else plots_dir
    lines += ["", "Plots: " + ", ".join(f"{shown}/{p}" for p in plots)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
