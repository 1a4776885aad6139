"""`mllm serve`: a live server on loopback (uvicorn in a thread, a free port) with the fixture model, driven by
the official `openai` client. Answers are compared with `chat` under the greedy preset (`mllm chat`'s answer)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from helpers.web import chat_greedy, fixture_image
from PIL import Image

from mllm.model.chat import chat, decoding_kwargs

KEY = "test-key"
TOKENS = 12
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def model_and_processor(small_model_dir):
    from mllm.api import load

    return load(small_model_dir, "cpu", "auto")


def start(model_and_processor, **settings):
    from mllm.serve.app import Server, build_app
    from mllm.serve.config import ServeConfig

    defaults = {"model_name": "tiny", "port": 0, "api_key": KEY, "max_model_len": 2048}
    config = ServeConfig(**{**defaults, **settings})
    app = build_app(*model_and_processor, config)
    return Server(app, "127.0.0.1", 0).start(), app.state.service.engine


@pytest.fixture(scope="module")
def server(model_and_processor, tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "img.png").write_bytes(fixture_bytes())
    server, engine = start(
        model_and_processor,
        max_batch_size=16,
        batch_wait_ms=20,
        max_request_bytes=2**20,
        max_request_pixels=1_500_000,
        allowed_local_media_path=root,
    )
    server.media_root, server.engine = root, engine
    yield server
    server.close()


def client_for(server, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "none", max_retries=0, timeout=120)


@pytest.fixture
def client(server):
    return client_for(server)


def fixture_bytes() -> bytes:
    from conftest import SHARED

    return fixture_image(SHARED / "fixtures" / "minicpmv26_tiny").read_bytes()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(question: str = QUESTION, url: str | None = None) -> list[dict]:
    url = url or data_url(fixture_bytes())
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def expected_greedy(model_and_processor, question: str = QUESTION, image: bool = True, **overrides) -> str:
    model, processor = model_and_processor
    content = [Image.open(io.BytesIO(fixture_bytes())).convert("RGB"), question] if image else question
    return chat_greedy(model, processor, [{"role": "user", "content": content}], TOKENS, **overrides)


def streamed(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_plain_and_streamed_answers_equal_chat(client, model_and_processor):
    expected = expected_greedy(model_and_processor)
    assert expected, "the fixture model should say something for this prompt"
    reply = client.chat.completions.create(
        model="tiny", messages=image_message(), temperature=0, max_tokens=TOKENS
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    model, processor = model_and_processor
    prompt, images = processor.prepare_chat_inputs(image_message_for_processor())
    prompt_tokens = len(processor.encode(prompt, images)["input_ids"])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, TOKENS)
    assert reply.usage.total_tokens == prompt_tokens + TOKENS

    text, chunks = streamed(
        client,
        messages=image_message(),
        temperature=0,
        max_tokens=TOKENS,
        stream_options={"include_usage": True},
    )
    assert text == expected
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer should come in several pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == TOKENS and chunks[-1].usage.prompt_tokens == prompt_tokens


def image_message_for_processor() -> list[dict]:
    return [{"role": "user", "content": [Image.open(io.BytesIO(fixture_bytes())).convert("RGB"), QUESTION]}]


def test_text_only_stop_strings_and_n(client, model_and_processor):
    question = "Say something."
    expected = expected_greedy(model_and_processor, question, image=False)
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=TOKENS, n=2
    )
    assert [c.message.content for c in reply.choices] == [expected, expected]
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == 2 * TOKENS
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    cut = expected[: expected.find(stop)].strip()
    reply = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=TOKENS, stop=[stop]
    )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    assert reply.usage.completion_tokens < TOKENS
    text, chunks = streamed(client, messages=messages, temperature=0, max_tokens=TOKENS, stop=stop)
    assert text == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_beam_search_and_seeded_sampling(client, model_and_processor):
    model, processor = model_and_processor
    messages = [{"role": "user", "content": "Hello?"}]
    beam = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, extra_body={"num_beams": 2}
    )
    kwargs = decoding_kwargs("beam", max_new_tokens=8, num_beams=2)
    assert beam.choices[0].message.content == chat(
        model, None, messages, processor.tokenizer, processor, **kwargs
    )
    text, _ = streamed(client, messages=messages, max_tokens=8, extra_body={"num_beams": 2})
    assert text == beam.choices[0].message.content  # beam search streams in one piece
    sampled = [
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=TOKENS, temperature=1.0, seed=seed
        )
        .choices[0]
        .message.content
        for seed in (3, 3, 4)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_local_files_only_under_the_allowed_folder(client, server, model_and_processor, tmp_path):
    expected = expected_greedy(model_and_processor)
    url = (server.media_root / "img.png").as_uri()
    reply = client.chat.completions.create(
        model="tiny", messages=image_message(url=url), temperature=0, max_tokens=TOKENS
    )
    assert reply.choices[0].message.content == expected
    outside = tmp_path / "img.png"
    outside.write_bytes(fixture_bytes())
    for url in (
        outside.as_uri(),
        (server.media_root / ".." / outside.name).as_uri(),
        "https://example.com/a.png",
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=image_message(url=url), max_tokens=2)


def test_batched_answers_equal_answers_alone(model_and_processor):
    """Requests decoded in one batch (different prompt lengths, with and without images) give the tokens each
    gives alone."""
    from mllm.serve.batcher import BatchEngine, Job
    from mllm.serve.schemas import ChatCompletionRequest

    model, processor = model_and_processor
    image = Image.open(io.BytesIO(fixture_bytes())).convert("RGB")
    conversations = [
        [{"role": "user", "content": [image, QUESTION]}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": [image, "Describe the picture in detail, please, with every colour."]}],
        [{"role": "user", "content": "A longer question about nothing in particular, to pad the others?"}],
    ]
    alone = [chat_greedy(model, processor, c, TOKENS) for c in conversations]
    decoding = ChatCompletionRequest.parse(
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 0}'
    )
    engine = BatchEngine(model, processor, max_batch_size=4, max_queue=8, batch_wait_ms=0)
    results: dict[int, str] = {}
    for i, conversation in enumerate(conversations):
        prompt, images = processor.prepare_chat_inputs(conversation)
        engine.submit(
            Job(
                processor.encode(prompt, images),
                decoding.decoding(8),
                TOKENS,
                1,
                lambda kind, choice, payload, i=i: (
                    results.__setitem__(i, payload[0]) if kind == "done" else None
                ),
            )
        )
    engine.start()  # all four are waiting: one batch
    deadline = time.monotonic() + 60
    while len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    assert engine.batch_sizes == [4]
    assert [results[i] for i in range(4)] == alone


def test_the_batcher_waits_for_requests_still_arriving_and_only_for_them(model_and_processor):
    from mllm.serve.batcher import BatchEngine, Job
    from mllm.serve.schemas import ChatCompletionRequest

    model, processor = model_and_processor
    prompt, _ = processor.prepare_chat_inputs([{"role": "user", "content": "Hi"}])
    encoded = processor.encode(prompt)
    decoding = ChatCompletionRequest.parse(
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 0}'
    )
    done = threading.Event()

    def job() -> Job:
        return Job(
            encoded, decoding.decoding(8), 2, 1, lambda kind, *_: done.set() if kind == "end" else None
        )

    engine = BatchEngine(model, processor, max_batch_size=4, max_queue=8, batch_wait_ms=20_000)
    engine.start()
    try:
        started = time.monotonic()
        engine.submit(job())  # nothing else is arriving: decoded at once, not after 20 s
        assert done.wait(15) and time.monotonic() - started < 15
        done.clear()

        entered = threading.Event()

        def late() -> None:
            with engine.arriving():  # a request being read and prepared
                entered.set()
                time.sleep(0.5)
                engine.submit(job())

        with engine.arriving():
            helper = threading.Thread(target=late)
            helper.start()
            entered.wait(10)
            engine.submit(job())
        helper.join()
        assert done.wait(30)
        assert engine.batch_sizes == [1, 2]  # the second request joined the first one's batch
    finally:
        engine.stop()


def test_load_64_requests_from_16_clients(server, model_and_processor, tiny_model_dir):
    """Bounded load on loopback: 64 requests, 16 at a time, 8 prompts with different answers; every one answered
    with its own prompt's answer, and the server batched them."""
    model, processor = model_and_processor
    images = ["img_448x448", "img_1000x300", "img_300x1000", "img_1344x896"]
    texts = ["Text question 0?", "Count to ten.", "Hello there, friend", "Name a colour."]
    prompts = [(tiny_model_dir / "images" / f"{name}.png").read_bytes() for name in images] + texts
    expected = []
    for prompt in prompts:
        content = (
            [Image.open(io.BytesIO(prompt)).convert("RGB"), QUESTION] if isinstance(prompt, bytes) else prompt
        )
        expected.append(chat_greedy(model, processor, [{"role": "user", "content": content}], TOKENS))
    assert len(set(expected)) == len(expected), "the prompts should have different answers"
    local = threading.local()
    before = len(server.engine.batch_sizes)

    def ask(i: int) -> tuple[int, str]:
        if not hasattr(local, "client"):
            local.client = client_for(server)
        k = i % len(prompts)
        prompt = prompts[k]
        messages = (
            image_message(url=data_url(prompt))
            if isinstance(prompt, bytes)
            else [{"role": "user", "content": prompt}]
        )
        reply = local.client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=TOKENS
        )
        return k, reply.choices[0].message.content

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(64)))
    assert time.monotonic() - started < 300
    assert sorted(k for k, _ in answers) == sorted(i % 8 for i in range(64))  # none lost
    assert [text for _, text in answers] == [expected[k] for k, _ in answers]  # none mixed up
    sizes = server.engine.batch_sizes[before:]
    assert sum(sizes) == 64 and max(sizes) > 1, sizes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 99}, "n"),
        ({"num_beams": 2, "temperature": 0.5}, "temperature"),
        ({"num_beams": 50}, "num_beams"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "<image> tag"}]}, "messages"),
    ],
)
def test_bad_parameters_are_400(client, body, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body}
    with pytest.raises(openai.BadRequestError) as error:
        client.post("/chat/completions", body=request, cast_to=object)
    assert error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "url",
    [data_url(b"not an image at all"), "data:image/png;base64,@@@not-base64@@@", "data:image/png,rawbytes"],
)
def test_bad_images_are_400_and_the_server_keeps_serving(client, url):
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="tiny", messages=image_message(url=url), max_tokens=2)
    assert client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=2).choices


def test_key_model_size_and_length_errors(server, client):
    messages = [{"role": "user", "content": "Hi"}]
    for key in ("wrong", None):
        with pytest.raises(openai.AuthenticationError):
            client_for(server, key).chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=messages, max_tokens=2)
    big = Image.new("RGB", (1400, 1200), "white")  # 1.68M pixels > the server's 1.5M
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    with pytest.raises(openai.APIStatusError, match="max-request-pixels") as error:
        client.chat.completions.create(model="tiny", messages=image_message(url=data_url(buffer.getvalue())))
    assert error.value.status_code == 413
    with pytest.raises(openai.APIStatusError, match="max-request-bytes") as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 2**20}])
    assert error.value.status_code == 413
    with pytest.raises(openai.UnprocessableEntityError, match="context holds 2048"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 3000}])
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens asks for 5000"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=5000)
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices
    assert [m.id for m in client.models.list()] == ["tiny"]
    import httpx

    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_full_queue_is_503_and_a_closed_stream_stops_decoding(model_and_processor):
    server, engine = start(model_and_processor, max_batch_size=1, max_queue=1)
    try:
        client = client_for(server)
        messages = [{"role": "user", "content": "Hi"}]
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1500, stream=True)
        next(iter(stream))
        deadline = time.monotonic() + 30
        while not engine.batch_sizes and time.monotonic() < deadline:  # the first answer is being decoded
            time.sleep(0.01)
        replies = []
        queued = threading.Thread(
            target=lambda: replies.append(
                client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
            )
        )
        queued.start()
        while engine.waiting < 1 and time.monotonic() < deadline:  # the second one waits in the queue
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError, match="queue is full") as error:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert error.value.status_code == 503
        started = time.monotonic()
        stream.close()  # the reader goes away: its 1500 tokens are not decoded
        queued.join(timeout=60)
        assert not queued.is_alive() and time.monotonic() - started < 20
        assert (
            replies and replies[0].choices[0].message.content is not None
        )  # the queued request was answered
        assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices
    finally:
        server.close()


def test_cli_defaults_and_refusals():
    from mllm.cli import build_parser
    from mllm.serve.config import ServeConfig

    args = build_parser().parse_args(["serve", "some/model"])
    assert (args.host, args.port, args.func.__name__, args.api_key) == ("127.0.0.1", 8000, "run_serve", None)
    with pytest.raises(ValueError, match="--max-batch-size"):
        ServeConfig(model_name="m", max_batch_size=0)
    with pytest.raises(ValueError, match="--allowed-local-media-path"):
        ServeConfig(model_name="m", allowed_local_media_path="/no/such/folder")


def test_port_in_use_is_a_clear_error():
    import socket

    from mllm.serve.app import bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)


def test_image_budget_caps_each_image_and_the_request():
    from mllm.serve.images import ImageBudget
    from mllm.serve.schemas import APIError

    budget = ImageBudget(max_pixels=1000, max_image_pixels=600)
    budget.take((20, 30), "a")  # 600: at the per-image cap
    with pytest.raises(APIError, match="max-image-pixels") as error:
        budget.take((25, 25), "b")  # 625 > 600 on its own
    assert error.value.status == 413
    with pytest.raises(APIError, match="max-request-pixels"):
        budget.take((20, 25), "c")  # 500 fits the image cap, but 600 + 500 > 1000
