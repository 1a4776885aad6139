"""Dynamic batching over `MLLMModel.generate`: requests that arrive together are decoded together.

One worker thread owns the model. Requests wait in a bounded queue (`QueueFull` past `max_queue`); the worker takes
the oldest and every waiting request with the same decoding settings, until `max_batch_size` sequences (a request
with `n` choices is n sequences). While other requests are still arriving (announced with `arriving()`: being read,
their images decoded and sliced), it waits for them, up to `batch_wait_ms`; when none are, it starts at once. (A
fixed window would either keep a lone client waiting or, when clients send together, let the first request run
alone while the others are still being prepared.) The batch is left-padded by
the processor and decoded in one `generate` call, exactly as `mllm answer` batches, so a greedy answer is the same
alone and batched (tests/test_serve.py). Rows stop on their own: a `RowTracker` stopping criterion reads each row's
newest token, ends the row at a terminator, a stop string or the row's own max_tokens, and publishes the row's new
text to its request (that is how answers stream). Beam search cannot stream: its rows are read after `generate`.

What is grouped: greedy and beam requests with equal settings (beam also needs equal max_tokens, since beam search
ranks finished candidates by length); sampling requests with equal settings and no seed. A sampling request with a
`seed` runs alone after `torch.manual_seed(seed)`, so that its answer is reproducible; without a seed, sampled
answers depend on the random state, as they would one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mllm.serve.schemas import Decoding

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The request queue holds `max_queue` requests already."""


@dataclass
class Job:
    """One request: its encoded prompt (the processor's `encode` output), settings and where results go.

    `on_event` is called from the worker thread with ("delta", choice, text), ("done", choice, (text,
    finish_reason, completion_tokens)) and finally ("end", None, None) or ("error", None, message)."""

    encoded: dict[str, Any]
    decoding: Decoding
    max_tokens: int
    n: int
    on_event: Callable[[str, int | None, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded["input_ids"])

    @property
    def group(self) -> tuple | None:
        """Requests with equal keys decode together; None runs alone."""
        if self.decoding.sampling and self.decoding.seed is not None:
            return None
        key = (self.decoding.kwargs, self.decoding.stop)
        return (*key, self.max_tokens) if self.decoding.num_beams > 1 else key


class RowState:
    """One sequence of a batch as its tokens arrive: the text so far, what was published, how it ended.

    The text is what `MLLMModel._decode_text` gives (a leading bos dropped, cut at the first terminator, decoded
    with special tokens, stripped), further cut before the first stop string. Published text never runs ahead of
    that: trailing whitespace, an incomplete character and a possible start of a stop string wait for the next
    token, so the deltas join to exactly the final text."""

    def __init__(self, tokenizer, terminators: set[int], limit: int, stop: tuple[str, ...], publish):
        self.tokenizer, self.terminators, self.limit, self.stop = tokenizer, terminators, limit, stop
        self.publish = publish
        self.tokens: list[int] = []
        self.count = 0
        self.text = ""
        self.sent = ""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        if self.done:
            return
        self.count += 1
        if token in self.terminators:
            self._finish("stop")
            return
        if self.count > 1 or token != self.tokenizer.bos_token_id:
            self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens).lstrip()
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif self.count >= self.limit:
            self._finish("length")
        else:
            self._send(self._safe_prefix())

    def finish_length(self) -> None:
        """generate ended without this row ending (its limit is the batch's): the row ran out of tokens."""
        if not self.done:
            self._finish("length")

    def _safe_prefix(self) -> str:
        text = self.text.rstrip()
        if text.endswith("\ufffd"):  # a character whose bytes are not all there yet
            return self.sent
        for stop in self.stop:  # the text may end with the first characters of a stop string
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    text = min(text, self.text[:-k].rstrip(), key=len)
                    break
        return text

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.publish("delta", text[len(self.sent) :])
            self.sent = text

    def _finish(self, reason: str) -> None:
        self.text = self.text.strip()
        self.finish_reason = reason
        if not self.text.startswith(
            self.sent
        ):  # cannot happen for a prefix-stable decoder; say so if it does
            logger.warning("streamed text %r is not a prefix of the answer %r", self.sent, self.text)
        self._send(self.text)
        self.publish("done", (self.text, reason, self.count))


class RowTracker(StoppingCriteria):
    """Feeds each row's newest token to its `RowState` and tells `generate` which rows are finished (or whose
    request was cancelled). With `inputs_embeds`, generate's `input_ids` hold only the new tokens."""

    def __init__(self, rows: list[RowState], cancelled: list[threading.Event]):
        self.rows, self.cancelled = rows, cancelled

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest):
            row.push(token)
        done = [row.done or flag.is_set() for row, flag in zip(self.rows, self.cancelled)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class BatchEngine:
    """The worker thread and its queue; `submit` from any thread, `start`/`stop` around serving."""

    def __init__(self, model, processor, max_batch_size: int, max_queue: int, batch_wait_ms: float):
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch_wait_s = batch_wait_ms / 1000
        self.terminators = set(model.terminator_ids(processor.tokenizer))
        self._pending: deque[Job] = deque()
        self._arriving = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: list[int] = []
        """Sequences per generate call, in order (for tests and the benchmark)."""

    # -- queue ----------------------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests in the queue (not yet being decoded)."""
        with self._cond:
            return len(self._pending)

    @contextmanager
    def arriving(self):
        """Around the preparation of a request that will be submitted: the worker may wait for it."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, job: Job) -> None:
        if job.n > self.max_batch_size:
            raise ValueError(f"n={job.n} is more than the server's --max-batch-size {self.max_batch_size}")
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._pending.append(job)
            self._cond.notify_all()

    def _take_batch(self) -> list[Job] | None:
        """The oldest waiting job and the compatible ones, waiting up to batch_wait_ms while more are arriving
        (None: stopping)."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending.popleft()
            batch, rows = [first], first.n
            if first.group is None:
                return batch
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch_size:
                mate = next(
                    (
                        j
                        for j in self._pending
                        if j.group == first.group and rows + j.n <= self.max_batch_size
                    ),
                    None,
                )
                if mate is not None:
                    self._pending.remove(mate)
                    batch.append(mate)
                    rows += mate.n
                    continue
                remaining = deadline - time.monotonic()
                if not self._arriving or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    # -- worker ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mllm-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            job.on_event("error", None, "the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as exc:  # a failed batch fails its requests, not the server
                logger.exception("generation failed for a batch of %d requests", len(batch))
                for job in batch:
                    job.on_event("error", None, f"generation failed: {type(exc).__name__}: {exc}")
                continue
            for job in batch:
                job.on_event("end", None, None)

    def run_batch(self, batch: list[Job]) -> None:
        """Decode `batch` (jobs of one group) in one generate call; results go to each job's `on_event`."""
        decoding = batch[0].decoding
        tokenizer = self.processor.tokenizer
        rows, encoded, cancelled = [], [], []
        for job in batch:
            for choice in range(job.n):
                publish = _publisher(job, choice)
                rows.append(RowState(tokenizer, self.terminators, job.max_tokens, decoding.stop, publish))
                encoded.append(job.encoded)
                cancelled.append(job.cancelled)
        inputs = self.processor.collate(encoded)
        kwargs = {**decoding.generate_kwargs, "max_new_tokens": max(job.max_tokens for job in batch)}
        streams = decoding.num_beams == 1
        if streams:
            kwargs["stopping_criteria"] = StoppingCriteriaList([RowTracker(rows, cancelled)])
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        self.batch_sizes.append(len(rows))
        output = self.model.generate(inputs, tokenizer=tokenizer, **kwargs)  # [rows, new]
        for row, tokens in zip(rows, output.tolist()):
            if not streams:
                for token in tokens:
                    row.push(token)
                    if row.done:
                        break
            row.finish_length()


def _publisher(job: Job, choice: int):
    return lambda kind, payload: job.on_event(kind, choice, payload)
