"""The recipe study, data-limited regime: does recursion beat depth on text when every arm gets the same time?

    python benchmarks/recipe_study.py --budget_seconds 1200 --seeds 0 1 [--parallel 2] [--update-results]
    python benchmarks/recipe_study.py --runs trm-recursive trm-flat --budget_seconds 60 --seeds 0   # a quick look

Arms (train/configs/recipe-study.yaml + the flags below; all from scratch, all 13,810 training stories, the
shipped tokenizer, cosine schedule, early stopping on a held-out 2% of the training stories):
    trm-recursive   (i)   TRM, n=2, T=2, N_sup=4
    trm-flat        (ii)  the same TRM with n=T=1
    llama-params    (iii) transformers' Llama with the TRM's parameters (2 layers)
    llama-flops     (iv)  transformers' Llama with the TRM's forward FLOPs per token (one layer per virtual layer)
and ablations of (i): halting-loss weight 0, gradient through all T cycles, N_sup=2.

Same wall clock per arm: each run's step count is its budget times its arm's training speed, measured once per
arm before any run starts (forward + backward + AdamW on random tokens, benchmarks/train_speed.py) under the
same thread count, so an arm that is twice as fast gets twice the steps and an arm's seeds run the same steps. Runs go --parallel at a time; the budget is the time
the run would take with the device to itself (on a shared GPU every run stretches alike; on a CPU give each
run its own cores: --parallel x --threads <= cores).
Writes outputs/benchmarks/recipe_study.{json,md,png}; with --update-results benchmarks/results/ and
docs/recipe_study.png. Bits/byte: held-out training slice during training (the curves), then valid.jsonl
(all 1,000) and the first 1,000 of valid_v2.jsonl once at the end (each run's --report_file).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_speed import tokens_per_second  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from trm_lm import TRMForCausalLM  # noqa: E402
from trm_lm.baselines import llama_config_from_trm, trm_config_from_flags  # noqa: E402
from trm_lm.arguments import load_config  # noqa: E402

BASE_CONFIG = REPO / "train" / "configs" / "recipe-study.yaml"
RUNS = {  # name -> (label, flags on top of BASE_CONFIG)
    "trm-recursive": ("(i) TRM n=2 T=2 N_sup=4", {}),
    "trm-flat": ("(ii) TRM n=1 T=1 N_sup=4", {"latent_steps": 1, "cycles": 1}),
    "llama-params": ("(iii) Llama, same parameters", {"model_type": "llama", "baseline_match": "params"}),
    "llama-flops": ("(iv) Llama, same FLOPs/token", {"model_type": "llama", "baseline_match": "flops"}),
    "trm-halt0": ("(i) with halting-loss weight 0", {"halt_loss_weight": 0.0}),
    "trm-allcycles": ("(i) with gradient through all T cycles", {"backprop_all_cycles": True}),
    "trm-nsup2": ("(i) with N_sup=2", {"supervision_steps": 2}),
}
EVALUATIONS_PER_RUN = 10


def build_model(values: dict):
    trm = trm_config_from_flags(values, vocab_size=4096)
    if values.get("model_type") == "llama":
        return LlamaForCausalLM(llama_config_from_trm(trm, values["baseline_match"]))
    return TRMForCausalLM(trm)


def run_values(name: str) -> dict:
    """Every flag of the run: the base config with the arm's changes."""
    return {**load_config(BASE_CONFIG), **RUNS[name][1]}


def measure_speed(name: str, device: str) -> tuple[float, int]:
    """Training tokens/s of the arm's model on this machine, and its parameter count."""
    values = run_values(name)
    torch.manual_seed(0)
    model = build_model(values).to(device)
    speed = tokens_per_second(model, values["per_device_train_batch_size"], values["block_size"], 4096, steps=3)
    return speed, sum(p.numel() for p in model.parameters())


def plan_run(name: str, seed: int, budget: float, speed: float, parameters: int, out_dir: Path,
             report_documents: int = 1000) -> dict:
    """The run's flags, with --max_train_steps = budget x this arm's measured training speed."""
    values = run_values(name)
    tokens_per_step = values["per_device_train_batch_size"] * values["block_size"]
    steps = max(EVALUATIONS_PER_RUN, int(budget * speed / tokens_per_step))
    every = max(1, steps // EVALUATIONS_PER_RUN)
    flags = {**RUNS[name][1], "seed": seed, "max_train_steps": steps, "eval_steps": every,
             "checkpointing_steps": every, "max_report_documents": report_documents,
             "output_dir": str(out_dir / f"{name}-seed{seed}")}
    return {"run": name, "label": RUNS[name][0], "seed": seed, "flags": flags, "measured_tokens_per_s": speed,
            "parameters": parameters, "tokens_per_step": tokens_per_step}


def command(plan: dict) -> list[str]:
    args = [sys.executable, str(REPO / "train" / "train_lm.py"), "--config", str(BASE_CONFIG)]
    for key, value in plan["flags"].items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def collect(plan: dict) -> dict:
    """Held-out curve (bits/byte vs seconds and tokens) and final scores from the run's own files."""
    out = Path(plan["flags"]["output_dir"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    curve = [{"step": r["step"], "tokens": r["step"] * plan["tokens_per_step"],
              "seconds": elapsed.get(r["step"], max((s for k, s in elapsed.items() if k <= r["step"]), default=0.0)),
              "bits_per_byte": r["eval_bits_per_byte"]} for r in rows if "eval_bits_per_byte" in r]
    results = json.loads((out / "results.json").read_text())
    metrics = results.get("metrics", results)
    return {**plan, "curve": curve, "steps_run": max((r["step"] for r in rows), default=0),
            "best_heldout_bits_per_byte": min((c["bits_per_byte"] for c in curve), default=float("nan")),
            "valid_bits_per_byte": metrics.get("valid_bits_per_byte"),
            "valid_v2_bits_per_byte": metrics.get("valid_v2_bits_per_byte")}


def millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def markdown(result: dict) -> str:
    lines = [f"# Recipe study: {result['budget_seconds']:.0f} s of training per run", "",
             f"`{result['command']}` — {result['machine']}", "",
             f"| arm | seeds | parameters | steps run | tokens | best held-out | valid.jsonl ({result['report_documents']:,}) "
             f"| valid_v2 ({result['report_documents']:,}) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in result["runs"]:
        runs = [r for r in result["results"] if r["run"] == name]
        if not runs:
            continue
        def stat(key):  # noqa: E306
            values = [r[key] for r in runs if r[key] is not None]
            if not values:
                return "-"
            return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")
        lines.append(f"| {runs[0]['label']} | {len(runs)} | {runs[0]['parameters']:,} | "
                     f"{'/'.join(str(r['steps_run']) for r in runs)} | "
                     f"{'/'.join(millions(r['steps_run'] * r['tokens_per_step']) for r in runs)} | "
                     f"{stat('best_heldout_bits_per_byte')} | {stat('valid_bits_per_byte')} | "
                     f"{stat('valid_v2_bits_per_byte')} |")
    lines += ["", "Mean ± standard deviation over seeds; bits per byte, lower is better. Held-out: 2% of the training "
              "stories, the early-stopping criterion."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = dict(zip(RUNS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for run in result["results"]:
        for axis, key, scale in ((axes[0], "seconds", 1 / 60), (axes[1], "tokens", 1e-6)):
            axis.plot([c[key] * scale for c in run["curve"]], [c["bits_per_byte"] for c in run["curve"]],
                      color=colours[run["run"]], marker="o", markersize=3, linestyle="-" if run["seed"] == 0 else "--",
                      label=f"{run['label']} (seed {run['seed']})")
    axes[0].set(xlabel="training wall clock (min)", ylabel="held-out bits/byte")
    axes[1].set(xlabel="training tokens (M)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Recipe study: same wall clock ({result['budget_seconds']:.0f} s) per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget_seconds", type=float, default=1200.0, help="training time per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--report_documents", type=int, default=1000,
                        help="stories of valid.jsonl / valid_v2.jsonl scored at the end (1,000 = all of valid.jsonl)")
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "recipe-study"))
    parser.add_argument("--update-results", action="store_true", help="write benchmarks/results/ and docs/")
    args = parser.parse_args(argv)
    if args.budget_seconds <= 0 or min(args.parallel, args.threads, args.report_documents) < 1:
        parser.error("--budget_seconds, --parallel, --threads and --report_documents must be positive")
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(args.output_dir)
    speeds = {name: measure_speed(name, device) for name in args.runs}
    plans = [plan_run(name, seed, args.budget_seconds, *speeds[name], out_dir, args.report_documents)
             for seed in args.seeds for name in args.runs]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    pending, running, start = list(plans), [], time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            plan = pending.pop(0)
            Path(plan["flags"]["output_dir"]).mkdir(parents=True, exist_ok=True)
            log = open(Path(plan["flags"]["output_dir"]) / "stdout.log", "w")
            print(f"[{time.time() - start:6.0f} s] start {plan['run']} seed {plan['seed']}: "
                  f"{plan['flags']['max_train_steps']} steps ({plan['measured_tokens_per_s']:.0f} tokens/s measured)",
                  flush=True)
            running.append((plan, subprocess.Popen(command(plan), cwd=REPO, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            plan, code = item[0], item[1].returncode
            print(f"[{time.time() - start:6.0f} s] done {plan['run']} seed {plan['seed']}: exit {code}", flush=True)
            if code:
                raise SystemExit(f"{plan['run']} seed {plan['seed']} failed: see {plan['flags']['output_dir']}/stdout.log")
    machine = (f"{platform.machine()}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, "
               f"{args.threads} thread(s) per run, {args.parallel} run(s) at once, torch {torch.__version__}")
    result = {"command": "python benchmarks/recipe_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "budget_seconds": args.budget_seconds, "report_documents": args.report_documents,
              "runs": args.runs, "seeds": args.seeds,
              "results": [collect(plan) for plan in plans]}
    where = REPO / "benchmarks" / "results" if args.update_results else REPO / "outputs" / "benchmarks"
    where.mkdir(parents=True, exist_ok=True)
    (where / "recipe_study.json").write_text(json.dumps(result, indent=2))
    (where / "recipe_study.md").write_text(markdown(result))
    plot(result, (REPO / "docs" if args.update_results else where) / "recipe_study.png")
    print(markdown(result))
    print(f"wrote {where / 'recipe_study.md'}")


if __name__ == "__main__":
    main()
