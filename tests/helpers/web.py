"""Shared by the web tests: start `mllm web`'s server in this process on a free local port, ask it questions."""

from __future__ import annotations

import socket
from pathlib import Path

# A prompt limit far above a one-image question on the fixture (a few hundred tokens) and far below the
# over-long question of the tests.
MAX_LENGTH = 2048
QUESTION = "What is in the image?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path):
    """The page of `mllm web MODEL_DIR --max-length MAX_LENGTH` on 127.0.0.1:<free port>; returns the app."""
    from mllm.web.app import serve

    return serve(
        model_dir, host="127.0.0.1", port=free_port(), device="cpu", max_length=MAX_LENGTH, block=False
    )


def fixture_image(model_dir: Path) -> Path:
    return model_dir / "images" / "img_448x448.png"


def chat_greedy(model, processor, msgs, max_new_tokens: int, **overrides) -> str:
    """`mllm chat`'s answer: the `chat` function with the greedy preset (what `--strategy greedy` passes)."""
    from mllm.model.chat import chat, decoding_kwargs

    kwargs = decoding_kwargs("greedy", max_new_tokens=max_new_tokens, **overrides)
    return chat(model, None, msgs, processor.tokenizer, processor, **kwargs)


def answers_in_one_batch(engine, jobs: list[tuple[dict, object, int]], timeout_s: float = 60.0) -> list[str]:
    """Queue (encoded prompt, decoding, max_tokens) jobs on a stopped `mllm.serve.batcher.BatchEngine`, start it
    (all are waiting: one batch), wait for every answer and stop it; the answers in job order."""
    import time

    from mllm.serve.batcher import Job

    results: dict[int, str] = {}
    for i, (encoded, decoding, max_tokens) in enumerate(jobs):

        def done(kind, choice, payload, i=i):
            if kind == "done":
                results[i] = payload[0]

        engine.submit(Job(encoded, decoding, max_tokens, 1, done))
    engine.start()
    deadline = time.monotonic() + timeout_s
    while len(results) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    return [results.get(i) for i in range(len(jobs))]
