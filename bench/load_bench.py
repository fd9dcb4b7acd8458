"""Load benchmark: N concurrent clients x M requests against the real server, beside offline ``generate``.

    nice -n 10 python bench/load_bench.py --model runs/ldm --clients 1 8 16 --requests 20 --out bench/results/cpu/load_bench.json

Starts ``python -m latentdiff.serve`` on loopback (batched with its defaults, and unbatched: --max-batch 1,
one request per model call as before batching), runs closed-loop clients (each sends its next request when
the last is answered; every request a different seed), and stops it. Prints one JSON line per run: p50/p99
latency and digits/s, the batcher's mean batch from /metrics, and served throughput as a fraction of
offline ``pipe.generate`` at that batch size (measured first, in this process, with the server stopped).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "latentdiff.serve", "--model", model, "--port", str(port), "--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not answer /api/health within 120 s")


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


def body(args, seed: int) -> bytes:
    labels = [i % 10 for i in range(args.digits)]
    return json.dumps({"labels": labels, "per_label": 1, "steps": args.steps, "seed": seed, "format": args.format}).encode()


def load(port: int, args, clients: int) -> dict:
    """Closed-loop clients on keep-alive connections; returns latency percentiles and throughput."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        barrier.wait()
        for j in range(args.requests):
            start = time.perf_counter()
            conn.request("POST", "/api/generate", body(args, 10_000 * c + 100 * j), {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            took = time.perf_counter() - start
            with lock:
                latencies.append(took) if r.status == 200 else errors.append(f"{r.status} {data[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "first_error": errors[:1],
            "digits_per_s": round(len(lat) * args.digits / wall, 1),
            "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}


def offline(pipe, args, batch: int, repeats: int = 3) -> float:
    """digits/s of pipe.generate at ``batch`` digits per call (best of ``repeats``, after a warm-up call)."""
    labels = [i % 10 for i in range(batch)]
    pipe.generate(labels, steps=args.steps, seed=0)
    best = 0.0
    for r in range(repeats):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.offline_seconds:
            pipe.generate(labels, steps=args.steps, seed=r * 100_000 + n)
            n += batch
        best = max(best, n / (time.perf_counter() - start))
    return round(best, 1)


def pixel_check(pipe, args, clients: int) -> dict:
    """Pixels of ``clients`` requests merged into one batcher call vs each run alone through pipe.generate."""
    from latentdiff.serve.batcher import Batcher, generate_work
    from latentdiff.shards import to_uint8

    labels = [i % 10 for i in range(args.digits)]
    settings = {"guidance_scale": None, "steps": args.steps, "sampler": None, "eta": None}
    batcher = Batcher(pipe, max_batch=clients * args.digits, max_wait_ms=60_000)
    batcher.last_requests = clients  # start once all are queued: one merged call
    futures = [batcher.submit(generate_work(labels, 10_000 * c, settings)) for c in range(clients)]
    merged = [to_uint8(f.result()[0]).int() for f in futures]
    batcher.close()
    alone = [to_uint8(pipe.generate(labels, seed=10_000 * c, steps=args.steps)).int() for c in range(clients)]
    diff = [(m - a).abs() for m, a in zip(merged, alone)]
    return {"pixel_check_requests": clients, "pixels": sum(d.numel() for d in diff),
            "pixels_differing": sum(int((d > 0).sum()) for d in diff), "max_levels": max(int(d.max()) for d in diff),
            "requests_with_a_difference": sum(int(d.max() > 0) for d in diff)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--requests", type=int, default=20, help="requests per client (default 20)")
    p.add_argument("--digits", type=int, default=10, help="digits per request (default 10: labels 0..9)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--format", choices=["json", "png"], default="json", help="answer format (default json, as the page)")
    p.add_argument("--server-args", default="", help="extra options for the batched server, e.g. '--max-wait-ms 5'")
    p.add_argument("--offline-seconds", type=float, default=3.0)
    p.add_argument("--out", help="also write the results here (JSON)")
    p.add_argument("--pixel-check", type=int, metavar="REQUESTS", help="only compare REQUESTS merged requests' pixels "
                                                                       "with generate alone, and exit")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from latentdiff import LatentDiffusion

    pipe = LatentDiffusion.from_pretrained(args.model, device="cpu")
    if args.pixel_check:
        print(json.dumps(pixel_check(pipe, args, args.pixel_check)), flush=True)
        return
    results = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
               "model": args.model, "digits_per_request": args.digits, "steps": args.steps, "format": args.format,
               "offline": {}, "served": []}
    for batch in sorted({args.digits, *[args.digits * c for c in args.clients]}):
        results["offline"][batch] = offline(pipe, args, batch)
        print(json.dumps({"offline_batch": batch, "digits_per_s": results["offline"][batch]}), flush=True)
    del pipe
    for name, extra in (("unbatched", ["--max-batch", "1"]), ("batched", args.server_args.split())):
        port = free_port()
        server = start_server(args.model, port, extra)
        try:
            load(port, argparse.Namespace(**{**vars(args), "requests": 2}), 1)  # warm-up
            for clients in args.clients if name == "batched" else [1]:
                before = metrics(port)
                row = {"server": name, "server_args": extra, **load(port, args, clients)}
                after = metrics(port)
                calls = after["latentdiff_batch_digits_count"] - before["latentdiff_batch_digits_count"]
                row["mean_batch_digits"] = round((after["latentdiff_batch_digits_sum"] - before["latentdiff_batch_digits_sum"])
                                                 / max(calls, 1), 1)
                ref = args.digits * clients  # the batch the batcher can form: every client's one outstanding request
                row["offline_digits_per_s_at_that_batch"] = results["offline"][ref]
                row["fraction_of_offline"] = round(row["digits_per_s"] / results["offline"][ref], 3)
                results["served"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
