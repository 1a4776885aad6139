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
