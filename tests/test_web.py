"""`mllm web`: the page served on a free local port with the fixture model, driven through gradio_client, and
its grounding pictures. Answers are compared with `chat` under the greedy preset (`mllm chat`'s answer)."""

from __future__ import annotations

import time

import pytest
from helpers.web import MAX_LENGTH, QUESTION, chat_greedy, fixture_image, start_server
from PIL import Image

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = start_server(tiny_model_dir)
    yield app
    app.close()


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    from mllm.api import load

    return load(tiny_model_dir, "cpu", "auto")


@pytest.fixture
def client(server):
    """A new client is a new browser session (its own conversation)."""
    from gradio_client import Client

    return Client(server.local_url, verbose=False, download_files=False)


def ask(
    client, question, files=(), strategy="greedy", max_new_tokens=NEW_TOKENS, num_beams=3, temperature=0.7
):
    """Start one question (the /ask endpoint: the page's Send button); returns the job."""
    from gradio_client import handle_file

    uploads = [handle_file(str(path)) for path in files]
    args = (uploads, question, strategy, temperature, 0.8, 100, num_beams, 1.0, max_new_tokens, True)
    return client.submit(*args, api_name="/ask")


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part.get("type") == "text")


def answers(job) -> list[str]:
    """The last assistant text of every update the job streamed, in order (repeats removed)."""
    seen: list[str] = []
    for chat, *_ in job.outputs():
        if isinstance(chat, list) and chat and chat[-1]["role"] == "assistant":
            text = text_of(chat[-1])
            if not seen or seen[-1] != text:
                seen.append(text)
    return seen


def test_streamed_answer_equals_chat_and_second_turn_keeps_history(
    client, model_and_processor, tiny_model_dir
):
    model, processor = model_and_processor
    image = Image.open(fixture_image(tiny_model_dir)).convert("RGB")
    job = ask(client, QUESTION, [fixture_image(tiny_model_dir)])
    chat, status, _, question_box, files_box = job.result()
    first = [{"role": "user", "content": [image, QUESTION]}]
    expected = chat_greedy(model, processor, first, NEW_TOKENS)
    assert expected, "the fixture model should say something for this prompt"
    assert text_of(chat[-1]) == expected
    streamed = answers(job)
    assert len(streamed) > 3, f"the answer came in {len(streamed)} updates, not token by token"
    assert all(expected.startswith(part.strip()) for part in streamed)
    assert status.startswith("Done")
    assert question_box == "" and not files_box  # the inputs are consumed
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert any(part.get("type") == "file" for part in chat[0]["content"])  # the image is shown in the chat

    follow_up = "And what colour is it?"
    chat2, status2, *_ = ask(client, follow_up).result()
    history = [*first, {"role": "assistant", "content": expected}, {"role": "user", "content": follow_up}]
    assert [m["role"] for m in chat2] == ["user", "assistant", "user", "assistant"]
    assert text_of(chat2[1]) == expected
    assert text_of(chat2[3]) == chat_greedy(model, processor, history, NEW_TOKENS)
    without_history = chat_greedy(model, processor, [{"role": "user", "content": follow_up}], NEW_TOKENS)
    assert text_of(chat2[3]) != without_history, "the second answer does not depend on the first turn"


def test_several_images_in_one_turn(client, model_and_processor, tiny_model_dir):
    model, processor = model_and_processor
    paths = [tiny_model_dir / "images" / "img_90x60.png", tiny_model_dir / "images" / "img_300x1000.png"]
    chat, status, *_ = ask(client, "Compare the two images.", paths, max_new_tokens=8).result()
    images = [Image.open(path).convert("RGB") for path in paths]
    msgs = [{"role": "user", "content": [*images, "Compare the two images."]}]
    assert status.startswith("Done")
    assert sum(part.get("type") == "file" for part in chat[0]["content"]) == 2
    assert text_of(chat[-1]) == chat_greedy(model, processor, msgs, 8)


def test_non_image_upload_gets_a_message_and_the_next_request_works(client, model_and_processor, tmp_path):
    model, processor = model_and_processor
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is text, not a picture")
    chat, status, *_ = ask(client, QUESTION, [bogus]).result()
    assert "notes.png is not an image" in status
    assert chat == []  # nothing was added to the conversation

    chat, status, *_ = ask(client, "Hello?").result()
    assert status.startswith("Done")
    expected = chat_greedy(model, processor, [{"role": "user", "content": "Hello?"}], NEW_TOKENS)
    assert text_of(chat[-1]) == expected


@pytest.mark.parametrize(
    ("question", "message"),
    [("   ", "Type a question"), ("word " * (2 * MAX_LENGTH), f"more than max_length={MAX_LENGTH}")],
    ids=["empty", "too-long"],
)
def test_bad_question_gets_a_message(client, question, message):
    chat, status, *_ = ask(client, question).result()
    assert status.startswith("**Error:**") and message in status
    assert chat == []
    chat, status, *_ = ask(client, "Hello?", max_new_tokens=2).result()  # still serving, same session
    assert status.startswith("Done") and len(chat) == 2


def test_out_of_range_setting_is_refused_and_the_server_keeps_serving(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="less than minimum"):
        ask(client, QUESTION, strategy="sampling", temperature=0.0).result()
    chat, status, *_ = ask(client, "Hello?", max_new_tokens=2).result()
    assert status.startswith("Done") and len(chat) == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "sampling", "temperature": 0.0}, "Temperature must be positive"),
        ({"strategy": "sampling", "top_p": 1.5}, "Top-p must be in"),
        ({"strategy": "beam", "num_beams": 0}, "beams must be at least 1"),
        ({"strategy": "nucleus"}, "Decoding strategy must be one of"),
        ({"max_new_tokens": 0}, "Max new tokens"),
    ],
)
def test_decoding_settings_are_checked(settings, message):
    from mllm.web.session import Decoding

    with pytest.raises(ValueError, match=message):
        Decoding(**settings).kwargs()


def test_decoding_settings_map_to_the_cli_presets():
    from mllm.model.chat import decoding_kwargs
    from mllm.web.session import Decoding

    assert Decoding(max_new_tokens=5).kwargs() == decoding_kwargs("greedy", max_new_tokens=5)
    sampling = Decoding("sampling", temperature=0.5, top_p=0.9, top_k=7, repetition_penalty=1.05).kwargs()
    assert sampling == {
        **decoding_kwargs("sampling"),
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 7,
        "max_new_tokens": 256,
    }
    beam = Decoding("beam", num_beams=4, repetition_penalty=1.3)
    assert beam.kwargs()["num_beams"] == 4 and beam.kwargs()["repetition_penalty"] == 1.3 and not beam.streams


def test_request_while_streaming_gets_a_message(client):
    from mllm.web.app import BUSY_MESSAGE

    long_job = ask(client, "Tell me a long story.", max_new_tokens=300)
    wait_for_first_piece(long_job)
    chat, status, *_ = ask(client, QUESTION).result()
    assert status == BUSY_MESSAGE
    chat, status, *_ = long_job.result()
    assert status.startswith("Done") and [m["role"] for m in chat] == ["user", "assistant"]


def wait_for_first_piece(job, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not answers(job) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.done(), "the long answer finished before the test could interrupt it"


def test_clear_stops_the_answer_and_starts_a_new_conversation(client):
    long_job = ask(client, "Tell me a long story.", max_new_tokens=2000)
    wait_for_first_piece(long_job)
    chat, status, picture, question_box, files_box = client.predict(api_name="/clear")
    assert (chat, status, question_box) == ([], "Cleared.", "")
    deadline = time.monotonic() + 30
    while not long_job.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert long_job.done(), "the cleared answer is still streaming"
    chat, status, *_ = ask(client, "Hello?", max_new_tokens=2).result()
    assert status.startswith("Done") and [m["role"] for m in chat] == ["user", "assistant"]


def test_closing_an_answer_stops_generation(model_and_processor):
    """An answer nobody reads (cleared page, closed tab) stops: its generation thread ends long before
    max_new_tokens (2000 tokens take minutes on the fixture)."""
    import threading

    from mllm.web.session import Decoding, stream_answer

    model, processor = model_and_processor
    before = set(threading.enumerate())
    texts = stream_answer(
        model, processor, [{"role": "user", "content": "Hi"}], Decoding(max_new_tokens=2000)
    )
    next(texts)
    # MLLMModel._stream's thread (its target is `run`, so Python names it "Thread-N (run)")
    generating = [t for t in set(threading.enumerate()) - before if t.name.endswith("(run)")]
    assert len(generating) == 1 and generating[0].is_alive()
    texts.close()
    generating[0].join(timeout=20)
    assert not generating[0].is_alive()


def test_beam_search_answers_in_one_piece(client, model_and_processor):
    from mllm.model.chat import chat as chat_fn
    from mllm.model.chat import decoding_kwargs

    model, processor = model_and_processor
    job = ask(client, "Hello?", strategy="beam", num_beams=2, max_new_tokens=8)
    chat, status, *_ = job.result()
    kwargs = decoding_kwargs("beam", max_new_tokens=8, num_beams=2)
    msgs = [{"role": "user", "content": "Hello?"}]
    expected = chat_fn(model, None, msgs, processor.tokenizer, processor, **kwargs)
    assert text_of(chat[-1]) == expected
    assert [a for a in answers(job) if a] == [expected]


def test_cli_listens_on_localhost_unless_told():
    from mllm.cli import build_parser

    args = build_parser().parse_args(["web", "some/model"])
    assert (args.host, args.port, args.func.__name__) == ("127.0.0.1", 7860, "run_web")
    assert build_parser().parse_args(["web", "m", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_port_in_use_is_a_clear_error(tiny_model_dir):
    import socket

    from mllm.web.app import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(tiny_model_dir, port=port, device="cpu", block=False)


def test_find_boxes_reads_every_syntax_with_labels():
    from mllm.web.grounding import find_boxes

    text = (
        "The <ref>cat</ref>[100, 200, 300, 400] sits by the red dog <box>(0,0),(999,999)</box> "
        "and a mouse [0.1,0.2,0.3,0.4]."
    )
    found = find_boxes(text)
    assert [label for label, _ in found] == ["cat", "by the red dog", "and a mouse"]
    assert found[0][1] == (100, 200, 300, 400)
    assert found[1][1] == pytest.approx((0, 0, 1000, 1000))
    assert found[2][1] == pytest.approx((100, 200, 300, 400))
    assert find_boxes("no boxes [1, 2] here") == []


def test_grounding_picture_draws_the_answer_boxes(monkeypatch, tmp_path):
    """The page's answer step with a stand-in model: a box in the answer becomes a picture with the box drawn."""
    import threading

    from mllm.web import app as web_app
    from mllm.web.session import ChatSession, Decoding

    path = tmp_path / "white.png"
    Image.new("RGB", (200, 100), "white").save(path)
    answer = "The <ref>square</ref>[250, 200, 750, 800]"
    monkeypatch.setattr(web_app, "stream_answer", lambda *args, **kwargs: iter(["The", answer]))
    handle = web_app.ModelHandle(None, None, None, threading.Lock())
    steps = list(web_app.respond(handle, ChatSession(), [str(path)], "Where?", Decoding(), True))
    shown, status, picture, _ = steps[-1]
    assert status == "Done: 1 box(es) drawn."
    assert text_of(shown[-1]) == answer
    assert picture.size == (200, 100)
    assert picture.getpixel((50, 50)) != (255, 255, 255)  # the left edge of the box (x = 0.25 * 200)
    assert picture.getpixel((100, 50)) == (255, 255, 255)  # inside the box: untouched
    _, status, picture, _ = list(
        web_app.respond(handle, ChatSession(), [str(path)], "Where?", Decoding(), False)
    )[-1]
    assert picture is None and status == "Done."
