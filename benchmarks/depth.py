"""Does thinking longer help text? Test-time depth and per-token early exit of one trained TRM.

    python benchmarks/depth.py --model checkpoints/trm-tinystories-small [--documents 200] [--update-results]

1. Test-time depth: bits/byte of the same validation stories with supervision steps 1 ... 2 x N_sup (more
   steps than trained reuse the shared network; the cache gets the extra slots, scoring here is uncached).
2. The ACT curve at the trained depth: threshold vs bits/byte vs network applications per token (off = every
   step) for the trained halt head and the two training-free rules (next-token entropy, KL between steps).
Writes outputs/benchmarks/depth.{json,md}; with --update-results benchmarks/results/depth.{json,md}.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from study import StepCounter  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import trm_lm  # noqa: E402,F401  (registers the TRM classes)
from trm_lm.data import read_documents  # noqa: E402
from trm_lm.evaluate import bits_per_byte  # noqa: E402

ACT_SWEEP = {  # halt_criterion -> thresholds (the head: P(halt); entropy and KL: nats)
    "head": [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3],
    "entropy": [0.5, 1.0, 1.5, 2.0, 3.0],
    "kl": [0.01, 0.05, 0.1, 0.3],
}


def score(model, tokenizer, documents, **forward_kwargs) -> dict:
    counter = StepCounter(model)
    result = bits_per_byte(counter, tokenizer, documents, batch_size=8, forward_kwargs=forward_kwargs)
    per_step = model.config.cycles * (model.config.latent_steps + 1)
    mean_steps = counter.steps / counter.positions
    return {"bits_per_byte": result["bits_per_byte"], "mean_supervision_steps": mean_steps,
            "net_applications_per_token": mean_steps * per_step}


def markdown(results: dict) -> str:
    trained = results["trained_supervision_steps"]
    lines = [f"# Test-time depth and ACT ({results['model']}; first {results['documents']} validation stories)", "",
             f"`{results['command']}` — {results['machine']}; {results['seconds']:.0f} s.", "",
             f"Trained with N_sup = {trained}. Bits/byte when every token runs k supervision steps:", "",
             "| supervision steps | bits/byte | vs trained | network applications / token |", "|---|---|---|---|"]
    reference = results["act"][0]["bits_per_byte"]  # ACT off = every token runs the trained steps
    for row in results["depth"]:
        mark = " (trained)" if row["supervision_steps"] == trained else ""
        lines.append(f"| {row['supervision_steps']}{mark} | {row['bits_per_byte']:.4f} | "
                     f"{row['bits_per_byte'] - reference:+.4f} | {row['net_applications_per_token']:.1f} |")
    lines += ["", "Per-token ACT at the trained depth: the trained halt head (threshold on P(halt)) and two "
              "training-free rules (halt once the next-token entropy, or the KL from the previous step, is at most "
              "the threshold in nats):", "",
              "| rule | threshold | bits/byte | vs off | mean steps / token | network applications saved |",
              "|---|---|---|---|---|---|"]
    off = results["act"][0]
    for row in results["act"]:
        saved = 1 - row["net_applications_per_token"] / off["net_applications_per_token"]
        rule = {"head": "halt head", "entropy": "entropy", "kl": "KL"}[row.get("criterion", "head")]
        lines.append(f"| {rule if row['threshold'] is not None else 'off'} | "
                     f"{row['threshold'] if row['threshold'] is not None else '-'} | {row['bits_per_byte']:.4f} | "
                     f"{100 * (row['bits_per_byte'] / off['bits_per_byte'] - 1):+.2f}% | "
                     f"{row['mean_supervision_steps']:.2f} | {100 * saved:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "trm-tinystories-small"))
    parser.add_argument("--validation_file", default=str(REPO.parent / "shared" / "data" / "tinystories" /
                                                         "valid.jsonl"))
    parser.add_argument("--documents", type=int, default=200, help="first N validation stories")
    parser.add_argument("--max_depth", type=int, default=None, help="default: 2 x the trained steps")
    parser.add_argument("--update-results", action="store_true", help="write benchmarks/results/ (committed)")
    args = parser.parse_args(argv)
    if args.documents < 1:
        parser.error("--documents must be >= 1")

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    documents = read_documents(args.validation_file)[: args.documents]
    trained = model.config.supervision_steps
    depths = range(1, (args.max_depth or 2 * trained) + 1)
    results = {"model": Path(args.model).name, "documents": len(documents), "trained_supervision_steps": trained,
               "command": " ".join(["python", "benchmarks/depth.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "depth": [], "act": []}
    act_settings = [("head", None)] + [(rule, t) for rule, thresholds in ACT_SWEEP.items() for t in thresholds]
    with tqdm(total=len(depths) + len(act_settings), desc="scoring", unit="setting") as progress:
        for steps in depths:
            row = {"supervision_steps": steps, **score(model, tokenizer, documents, supervision_steps=steps,
                                                        halt_threshold=0)}
            results["depth"].append(row)
            progress.set_postfix(steps=steps, bpb=f"{row['bits_per_byte']:.4f}")
            progress.update()
        for criterion, threshold in act_settings:
            row = {"criterion": criterion, "threshold": threshold,
                   **score(model, tokenizer, documents, halt_threshold=threshold or 0,  # 0 = off
                           halt_criterion=criterion)}
            results["act"].append(row)
            progress.set_postfix(rule=criterion, threshold=threshold, bpb=f"{row['bits_per_byte']:.4f}")
            progress.update()
    results["seconds"] = time.time() - start

    out_dir = REPO / "benchmarks" / "results" if args.update_results else REPO / "outputs" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "depth.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "depth.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out_dir / 'depth.json'} and {out_dir / 'depth.md'}")
    return results


if __name__ == "__main__":
    main()
