"""The HTTP side of `mllm serve`: a FastAPI app with the OpenAI chat-completions routes, run by uvicorn.

Routes: `POST /v1/chat/completions` (plain, or `stream: true` as server-sent events), `GET /v1/models` and
`GET /health` (no key needed). A request is checked and encoded here, in a worker thread of the event loop, so that
bad input is answered before it reaches the model: 400 bad parameters or images, 401 key, 404 unknown model, 413
body or pixels over the limit, 422 prompt over the context, 503 queue full. Decoding happens in the `BatchEngine`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mllm.serve.batcher import BatchEngine, Job, QueueFull
from mllm.serve.config import ServeConfig
from mllm.serve.images import to_chat_messages
from mllm.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    models_body,
    usage,
)

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A checked request ready for the engine."""

    request: ChatCompletionRequest
    encoded: dict
    max_tokens: int


@dataclass
class Pending:
    """A submitted job and the asyncio queue its events arrive on."""

    job: Job
    events: asyncio.Queue


class ChatService:
    """Turns a request body into a `Job` and the job's events into OpenAI responses."""

    def __init__(self, model, processor, config: ServeConfig):
        self.model, self.processor, self.config = model, processor, config
        self.engine = BatchEngine(
            model, processor, config.max_batch_size, config.max_queue, config.batch_wait_ms
        )
        self.context = config.max_model_len or int(model.config.max_position_embeddings)
        self.created = int(time.time())
        self._encode_lock = threading.Lock()  # one tokenizer, shared by the request threads

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), self.config.api_key):
            raise APIError(
                401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key"
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413, f"the request body has {declared} bytes, more than {limit} (--max-request-bytes)"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit} bytes (--max-request-bytes)")
        return bytes(body)

    def prepare(self, body: bytes) -> Prepared:
        """Parse, check and encode (in a worker thread: images are decoded and sliced here)."""
        request = ChatCompletionRequest.parse(body)
        if request.model is not None and request.model != self.config.model_name:
            raise APIError(
                404,
                f"model {request.model!r} is not served here (this server serves {self.config.model_name!r})",
                param="model",
                code="model_not_found",
            )
        if request.n > self.config.max_batch_size:
            raise APIError(
                400, f"n must be at most {self.config.max_batch_size} (--max-batch-size)", param="n"
            )
        request.decoding(self.config.max_beams)  # settings errors before any image work
        messages = to_chat_messages(
            request.messages,
            self.config.allowed_local_media_path,
            self.config.max_request_pixels,
            self.config.max_image_pixels,
        )
        try:
            with self._encode_lock:
                prompt, images = self.processor.prepare_chat_inputs(messages)
                encoded = self.processor.encode(prompt, images)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        return Prepared(
            request, encoded, self.answer_budget(len(encoded["input_ids"]), request.answer_tokens)
        )

    def answer_budget(self, prompt_tokens: int, asked: int | None) -> int:
        """max_tokens for the answer, or 422 when the prompt (and the answer asked for) exceed the context."""
        if prompt_tokens >= self.context:
            raise APIError(
                422,
                f"the prompt has {prompt_tokens} tokens; the context holds {self.context} (--max-model-len)",
                param="messages",
                code="context_length_exceeded",
            )
        if asked is None:
            return min(self.config.default_max_tokens, self.context - prompt_tokens)
        if prompt_tokens + asked > self.context:
            raise APIError(
                422,
                f"the prompt has {prompt_tokens} tokens and max_tokens asks for {asked} more; the "
                f"context holds {self.context} (--max-model-len)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def submit(self, prepared: Prepared) -> Pending:
        """Queue the job; its events arrive on the returned asyncio queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = prepared.request
        job = Job(
            encoded=prepared.encoded,
            decoding=request.decoding(self.config.max_beams),
            max_tokens=prepared.max_tokens,
            n=request.n,
            on_event=lambda kind, choice, payload: post(loop, events, (kind, choice, payload)),
        )
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise APIError(503, str(exc), code="queue_full") from None
        return Pending(job, events)

    async def complete(self, prepared: Prepared, pending: Pending) -> dict:
        cid, results = completion_id(), {}
        try:
            while True:
                kind, choice, payload = await pending.events.get()
                if kind == "done":
                    results[choice] = payload
                elif kind == "error":
                    raise APIError(500, payload)
                elif kind == "end":
                    break
        finally:  # a request whose reader went away stops decoding
            pending.job.cancelled.set()
        choices = [results[i] for i in range(prepared.request.n)]
        completion = sum(count for _, _, count in choices)
        return completion_body(
            cid,
            self.config.model_name,
            [(text, reason) for text, reason, _ in choices],
            len(prepared.encoded["input_ids"]),
            completion,
        )

    async def stream(self, prepared: Prepared, pending: Pending) -> AsyncIterator[str]:
        cid, model, n = completion_id(), self.config.model_name, prepared.request.n
        completion = 0
        try:
            for index in range(n):
                yield sse(chunk_body(cid, model, index, {"role": "assistant", "content": ""}))
            while True:
                kind, choice, payload = await pending.events.get()
                if kind == "delta":
                    yield sse(chunk_body(cid, model, choice, {"content": payload}))
                elif kind == "done":
                    completion += payload[2]
                    yield sse(chunk_body(cid, model, choice, {}, finish_reason=payload[1]))
                elif kind == "error":
                    yield sse(APIError(500, payload).body())
                    break
                elif kind == "end":
                    options = prepared.request.stream_options
                    if options is not None and options.include_usage:
                        body = chunk_body(cid, model, None)
                        body["usage"] = usage(len(prepared.encoded["input_ids"]), completion)
                        yield sse(body)
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the answer is complete
            pending.job.cancelled.set()


def post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item: tuple) -> None:
    """Hand an event from the worker thread to the request's coroutine (dropped once the server's loop is gone)."""
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # closed between the check and the call, at shutdown
            pass


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def build_app(model, processor, config: ServeConfig) -> FastAPI:
    """The app; its lifespan starts and stops the batching worker."""
    service = ChatService(model, processor, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title=f"mllm serve: {config.model_name}", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "waiting": service.engine.waiting}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        service.check_key(request)
        return models_body(config.model_name, service.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service.check_key(request)
        with service.engine.arriving():
            body = await service.read_body(request)
            prepared = await run_in_threadpool(service.prepare, body)
            pending = service.submit(prepared)
        if prepared.request.stream:
            return StreamingResponse(service.stream(prepared, pending), media_type="text/event-stream")
        return await service.complete(prepared, pending)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); a clear ValueError when that is impossible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server:
    """uvicorn serving `app` on an already bound socket: `run()` blocks; `start()` runs it in a thread until
    `close()` (tests, benchmarks, notebooks)."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "warning"):
        import uvicorn

        self.socket = bind(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout_s: float = 60) -> Server:
        self._thread = threading.Thread(target=self.run, name="mllm-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)


def run_server(model, processor, config: ServeConfig) -> None:
    """Serve until interrupted (the body of `mllm serve`)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()  # `mllm --log-level`
    server = Server(build_app(model, processor, config), config.host, config.port, log_level=level)
    if config.exposed and config.api_key is None:
        logger.warning("--host %s: the API is reachable from other machines and needs no key", config.host)
    logger.info(
        "serving %s at %s/v1 (batches of up to %d)", config.model_name, server.url, config.max_batch_size
    )
    server.run()
