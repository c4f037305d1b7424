"""Load on the served model: N concurrent clients for S seconds against ``mlflow models serve``.

    python bench/serve_load.py --url http://127.0.0.1:5001          # a server already running
    python bench/serve_load.py --model models:/ragtrain-rag@champion  # starts one (needs
                                                      # MLFLOW_TRACKING_URI), stops it after
    python bench/serve_load.py --model /tmp/model --clients 4 --seconds 10   # a smoke run

Each client posts one question at a time (``{"inputs": [q], "params": {"top_k": K}}``, the
questions cycled) in a loop bounded by the deadline, on 127.0.0.1 only. Reported: requests,
errors (any non-200 or failed connection, with the first few messages), p50 / p95 / max latency
and requests/s, and whether the server still answers /ping afterwards. Exit status 1 when any
request failed or the server stopped answering. ``--json FILE`` writes the same figures.
Run it alone: other work on the machine slows the server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

QUESTIONS = ("What is the capital of France?", "Who wrote Hamlet?",
             "When did the Second World War end?", "What is the largest planet?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def served(model: str, workers: int | None, startup_s: float) -> Iterator[str]:
    """``mlflow models serve`` of ``model`` on a free 127.0.0.1 port; stopped on exit."""
    port = free_port()
    bindir = str(Path(sys.executable).parent)  # uvicorn, started by mlflow, is found on PATH
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager",
           "local", "-h", "127.0.0.1", "-p", str(port)]
    if workers:
        cmd += ["-w", str(workers)]
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + startup_s
        while not ping(url):
            if proc.poll() is not None or time.monotonic() > end:
                tail = Path(log.name).read_text()[-2000:]
                raise SystemExit(f"error: mlflow models serve did not start (log {log.name}):\n"
                                 f"{tail}")
            time.sleep(0.5)
        print(f"serving {model} at {url} (log {log.name})", file=sys.stderr)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(url: str, deadline: float, top_k: int | None, offset: int, timeout: float,
           latencies: list[float], errors: list[str]) -> None:
    """Post questions one at a time until the deadline; record each latency or error."""
    i = offset
    while time.monotonic() < deadline:
        body = {"inputs": [QUESTIONS[i % len(QUESTIONS)]]}
        if top_k:
            body["params"] = {"top_k": top_k}
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read())
            if not out.get("predictions"):
                raise ValueError(f"no predictions in {str(out)[:200]}")
            latencies.append(time.perf_counter() - t0)
        except urllib.error.HTTPError as e:
            errors.append(f"HTTP {e.code}: {e.read()[:200]!r}")
        except (OSError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.1)  # a dead server: don't spin
        i += 1


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list; nan when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def run_load(url: str, clients: int, seconds: float, top_k: int | None,
             timeout: float) -> dict[str, object]:
    latencies: list[float] = []  # list.append is atomic under the GIL
    errors: list[str] = []
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, start + seconds, top_k, n, timeout,
                                                     latencies, errors), daemon=True)
               for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    wall = time.monotonic() - start
    lat = sorted(latencies)
    return {
        "clients": clients, "seconds": round(wall, 2), "requests": len(lat) + len(errors),
        "ok": len(lat), "errors": len(errors), "first_errors": errors[:5],
        "p50_ms": round(1000 * percentile(lat, 50), 1),
        "p95_ms": round(1000 * percentile(lat, 95), 1),
        "max_ms": round(1000 * lat[-1], 1) if lat else float("nan"),
        "requests_per_s": round(len(lat) / wall, 2),
        "alive_after": ping(url, timeout=10),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5001")
    where.add_argument("--model", help="a model URI or folder to serve for the run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--top-k", type=int, default=None, help="sent as params.top_k (default: "
                    "none, the model's own)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    ap.add_argument("--workers", type=int, default=None, help="mlflow models serve -w")
    ap.add_argument("--startup", type=float, default=180.0, help="seconds to wait for /ping")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients must be >= 1 and --seconds > 0")

    def measure(url: str) -> dict[str, object]:
        if not ping(url, timeout=10):
            raise SystemExit(f"error: {url}/ping does not answer")
        run_load(url, 1, min(2.0, args.seconds), args.top_k, args.timeout)  # warm-up
        return run_load(url, args.clients, args.seconds, args.top_k, args.timeout)

    if args.url:
        report = measure(args.url.rstrip("/"))
    else:
        with served(args.model, args.workers, args.startup) as url:
            report = measure(url)
    print(f"{report['clients']} clients x {report['seconds']} s: {report['requests']} requests, "
          f"{report['errors']} errors, p50 {report['p50_ms']} ms, p95 {report['p95_ms']} ms, "
          f"max {report['max_ms']} ms, {report['requests_per_s']} requests/s, server "
          f"{'still answering' if report['alive_after'] else 'NOT answering'}")
    for e in report["first_errors"]:  # type: ignore[union-attr]
        print(f"  error: {e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["errors"] == 0 and report["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
