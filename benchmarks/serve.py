"""`mllm serve` throughput: dynamic batching against one request at a time, at 1, 4 and 16 concurrent clients.

Usage: python benchmarks/serve.py [--model ../shared/fixtures/minicpmv26_tiny] [--requests 32] [--max-tokens 32]
       [--concurrency 1 4 16] [--max-batch-size 16] [--out serve_benchmark.json]

Two servers run as `mllm serve` subprocesses on loopback, one after the other, on the same model: `--max-batch-size
N` (requests that arrive together are decoded together) and `--max-batch-size 1` (the same server answering one
request at a time: the baseline). No library server loads this model on a CPU (vLLM and SGLang need a GPU and the
official remote code; `transformers serve` needs a model class of transformers itself), so the baseline is our own
path without batching. Clients are threads with the official `openai` client; every request is one 448x448 fixture
image (one slice) and one of several questions, greedy, `--max-tokens` answer tokens at most. Reported per server and
concurrency: requests/s, completion tokens/s (from the responses' `usage`) and mean latency; the script also checks
that both servers gave every request the same answer.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "fixtures" / "minicpmv26_tiny"
QUESTIONS = (
    "Describe this image in detail.",
    "What objects are in the picture?",
    "What is the main color?",
    "Is there a person? Please answer yes or no.",
    "Write a short caption.",
    "How many shapes are there?",
    "What is on the left?",
    "Where is the largest object?",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, max_batch_size: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mllm",
        "--log-level",
        "WARNING",
        "serve",
        str(model),
        "--port",
        str(port),
    ]
    command += ["--max-batch-size", str(max_batch_size), "--max-queue", "256", "--device", "cpu"]
    command += ["--served-model-name", "bench", "--default-max-tokens", str(max_tokens)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start in 300 s")


def run_load(url: str, image_url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    import threading

    import openai

    local = threading.local()

    def ask(i: int) -> tuple[str, int, float]:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
        ]
        started = time.perf_counter()
        reply = local.client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=max_tokens,
        )
        return reply.choices[0].message.content, reply.usage.completion_tokens, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, range(requests)))
    seconds = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "completion_tokens": tokens,
        "mean_latency_s": round(sum(r[2] for r in results) / requests, 3),
        "answers": [r[0] for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    image = args.model / "images" / "img_448x448.png"
    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    results: dict[str, list[dict]] = {}
    for name, batch in (("batched", args.max_batch_size), ("one_at_a_time", 1)):
        process, url = start_server(args.model, batch, args.max_tokens)
        try:
            run_load(url, image_url, min(4, args.requests), 1, args.max_tokens)  # warm-up
            results[name] = [
                run_load(url, image_url, args.requests, c, args.max_tokens) for c in args.concurrency
            ]
        finally:
            process.terminate()
            process.wait(timeout=60)
    same = all(a["answers"] == b["answers"] for a, b in zip(results["batched"], results["one_at_a_time"]))
    print(f"{'server':<14} {'clients':>7} {'req/s':>8} {'tok/s':>8} {'latency s':>10}")
    for name, rows in results.items():
        for row in rows:
            print(
                f"{name:<14} {row['concurrency']:>7} {row['requests_per_s']:>8.2f} {row['tokens_per_s']:>8.1f} "
                f"{row['mean_latency_s']:>10.3f}"
            )
    for batched, single in zip(results["batched"], results["one_at_a_time"]):
        ratio = batched["requests_per_s"] / single["requests_per_s"]
        print(f"{batched['concurrency']} clients: batching {ratio:.2f}x the requests/s of one at a time")
    print(f"same answers from both servers: {same}")
    if args.out:
        for rows in results.values():
            for row in rows:
                row.pop("answers")
        report = {"model": str(args.model), "max_tokens": args.max_tokens, "same_answers": same, **results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
