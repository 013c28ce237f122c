"""`peftlab serve` under load: throughput and latency per micro-batching setting.

Starts the real server (`peftlab serve`, a separate process) once per setting, drives it with a fixed
number of concurrent clients for a fixed time (each request: one or a few real tweets, adapter picked
at random), and prints requests/s, texts/s, p50/p95/p99 latency and failures:

    .venv/bin/python bench/serve_load.py                               # trains two small MiniLM adapters first
    .venv/bin/python bench/serve_load.py --adapter a=runs/x --adapter b=runs/y --clients 32 --seconds 20

Without --adapter it trains two LoRA adapters on MiniLM + tweets (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# (name, max_wait_ms, max_batch_tokens): one request per forward pass, then micro-batches of growing size
SETTINGS = [("no batching", 0.0, 1), ("wait 2 ms, 2k tokens", 2.0, 2048), ("wait 10 ms, 8k tokens", 10.0, 8192)]


def train_adapters(root: Path) -> list[str]:
    from peftlab.config_loading import validate_config
    from peftlab.training.run import train

    specs = []
    for name, method in [("attention", {"kind": "lora", "r": 8, "targets": "attention"}),
                         ("all-linear", {"kind": "lora", "r": 16, "targets": "all-linear"})]:
        run = train(validate_config({
            "model": {"name": "minilm", "max_length": 64}, "data": {"source": "tweets", "n_train": 400, "n_eval": 200},
            "method": method, "train": {"epochs": 1, "lr": 2e-3, "checkpoint_each_epoch": False},
            "output": {"dir": str(root), "name": name, "progress": False}}))
        specs.append(f"{name}={run}")
    return specs


def tweets(n: int) -> list[str]:
    import pandas as pd

    from peftlab.assets import tweets as corpus

    alias = corpus()
    frame = pd.read_csv(alias.path, encoding=alias.encoding)
    return frame[alias.text_column].dropna().sample(n, random_state=0).tolist()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(adapters: list[str], wait_ms: float, tokens: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "peftlab", "serve", "--port", str(port), "--auto-truncate",
               "--max-wait-ms", str(wait_ms), "--max-batch-tokens", str(tokens)]
    for spec in adapters:
        command += ["--adapter", spec]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def drive(port: int, names: list[str], texts: list[str], clients: int, seconds: float, per_request: int) -> dict:
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            body = json.dumps({"inputs": rng.sample(texts, per_request), "adapter": rng.choice(names)})
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests_per_s": len(ms) / elapsed, "texts_per_s": len(ms) * per_request / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(ms), "failed": failures[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", metavar="NAME=RUN", help="served adapters (default: train two)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per setting (default 10)")
    parser.add_argument("--per-request", type=int, default=1, help="texts per request (default 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here (results kept in the repository: "
                        "bench/results/serve-cpu-MACHINE-DATE[-VARIANT].json)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = args.adapter or train_adapters(Path(tmp))
        names = [spec.split("=", 1)[0] for spec in adapters]
        texts = tweets(2000)
        rows = []
        print(f"{args.clients} clients, {args.seconds:g} s per setting, {args.per_request} text(s) per request, "
              f"adapters {names}")
        print(f"{'setting':<24}{'req/s':>8}{'texts/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'failed':>8}")
        for label, wait_ms, tokens in SETTINGS:
            process, port = start_server(adapters, wait_ms, tokens)
            try:
                drive(port, names, texts, args.clients, min(2.0, args.seconds), args.per_request)  # warm-up
                row = {"setting": label, "max_wait_ms": wait_ms, "max_batch_tokens": tokens,
                       **drive(port, names, texts, args.clients, args.seconds, args.per_request)}
            finally:
                process.terminate()
                process.wait(timeout=30)
            rows.append(row)
            print(f"{label:<24}{row['requests_per_s']:>8.1f}{row['texts_per_s']:>9.1f}{row['p50_ms']:>9.1f}"
                  f"{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['failed']:>8d}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"clients": args.clients, "seconds": args.seconds,
                                         "per_request": args.per_request, "rows": rows}, indent=2) + "\n")
    return 0 if all(row["failed"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
