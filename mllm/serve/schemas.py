"""The OpenAI chat-completions wire format: request models (pydantic), their decoding settings, response bodies
and OpenAI-style errors.

Decoding: `temperature` 0 is greedy; `num_beams` > 1 (an extension) is beam search; anything else samples. Fields a
request leaves out take `mllm chat`'s presets for that strategy (`mllm.model.chat.decoding_kwargs`: sampling =
temperature 0.7, top_p 0.8, top_k 100, repetition penalty 1.05; beam = repetition penalty 1.2), so the server answers
like the command line. `top_k` and `repetition_penalty` are extensions too.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mllm.model.chat import decoding_kwargs

MAX_STOP_STRINGS = 4
# Request fields that would change what an answer means and that this server does not implement: refused, not
# silently ignored. (Unknown fields such as `user`, `store` or `metadata` are accepted and ignored.)
UNSUPPORTED_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
)


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and `{"error": {message, type, param, code}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` body."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    # extensions
    num_beams: int | None = Field(None, ge=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)

    @classmethod
    def parse(cls, body: bytes) -> ChatCompletionRequest:
        """The request from its JSON body; a malformed body or field is a 400 naming the field."""
        try:
            request = cls.model_validate_json(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or None
            message = f"{where}: {error['msg']}" if where else error["msg"]
            raise APIError(400, f"invalid request: {message}", param=where) from None
        request.refuse_unsupported()
        return request

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            if extra.get(name) not in (None, False, [], {}):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(
                    400, f"{name} is not supported (use the repetition_penalty extension)", param=name
                )
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"stop: up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return tuple(stops)

    @property
    def answer_tokens(self) -> int | None:
        """The requested answer length (max_completion_tokens, else max_tokens), None when not given."""
        return self.max_completion_tokens or self.max_tokens

    def decoding(self, max_beams: int) -> Decoding:
        """The transformers generation settings this request asks for (see the module docstring)."""
        beams = self.num_beams or 1
        if beams > max_beams:
            raise APIError(400, f"num_beams must be at most {max_beams}, got {beams}", param="num_beams")
        if beams > 1:
            if self.temperature not in (None, 0):
                raise APIError(
                    400, "num_beams > 1 is beam search: leave temperature unset or 0", param="temperature"
                )
            kwargs = decoding_kwargs("beam", num_beams=beams, repetition_penalty=self.repetition_penalty)
        elif self.temperature == 0:
            kwargs = decoding_kwargs("greedy", repetition_penalty=self.repetition_penalty)
        else:
            kwargs = decoding_kwargs(
                "sampling",
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
            )
        return Decoding(tuple(sorted(kwargs.items())), self.stop_strings, self.seed)


@dataclass(frozen=True)
class Decoding:
    """Generation settings of one request: transformers kwargs (sorted items), stop strings and seed."""

    kwargs: tuple[tuple[str, Any], ...]
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def num_beams(self) -> int:
        return int(self.generate_kwargs.get("num_beams", 1))

    @property
    def sampling(self) -> bool:
        return bool(self.generate_kwargs.get("do_sample"))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    cid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `chat.completion` object; `choices` are (text, finish_reason) in index order."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    cid: str,
    model: str,
    index: int | None,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`: one choice's delta (and finish reason), or no choice (`index` None)."""
    choices = []
    if index is not None:
        choices.append(
            {"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
        )
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def models_body(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "mllm"}],
    }
