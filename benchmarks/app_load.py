"""Bounded load test of the Gradio app: N requests, C in flight at a time, against app.py on 127.0.0.1.

    python benchmarks/app_load.py                                  # a tiny random TRM, 32 requests, 8 concurrent
    python benchmarks/app_load.py --model checkpoints/trm-tinystories-small --requests 64 --concurrency 8

Starts `python app.py` as a child process on a free loopback port (so that its memory is measured alone),
waits until it answers, sends one warm-up request, then `--requests` requests to /generate with gradio_client
(`Client.submit`), never more than `--concurrency` in flight. Measures per-request latency (submit -> final
result), throughput, generated tokens per second, and the server's resident memory (RSS): when ready, after
the warm-up, peak while loaded, and after. The app runs `--server_concurrency` generations at once (app.py's
own default is 1: the others queue), so the latency includes queueing. Everything is bounded: start-up by
--startup_timeout, the load by --timeout; the server is stopped at the end whatever happened.
Writes benchmarks/results/app_load.json and app_load.md (or --out).
"""

import argparse
import concurrent.futures
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# loopback only: no telemetry from gradio_client (it reads these when imported) nor from the app it starts
os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1",
                  HF_HUB_DISABLE_PROGRESS_BARS="1")
PROMPTS = ["Once upon a time, there was a little dog named Max.", "Lily and Tom went to the park.",
           "The sun was hot, so the cat", "One day, a big red ball"]
MB = 2**20


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (psutil if installed, else /proc/PID/status)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status") from None
    return psutil.Process(pid).memory_info().rss


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(model: str, device: str, server_concurrency: int, startup_timeout: float, log_dir: Path):
    """Run app.py on 127.0.0.1; yield (url, process) once it answers HTTP; always stop it afterwards."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "app.py"), "--model", model, "--host", "127.0.0.1", "--port", str(port),
               "--device", device, "--concurrency", str(server_concurrency)]
    log_path = log_dir / "app.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with code {process.returncode} before serving:\n"
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"app.py did not answer on {url} within {startup_timeout:.0f} s")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:  # not listening yet
                pass
            time.sleep(0.2)
        yield url, process
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: gradio closes its server
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PeakRSS:
    """Samples a process's RSS every `interval` seconds in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):  # the server went away; the load loop reports that
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def request_inputs(index: int, max_new_tokens: int, supervision_steps: int) -> tuple:
    """(prompt, temperature, top_p, max_new_tokens, halt_threshold, supervision_steps, seed) of request `index`."""
    return PROMPTS[index % len(PROMPTS)], 0.8, 0.95, max_new_tokens, 0.5, supervision_steps, index


def new_tokens(summary: str) -> int:
    """The app's summary starts '<n> new tokens'."""
    match = re.search(r"(\d+) new tokens", summary)
    return int(match.group(1)) if match else 0


def run_load(client, requests: int, concurrency: int, max_new_tokens: int, supervision_steps: int,
             timeout: float) -> tuple[list[dict], float]:
    """Submit `requests` jobs keeping `concurrency` in flight; return (one record per request, wall seconds)."""
    records = [None] * requests
    in_flight = {}  # job.future -> (index, job, submit time, {"at": finish time} once done)
    next_index = 0
    start = time.perf_counter()
    deadline = time.monotonic() + timeout

    def submit(index):
        submitted = time.perf_counter()
        job = client.submit(*request_inputs(index, max_new_tokens, supervision_steps), api_name="/generate")
        finished = {}
        job.future.add_done_callback(lambda _: finished.setdefault("at", time.perf_counter()))  # in the client's thread
        in_flight[job.future] = (index, job, submitted, finished)

    while next_index < min(concurrency, requests):
        submit(next_index)
        next_index += 1
    while in_flight:
        left = deadline - time.monotonic()
        done, _ = concurrent.futures.wait(list(in_flight), timeout=max(0.0, left),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        if not done:  # over time: record what is left as timed out
            for index, job, submitted, _ in in_flight.values():
                job.cancel()
                records[index] = {"index": index, "ok": False, "latency_s": None, "new_tokens": 0,
                                  "error": f"no result within the {timeout:.0f} s timeout"}
            break
        for future in done:
            index, job, submitted, finished = in_flight.pop(future)
            latency = finished.get("at", time.perf_counter()) - submitted
            try:
                _, _, _, summary = job.result(timeout=0)
                records[index] = {"index": index, "ok": True, "latency_s": latency, "new_tokens": new_tokens(summary),
                                  "error": None}
            except Exception as error:  # a failed request is data here, not the end of the run
                records[index] = {"index": index, "ok": False, "latency_s": latency, "new_tokens": 0,
                                  "error": f"{type(error).__name__}: {' '.join(str(error).split())}"}
            if next_index < requests:
                submit(next_index)
                next_index += 1
    wall = time.perf_counter() - start
    for index in range(requests):  # never submitted because the time ran out
        if records[index] is None:
            records[index] = {"index": index, "ok": False, "latency_s": None, "new_tokens": 0,
                              "error": "not sent: the timeout ran out first"}
    return records, wall


def summarize(records: list[dict], wall: float) -> dict:
    latencies = np.array([r["latency_s"] for r in records if r["ok"]])
    ok = len(latencies)
    tokens = sum(r["new_tokens"] for r in records)
    stats = {"min": 0.0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    if ok:
        stats = {"min": float(latencies.min()), "mean": float(latencies.mean()),
                 **{f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}, "max": float(latencies.max())}
    return {
        "completed": ok, "failed": len(records) - ok,
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "wall_s": wall, "throughput_rps": ok / wall, "new_tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_s": stats,
    }


def markdown(result: dict) -> str:
    lat, mem = result["latency_s"], result["server_rss_mb"]
    lines = [
        "# Gradio app under load",
        "",
        f"`python benchmarks/app_load.py` — model: {result['model']}; device: {result['device']}; "
        f"{result['requests']} requests, {result['concurrency']} in flight, the app running "
        f"{result['server_concurrency']} generation(s) at a time; max_new_tokens={result['max_new_tokens']}, "
        f"halt_threshold 0.5; {result['platform']}, {result['cpus']} CPUs, "
        f"OMP_NUM_THREADS={result['omp_num_threads']}.",
        "",
        "| requests ok / sent | wall (s) | throughput (req/s) | new tokens/s |",
        "|---|---|---|---|",
        f"| {result['completed']} / {result['requests']} | {result['wall_s']:.2f} | {result['throughput_rps']:.2f} "
        f"| {result['tokens_per_s']:.1f} |",
        "",
        "Latency per request, submit to final result, queueing included (s):",
        "",
        "| min | mean | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(f"{lat[key]:.3f}" for key in ("min", "mean", "p50", "p90", "p99", "max")) + " |",
        "",
        "Server process resident memory (MiB):",
        "",
        "| ready | after warm-up | peak under load | after | growth (after - after warm-up) |",
        "|---|---|---|---|---|",
        f"| {mem['ready']:.1f} | {mem['after_warmup']:.1f} | {mem['peak']:.1f} | {mem['after']:.1f} "
        f"| {result['rss_growth_mb']:+.1f} |",
    ]
    if result["errors"]:
        lines += ["", "Errors: " + "; ".join(result["errors"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: a tiny random TRM built in a temp dir)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--server_concurrency", type=int, default=1, help="app.py --concurrency")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", help="app.py --device")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole load phase")
    parser.add_argument("--startup_timeout", type=float, default=180, help="seconds for app.py to start answering")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "app_load"),
                        help="output path without suffix: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "server_concurrency", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.timeout <= 0 or args.startup_timeout <= 0:
        parser.error("--timeout and --startup_timeout must be > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from gradio_client import Client

    with tempfile.TemporaryDirectory(prefix="trm-app-load-") as scratch:
        scratch = Path(scratch)
        if args.model is None:
            sys.path[:0] = [str(REPO), str(REPO / "tests")]  # runs from a checkout without `pip install -e .`
            from fixtures_model import build_tiny_model  # the test suite's tiny TRM + tokenizer

            model = str(build_tiny_model(scratch / "tiny-trm"))
            model_label = "tiny random TRM (tests/fixtures_model.py)"
        else:
            model = model_label = args.model
        supervision_steps = json.loads((Path(model) / "config.json").read_text()).get("supervision_steps", 1)
        started = time.perf_counter()
        with serve(model, args.device, args.server_concurrency, args.startup_timeout, scratch) as (url, server):
            startup = time.perf_counter() - started
            rss_ready = rss_bytes(server.pid)
            client = Client(url, verbose=False, analytics_enabled=False)
            client.predict(*request_inputs(0, args.max_new_tokens, supervision_steps), api_name="/generate")  # warm-up
            rss_warm = rss_bytes(server.pid)
            with PeakRSS(server.pid) as peak:
                records, wall = run_load(client, args.requests, args.concurrency, args.max_new_tokens,
                                         supervision_steps, args.timeout)
            rss_after = rss_bytes(server.pid)
            client.close()
        result = {
            "model": model_label, "device": args.device, "requests": args.requests, "concurrency": args.concurrency,
            "server_concurrency": args.server_concurrency, "max_new_tokens": args.max_new_tokens,
            **summarize(records, wall),
            "server_rss_mb": {"ready": rss_ready / MB, "after_warmup": rss_warm / MB,
                              "peak": max(peak.peak, rss_after) / MB, "after": rss_after / MB},
            "rss_growth_mb": (rss_after - rss_warm) / MB,
            "startup_s": startup, "server_pid": server.pid,
            "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["failed"] == 0 else 1)
