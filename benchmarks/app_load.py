"""Load test of the Gradio app: one user, then many at once, against one app.py on 127.0.0.1.

    python benchmarks/app_load.py                                   # the shipped model; 1 and 16 users
    python benchmarks/app_load.py --users 1 4 16 --max_new_tokens 64 --update-results

Starts `python app.py` as a child process on a free loopback port (so that its memory is measured alone),
waits until it answers, sends one warm-up request, then for each level in `--users`: that many users, each
sending `--requests_per_user` requests one after the other (a closed loop: a user sends the next request
when the last answer arrived) to /generate with gradio_client. Measures per-request latency (submit ->
final result, queueing included), generated tokens per second over the level, and the server's resident
memory. The table compares every level with one user: the app decodes concurrent users together in one
batch (trm_lm/serving.py), so throughput should grow with users while latency barely does. Bounded:
start-up by --startup_timeout, each level by --timeout; the server is stopped at the end whatever happened.
Writes outputs/benchmarks/app_load.{json,md}; with --update-results benchmarks/results/app_load.{json,md}.
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


def run_level(client, users: int, requests_per_user: int, max_new_tokens: int, supervision_steps: int,
              timeout: float, first_index: int) -> tuple[list[dict], float]:
    """`users` closed-loop users, `requests_per_user` requests each; return (one record per request, wall seconds)."""
    deadline = time.monotonic() + timeout
    records, lock = [], threading.Lock()

    def user(number: int):
        for k in range(requests_per_user):
            index = first_index + number * requests_per_user + k
            left = deadline - time.monotonic()
            if left <= 0:
                record = {"index": index, "ok": False, "latency_s": None, "new_tokens": 0,
                          "error": "not sent: the timeout ran out first"}
            else:
                submitted = time.perf_counter()
                job = client.submit(*request_inputs(index, max_new_tokens, supervision_steps), api_name="/generate")
                try:
                    _, _, _, summary = job.result(timeout=left)
                    record = {"index": index, "ok": True, "latency_s": time.perf_counter() - submitted,
                              "new_tokens": new_tokens(summary), "error": None}
                except Exception as error:  # a failed request is data here, not the end of the run
                    job.cancel()
                    record = {"index": index, "ok": False, "latency_s": None, "new_tokens": 0,
                              "error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]}
            with lock:
                records.append(record)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        list(pool.map(user, range(users)))
    return sorted(records, key=lambda r: r["index"]), time.perf_counter() - start


def summarize(records: list[dict], wall: float) -> dict:
    latencies = np.array([r["latency_s"] for r in records if r["ok"]])
    ok = len(latencies)
    tokens = sum(r["new_tokens"] for r in records)
    stats = {"min": 0.0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    if ok:
        stats = {"min": float(latencies.min()), "mean": float(latencies.mean()),
                 **{f"p{q}": float(np.percentile(latencies, q)) for q in (50, 95)}, "max": float(latencies.max())}
    return {
        "completed": ok, "failed": len(records) - ok,
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "wall_s": wall, "new_tokens": tokens, "tokens_per_s": tokens / wall, "latency_s": stats,
    }


def markdown(result: dict) -> str:
    mem = result["server_rss_mb"]
    base = result["levels"][0]
    lines = [
        "# Gradio app under load",
        "",
        f"`python benchmarks/app_load.py` — model: {result['model']}; device: {result['device']}; each user sends "
        f"{result['requests_per_user']} requests one after the other; max_new_tokens={result['max_new_tokens']}, "
        f"temperature 0.8, halt_threshold 0.5; the app decodes up to {result['server_concurrency']} requests in "
        f"one batch; {result['platform']}, {result['cpus']} CPUs, OMP_NUM_THREADS={result['omp_num_threads']}.",
        "",
        f"| users | requests ok / sent | new tokens/s | x {base['users']} user | latency p50 (s) | p95 (s) "
        f"| p95 / {base['users']} user's p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        lat = level["latency_s"]
        lines.append(
            f"| {level['users']} | {level['completed']} / {level['completed'] + level['failed']} "
            f"| {level['tokens_per_s']:.1f} | {level['tokens_per_s'] / max(base['tokens_per_s'], 1e-9):.2f} "
            f"| {lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p95'] / max(base['latency_s']['p50'], 1e-9):.2f} |")
    lines += [
        "",
        "Server process resident memory (MiB):",
        "",
        "| ready | after warm-up | peak under load | after | growth (after - after warm-up) |",
        "|---|---|---|---|---|",
        f"| {mem['ready']:.1f} | {mem['after_warmup']:.1f} | {mem['peak']:.1f} | {mem['after']:.1f} "
        f"| {result['rss_growth_mb']:+.1f} |",
    ]
    errors = sorted({e for level in result["levels"] for e in level["errors"]})
    if errors:
        lines += ["", "Errors: " + "; ".join(errors[:5])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "trm-tinystories-small"),
                        help="model folder, or 'tiny' for the test suite's tiny random TRM (default: the shipped model)")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 16],
                        help="concurrent users of each level; the first is the baseline (default: 1 16)")
    parser.add_argument("--requests_per_user", type=int, default=3)
    parser.add_argument("--server_concurrency", type=int, default=None,
                        help="app.py --concurrency (default: the largest level)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--device", default="auto", help="app.py --device")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each level")
    parser.add_argument("--startup_timeout", type=float, default=180, help="seconds for app.py to start answering")
    parser.add_argument("--update-results", action="store_true",
                        help="write benchmarks/results/ (committed) instead of outputs/benchmarks/")
    parser.add_argument("--out_dir", default=None, help="write app_load.{json,md} here instead")
    args = parser.parse_args(argv)
    if args.server_concurrency is None:
        args.server_concurrency = max(args.users)
    for name in ("requests_per_user", "server_concurrency", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if min(args.users) < 1:
        parser.error("--users must all be >= 1")
    if args.timeout <= 0 or args.startup_timeout <= 0:
        parser.error("--timeout and --startup_timeout must be > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from gradio_client import Client

    with tempfile.TemporaryDirectory(prefix="trm-app-load-") as scratch:
        scratch = Path(scratch)
        if args.model == "tiny":
            sys.path[:0] = [str(REPO), str(REPO / "tests")]  # runs from a checkout without `pip install -e .`
            from helpers import build_tiny_model  # the test suite's tiny TRM + tokenizer

            model = str(build_tiny_model(scratch / "tiny-trm"))
            model_label = "tiny random TRM (tests/helpers.py)"
        else:
            model = args.model
            model_label = Path(model).name if Path(model).is_dir() else model
        supervision_steps = json.loads((Path(model) / "config.json").read_text()).get("supervision_steps", 1)
        started = time.perf_counter()
        with serve(model, args.device, args.server_concurrency, args.startup_timeout, scratch) as (url, server):
            startup = time.perf_counter() - started
            rss_ready = rss_bytes(server.pid)
            client = Client(url, verbose=False, analytics_enabled=False)
            client.predict(*request_inputs(0, args.max_new_tokens, supervision_steps), api_name="/generate")  # warm-up
            rss_warm = rss_bytes(server.pid)
            levels, first_index = [], 1
            with PeakRSS(server.pid) as peak:
                for users in args.users:
                    print(f"{users} user(s) x {args.requests_per_user} requests ...", flush=True)
                    records, wall = run_level(client, users, args.requests_per_user, args.max_new_tokens,
                                              supervision_steps, args.timeout, first_index)
                    first_index += len(records)
                    levels.append({"users": users, **summarize(records, wall)})
            rss_after = rss_bytes(server.pid)
            client.close()
        result = {
            "model": model_label, "device": args.device, "requests_per_user": args.requests_per_user,
            "server_concurrency": args.server_concurrency, "max_new_tokens": args.max_new_tokens, "levels": levels,
            "server_rss_mb": {"ready": rss_ready / MB, "after_warmup": rss_warm / MB,
                              "peak": max(peak.peak, rss_after) / MB, "after": rss_after / MB},
            "rss_growth_mb": (rss_after - rss_warm) / MB,
            "startup_s": startup, "server_pid": server.pid,
            "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        }
    out_dir = REPO / "benchmarks" / "results" if args.update_results else REPO / "outputs" / "benchmarks"
    out_dir = Path(args.out_dir) if args.out_dir else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "app_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "app_load.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out_dir / 'app_load.json'} and {out_dir / 'app_load.md'}")
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(level["failed"] == 0 for level in outcome["levels"]) else 1)
