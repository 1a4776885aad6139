"""`mllm serve` throughput: dynamic batching against one request at a time, at 1, 4 and 16 concurrent clients.

Usage: python benchmarks/serve.py [--model ../shared/fixtures/minicpmv26_tiny] [--requests 32] [--max-tokens 32]
       [--concurrency 1 4 16] [--max-batch-size 16] [--repeats 3] [--out serve_benchmark.json]

Two servers run as `mllm serve` subprocesses on loopback, on the same model: `--max-batch-size N` (requests that
arrive together are decoded together) and `--max-batch-size 1` (the same server answering one request at a time: the
baseline). Only one of them is loaded at a time; the runs alternate between them, --repeats times per concurrency,
and the fastest run of each is kept (the machine is shared, so a slow run says more about the neighbours). No library server loads this model on a CPU (vLLM and SGLang need a GPU and the
official remote code; `transformers serve` needs a model class of transformers itself), so the baseline is our own
path without batching. Clients are threads with the official `openai` client; every request is one 448x448 fixture
image (one slice) and one of several questions, greedy, `--max-tokens` answer tokens at most. Reported per server and
concurrency: requests/s, completion tokens/s (from the responses' `usage`) and mean latency; the script also checks
that both servers gave every request the same answer. Then, with the servers stopped, the same prompts go through the
batching engine in this process without HTTP: --max-batch-size of them in one `generate` call against one call each
(what batching saves in the model itself, apart from request handling).
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

from generate import DEFAULT_MODEL, QUESTIONS  # benchmarks/generate.py, beside this script


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


def engine_speed(model_dir: Path, count: int, max_tokens: int, repeats: int) -> dict:
    """Seconds for `count` prompts through `BatchEngine.run_batch`: all in one call, and one call each (best of
    `repeats`), and whether both gave the same answers."""
    from PIL import Image

    from mllm.api import load
    from mllm.serve.batcher import BatchEngine, Job
    from mllm.serve.schemas import ChatCompletionRequest

    model, processor = load(model_dir, "cpu", "auto")
    image = Image.open(model_dir / "images" / "img_448x448.png").convert("RGB")
    request = ChatCompletionRequest.parse(
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 0}'
    )
    encoded = []
    for i in range(count):
        prompt, images = processor.prepare_chat_inputs(
            [{"role": "user", "content": [image, QUESTIONS[i % len(QUESTIONS)]]}]
        )
        encoded.append(processor.encode(prompt, images))
    engine = BatchEngine(model, processor, count, count, 0)

    def run(groups: list[list[int]]) -> tuple[float, list[str]]:
        answers: dict[int, str] = {}
        started = time.perf_counter()
        for group in groups:
            jobs = [
                Job(
                    encoded[i],
                    request.decoding(1),
                    max_tokens,
                    1,
                    lambda kind, choice, payload, i=i: (
                        answers.__setitem__(i, payload[0]) if kind == "done" else None
                    ),
                )
                for i in group
            ]
            engine.run_batch(jobs)
        return time.perf_counter() - started, [answers[i] for i in sorted(answers)]

    run([[0]])  # warm-up
    batched = [run([list(range(count))]) for _ in range(repeats)]
    single = [run([[i] for i in range(count)]) for _ in range(repeats)]
    return {
        "prompts": count,
        "one_generate_call_s": round(min(t for t, _ in batched), 3),
        "one_call_each_s": round(min(t for t, _ in single), 3),
        "same_answers": batched[0][1] == single[0][1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per server and concurrency (the best is kept)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # Before torch starts (it is imported only for the engine part): OpenMP threads that spin while they wait
    # starve everything else on a small shared machine (the engine part ran 3.7x slower without it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    image = args.model / "images" / "img_448x448.png"
    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    servers = {"batched": args.max_batch_size, "one_at_a_time": 1}
    results: dict[str, list[dict]] = {name: [] for name in servers}
    processes = {}
    try:
        for name, batch in servers.items():
            processes[name] = start_server(args.model, batch, args.max_tokens)
            run_load(processes[name][1], image_url, min(4, args.requests), 1, args.max_tokens)  # warm-up
        for concurrency in args.concurrency:
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.repeats):
                for name, (_, url) in processes.items():
                    runs[name].append(run_load(url, image_url, args.requests, concurrency, args.max_tokens))
            for name, rows in runs.items():
                best = max(rows, key=lambda row: row["requests_per_s"])
                best["repeats"] = [row["requests_per_s"] for row in rows]
                results[name].append(best)
    finally:
        for process, _ in processes.values():
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
    engine = engine_speed(args.model, args.max_batch_size, args.max_tokens, args.repeats)
    print(
        f"engine, no HTTP: {engine['prompts']} prompts in one generate call {engine['one_generate_call_s']:.2f} s, "
        f"one call each {engine['one_call_each_s']:.2f} s, same answers: {engine['same_answers']}"
    )
    same = same and engine["same_answers"]
    if args.out:
        for rows in results.values():
            for row in rows:
                row.pop("answers")
        report = {"model": str(args.model), "max_tokens": args.max_tokens, "same_answers": same, **results}
        report["engine"] = engine
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
