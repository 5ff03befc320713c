"""Small devices: file size, peak memory, decode speed and bits/byte of the shipped TRM as fp32, bf16 (as shipped),
int8 and ONNX, plus a same-quality Llama when one is given.

    python benchmarks/small_device.py                        # -> outputs/benchmarks/small_device.{json,md}
    python benchmarks/small_device.py --update-results       # -> benchmarks/results/small_device.{json,md}
    python benchmarks/small_device.py --llama DIR            # + a trained Llama folder (none is shipped)

Rows (all made from the shipped folder by this script, in a temporary folder):
  fp32  the shipped weights saved in float32 (save_pretrained)
  bf16  the shipped folder; on CPU the loader computes in float32, as every CLI of the project does
  int8  `python -m trm_lm.export --format int8`: per-row int8 weights, dequantized to float32 at load
  onnx  `python -m trm_lm.export --format onnx`, run by onnxruntime with numpy and tokenizers only: no torch
        in that process, as an app on a device would ship it
Each row is measured in its own subprocess, on one thread: it loads the model, decodes greedily (cache on,
ACT off) `--new_tokens` tokens after a short prompt (timed: tokens/s), then the whole context (512 tokens)
for the memory: peak RSS is the process's high-water mark (VmHWM; psutil has no peak on Linux), so it
counts the interpreter and the libraries too, which is what a device has to hold. Speeds are medians of
`--repeats` rounds run row after row, interleaved, so a loaded machine slows every row alike.
bits/byte: trm_lm.evaluate.bits_per_byte on the first `--documents` validation stories; the ONNX row runs one
step per token (slow), so it is scored on the first `--onnx_documents` and compared with fp32 on the same ones.
"""
# torch is imported inside functions only: the ONNX row's subprocess runs this file and must not load it.

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results_path import add_results_flags, results_path  # noqa: E402

SHIPPED = REPO / "checkpoints" / "trm-tinystories-small"
VALIDATION = REPO.parent / "shared" / "data" / "tinystories" / "valid.jsonl"
PROMPT = "Once upon a time"
MB = 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this program's own memory;
    ru_maxrss would also count the parent's, which a forked child carries until it execs."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def timed(decode, new_tokens: int) -> float:
    start = time.perf_counter()
    decode(new_tokens)
    return time.perf_counter() - start


def child_torch(folder: Path, new_tokens: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from trm_lm.export import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(folder)
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    context = model.config.max_position_embeddings

    def decode(n):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)

    timed(decode, 4)  # warm-up
    seconds = timed(decode, new_tokens)
    timed(decode, context - ids.shape[1])  # the whole context in the KV cache: the memory peak
    return {"tokens_per_s": new_tokens / seconds, "peak_rss_mb": peak_rss_mb()}


def child_onnx(folder: Path, new_tokens: int, source: str) -> dict:
    import numpy as np
    from tokenizers import Tokenizer

    namespace = {"np": np, "Path": Path}
    exec(source, namespace)  # trm_lm.export's OnnxDecoder and onnx_greedy, sent by the parent (run_child)
    decoder = namespace["OnnxDecoder"](folder / "model.onnx")
    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids

    def decode(n):
        namespace["onnx_greedy"](decoder, prompt, n)

    timed(decode, 4)
    seconds = timed(decode, new_tokens)
    timed(decode, decoder.window + 1 - len(prompt))  # the whole context, as the torch rows
    return {"tokens_per_s": new_tokens / seconds, "peak_rss_mb": peak_rss_mb()}


def run_child(kind: str, folder: Path, new_tokens: int) -> dict:
    source = ""
    if kind == "onnx":  # importing trm_lm would import torch, so the child gets the two pieces as source
        sys.path.insert(0, str(REPO))
        from trm_lm.export import OnnxDecoder, onnx_greedy

        source = inspect.getsource(OnnxDecoder) + "\n\n" + inspect.getsource(onnx_greedy)
    command = [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--new_tokens", str(new_tokens)]
    done = subprocess.run(command, input=source, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(f"the {kind} row's process failed on {folder}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".onnx"))


def onnx_scorer(path: Path, config):
    """The ONNX step as a causal LM for trm_lm.evaluate.bits_per_byte (batch_size=1: one row, one step per token)."""
    import numpy as np
    import torch

    from trm_lm.export import OnnxDecoder

    class OnnxCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.decoder = config, OnnxDecoder(path)
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # bits_per_byte reads the device from a parameter

        def forward(self, input_ids, attention_mask=None, **kwargs):
            self.decoder.reset()
            logits = np.stack([self.decoder(token) for token in input_ids[0].tolist()])
            return argparse.Namespace(logits=torch.from_numpy(logits)[None])

    return OnnxCausalLM()


def measure(args) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from trm_lm.data import read_documents

    torch.set_num_threads(1)
    documents = read_documents(str(args.validation_file), "text")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="small-device-") as work:
        return {**measure_in(Path(work), documents, args), "load_average_at_start": load}


def measure_in(work: Path, documents: list[str], args) -> dict:
    import onnxruntime
    import torch

    from trm_lm.evaluate import bits_per_byte
    from trm_lm.export import export_int8, export_onnx, load_model

    model, tokenizer = load_model(args.model)
    model.save_pretrained(work / "fp32")
    tokenizer.save_pretrained(work / "fp32")
    export_int8(model, tokenizer, work / "int8")
    onnx_check = export_onnx(model, tokenizer, work / "onnx", check_tokens=args.check_tokens)
    rows = {"fp32": ("torch", work / "fp32"), "bf16 (shipped)": ("torch", Path(args.model)),
            "int8": ("torch", work / "int8"), "onnx": ("onnx", work / "onnx")}
    if args.llama:
        rows["Llama (--llama)"] = ("torch", Path(args.llama))

    speeds = {name: [] for name in rows}
    memory = {name: [] for name in rows}
    for _ in range(args.repeats):  # interleaved: every round runs every row once
        for name, (kind, folder) in rows.items():
            result = run_child(kind, folder, args.new_tokens)
            speeds[name].append(result["tokens_per_s"])
            memory[name].append(result["peak_rss_mb"])
            print(f"{name}: {result}", file=sys.stderr, flush=True)

    table = []
    for name, (kind, folder) in rows.items():
        row = {"row": name, "bytes": weight_bytes(folder), "peak_rss_mb": statistics.median(memory[name]),
               "tokens_per_s": statistics.median(speeds[name]), "tokens_per_s_runs": speeds[name]}
        if kind == "torch":
            scored_model, scored_tokenizer = load_model(folder)
            row["bits_per_byte"] = bits_per_byte(scored_model, scored_tokenizer, documents[:args.documents],
                                                 batch_size=8)["bits_per_byte"]
        else:
            few = documents[:args.onnx_documents]
            row["bits_per_byte_few"] = bits_per_byte(onnx_scorer(folder / "model.onnx", model.config), tokenizer,
                                                     few, batch_size=1)["bits_per_byte"]
            row["fp32_bits_per_byte_few"] = bits_per_byte(model, tokenizer, few, batch_size=8)["bits_per_byte"]
            row.update({key: value for key, value in onnx_check.items() if key != "path"})
        table.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    source = Path(args.model).resolve()
    return {"rows": table, "model": str(source.relative_to(REPO) if source.is_relative_to(REPO) else source),
            "documents": args.documents, "onnx_documents": args.onnx_documents, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "context": model.config.max_position_embeddings, "threads": 1, "llama": args.llama,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"onnxruntime {onnxruntime.__version__}",
            "note": args.note}


def markdown(result: dict) -> str:
    rows = {row["row"]: row for row in result["rows"]}
    fp32, bf16 = rows["fp32"], rows["bf16 (shipped)"]
    lines = [f"# Small devices ({result['model']}; CPU, 1 thread; {result['machine']})", "",
             f"{result['note']} Load average when it started: {result['load_average_at_start']:.1f}.", "",
             f"| row | weights file | fp32 / this | peak RSS, {result['context']}-token context | tok/s "
             f"({result['new_tokens']} new: median (range) of {result['repeats']}) | bits/byte ({result['documents']} "
             "stories) |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "bits_per_byte" in row:
            change = 100 * (row["bits_per_byte"] / bf16["bits_per_byte"] - 1)
            score = f"{row['bits_per_byte']:.5f} ({change:+.3f}%)"
        else:
            score = (f"{row['bits_per_byte_few']:.5f} on {result['onnx_documents']} stories "
                     f"(fp32 there: {row['fp32_bits_per_byte_few']:.5f})")
        lines.append(f"| {row['row']} | {row['bytes'] / MB:.2f} MB | {fp32['bytes'] / row['bytes']:.2f} | "
                     f"{row['peak_rss_mb']:.0f} MB | {row['tokens_per_s']:.1f} ({min(row['tokens_per_s_runs']):.1f}-"
                     f"{max(row['tokens_per_s_runs']):.1f}) | {score} |")
    onnx = rows["onnx"]
    lines += ["", f"ONNX greedy tokens equal PyTorch's generate() for {onnx['check_tokens']} tokens: "
              f"{onnx['same_tokens']} (largest logit difference {onnx['max_logit_difference']:.1e}).",
              "fp32, bf16 and int8 all compute in float32 on CPU (int8 is dequantized at load): their speed and "
              "memory differ only by noise. bits/byte in parentheses: relative to the shipped bf16 folder. "
              + ("" if result["llama"] else "No same-quality Llama row: no trained Llama baseline is shipped "
                 "(pass one with --llama DIR).")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--llama", default=None, help="a trained Llama folder of the same quality (optional)")
    parser.add_argument("--validation_file", default=str(VALIDATION))
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--onnx_documents", type=int, default=20)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check_tokens", type=int, default=128)
    parser.add_argument("--note", default="", help="a line for the table, e.g. how loaded the machine was")
    add_results_flags(parser, "small_device")
    parser.add_argument("--child", choices=["torch", "onnx"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one row's measurement, in its own process; the result is the last line on stdout
        result = (child_torch(args.folder, args.new_tokens) if args.child == "torch"
                  else child_onnx(args.folder, args.new_tokens, sys.stdin.read()))
        print(json.dumps(result))
        return
    result = measure(args)
    out = results_path(args, "small_device")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
