"""The page's logic without Gradio: one conversation, the decoding panel's settings, one streamed answer.

Inference goes through `mllm.model.chat.chat` (processor -> `MLLMModel.generate`) exactly as `mllm chat` does;
this module only turns page inputs into its arguments. Every bad input is a `ValueError` whose message the page
shows as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, RecordError, open_image, open_image_header
from mllm.model.chat import STRATEGIES, chat, decoding_kwargs


@dataclass
class ChatSession:
    """One browser session's conversation: what the model sees (`messages`, images inside the user turns), what
    the chat box shows (`display`), every image given so far (the last one is used for grounding pictures), and
    whether an answer is being streamed right now. `epoch` counts Clears: an answer started before a Clear sees
    it changed, stops and is not added to the new conversation."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    display: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    busy: bool = False
    epoch: int = 0

    def clear(self) -> None:
        """Start a new conversation in place (the page's State keeps pointing at this object)."""
        self.messages, self.display, self.images = [], [], []
        self.busy = False
        self.epoch += 1


@dataclass(frozen=True)
class Decoding:
    """The decoding panel: a strategy and its knobs (the knobs of other strategies are ignored)."""

    strategy: str = "greedy"
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 100
    num_beams: int = 3
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def kwargs(self) -> dict[str, Any]:
        """transformers generation kwargs: the strategy's preset (`decoding_kwargs`, as the CLI) with the panel's
        values for that strategy's own knobs."""
        self._check()
        overrides: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
        }
        if self.strategy == "sampling":
            overrides.update(
                temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k)
            )
        if self.strategy == "beam":
            overrides["num_beams"] = int(self.num_beams)
        return decoding_kwargs(self.strategy, **overrides)

    @property
    def streams(self) -> bool:
        """Beam search keeps several candidates until the end, so it cannot stream: it answers in one piece."""
        return not (self.strategy == "beam" and int(self.num_beams) > 1)

    def _check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Decoding strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}."
            )
        checks = [
            (self.max_new_tokens >= 1, "Max new tokens must be at least 1."),
            (self.repetition_penalty > 0, "Repetition penalty must be positive."),
        ]
        if self.strategy == "sampling":
            checks += [
                (self.temperature > 0, "Temperature must be positive (use greedy for temperature 0)."),
                (0 < self.top_p <= 1, "Top-p must be in (0, 1]."),
                (self.top_k >= 1, "Top-k must be at least 1."),
            ]
        if self.strategy == "beam":
            checks.append((self.num_beams >= 1, "The number of beams must be at least 1."))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def check_images(paths: Sequence[str | Path] | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Uploaded files checked from their headers alone (nothing is decoded): a file that is not an image, a
    decompression bomb or an image over `max_pixels` is a ValueError naming it."""
    for path in paths or []:
        name = Path(path).name
        try:
            open_image_header(path, name, max_pixels).close()
        except RecordError as exc:
            if "not a readable image" in str(exc):
                raise ValueError(f"{name} is not an image that can be read.") from exc
            raise ValueError(f"{exc}.") from exc


def open_images(
    paths: Sequence[str | Path] | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[Image.Image]:
    """Uploaded files -> RGB images (decoded within the pixel cap); a file that cannot be used is a ValueError
    naming it."""
    check_images(paths, max_pixels)
    images = []
    for path in paths or []:
        try:
            images.append(open_image(path, Path(path).name, max_pixels))
        except RecordError as exc:  # the header was fine, the pixel data is not
            raise ValueError(f"{Path(path).name} is not an image that can be read.") from exc
    return images


def user_turn(question: str | None, images: list[Image.Image]) -> dict[str, Any]:
    """The user message for the model: images first, then the question (the layout `mllm chat` uses)."""
    question = (question or "").strip()
    if not question:
        raise ValueError("Type a question first" + (" about the image(s)." if images else "."))
    return {"role": "user", "content": [*images, question] if images else question}


def stream_answer(
    model,
    processor,
    messages: list[dict[str, Any]],
    decoding: Decoding,
    max_length: int | None = None,
) -> Iterator[str]:
    """The answer to `messages` as it grows (each item is the whole text so far).

    The prompt is built and checked (a prompt over `max_length` is a ValueError) before the first item, so a
    caller can report it before changing anything. Beam search yields once, with the finished answer.
    """
    kwargs = decoding.kwargs()
    common = {"max_length": max_length, **kwargs}
    if not decoding.streams:
        answer = chat(model, None, messages, processor.tokenizer, processor, **common)
        return iter([answer])
    stop = threading.Event()
    stopping = StoppingCriteriaList([_StopWhenSet(stop)])
    streamer = chat(
        model,
        None,
        messages,
        processor.tokenizer,
        processor,
        stream=True,
        stopping_criteria=stopping,
        **common,
    )
    return _accumulate(streamer, stop)


class _StopWhenSet(StoppingCriteria):
    """Ends generation once `event` is set: an answer nobody reads any more (page cleared, tab closed) stops
    using the model instead of running to max_new_tokens."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _accumulate(pieces: Iterator[str], stop: threading.Event) -> Iterator[str]:
    """Text pieces -> the growing text; the last item is stripped like the non-streamed answer. Closing the
    iterator early stops the generation."""
    text = ""
    try:
        for piece in pieces:
            text += piece
            yield text
        yield text.strip()
    finally:
        stop.set()
