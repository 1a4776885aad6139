"""The Gradio page of `mllm web`: images + multi-turn chat with streamed answers, a decoding panel, a clear
button and a grounding picture. All inference is `mllm.web.session.stream_answer` (the CLI's `chat`).

Per-session state lives in a `gr.State` (`ChatSession`); the only shared object is the lock that lets one
answer use the model at a time (built with the page, not at import). The answer event runs concurrently so that
a second request from a session whose answer is still streaming gets a message instead of waiting in the queue;
requests of other sessions wait for the lock.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.api import load
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS
from mllm.model.chat import decoding_kwargs, model_max_length
from mllm.model.modeling import MLLMModel
from mllm.web.grounding import draw_boxes, find_boxes
from mllm.web.session import ChatSession, Decoding, check_images, open_images, stream_answer, user_turn

logger = logging.getLogger(__name__)

BUSY_MESSAGE = "An answer is still streaming: wait until it is finished, then ask again."
TITLE = "mllm chat"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ModelHandle:
    """What the page needs to answer: model, processor (which owns the slicing settings), prompt limit and the
    model lock."""

    model: Any
    processor: Any
    max_length: int | None
    lock: threading.Lock
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Uploads over this many pixels (and decompression bombs) are refused from their headers."""


def error_text(message: str) -> str:
    return f"**Error:** {message}"


def _file_paths(files: Any) -> list[str]:
    """gr.File (multiple) values -> paths; gradio may give strings, dicts or file objects."""
    if not files:
        return []
    items = files if isinstance(files, list) else [files]
    paths = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        paths.append(str(getattr(item, "name", item)))
    return paths


def _user_display(question: str, paths: list[str]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"path": path} for path in paths]
    content.append({"type": "text", "text": question.strip()})
    return [{"role": "user", "content": content}]


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _grounding_picture(session: ChatSession, answer: str, enabled: bool):
    """The last image with the answer's boxes drawn (None when grounding is off or there is nothing to draw)."""
    if not enabled or not session.images:
        return None
    boxes = find_boxes(answer)
    return draw_boxes(session.images[-1], boxes) if boxes else None


def respond(handle: ModelHandle, session: ChatSession, files, question, decoding: Decoding, grounding: bool):
    """One question: yields (chat display, status text, grounding picture, inputs consumed?) as the answer
    grows. A display of None leaves the chat as it is; the picture is None until the last step, which always
    sets it (None there clears an earlier picture). Consumed inputs (question, files) are emptied.

    Raises nothing for bad input: a ValueError becomes the status text and the session is left unchanged.
    """
    if session.busy:
        yield None, BUSY_MESSAGE, None, False
        return
    try:
        paths = _file_paths(files)
        user_turn(question, paths)  # the question is there
        check_images(paths, handle.max_image_pixels)  # headers only: sizes and bombs, before any decoding
        settings = decoding.kwargs()
    except ValueError as exc:  # inputs stay as they are, to be corrected
        yield session.display, error_text(str(exc)), None, False
        return
    session.busy = True
    epoch = session.epoch
    try:
        yield from _answer(handle, session, paths, question, decoding, grounding, settings)
    finally:
        if session.epoch == epoch:  # after a Clear, `busy` belongs to the new conversation
            session.busy = False


def _answer(handle, session, paths, question, decoding, grounding, settings):
    """Decode the images and stream one answer under the model lock (so that one upload at a time is in memory),
    then add the turn to the session. An answer whose session was cleared meanwhile stops at its next piece and is
    dropped."""
    epoch = session.epoch
    shown = [*session.display, *_user_display(question, paths)]
    label = "beam search: the answer comes in one piece" if not decoding.streams else "streaming"
    with handle.lock:
        if session.epoch != epoch:
            return
        try:
            images = open_images(paths, handle.max_image_pixels)
            messages = [*session.messages, user_turn(question, images)]
            texts = stream_answer(handle.model, handle.processor, messages, decoding, handle.max_length)
        except ValueError as exc:  # an image cannot be decoded, the prompt is too long or malformed
            hint = " Clear starts a new conversation." if session.messages else ""
            yield session.display, error_text(f"{str(exc).rstrip('.')}.{hint}"), None, False
            return
        note = f"Answering ({label}, {settings['max_new_tokens']} new tokens at most)…"
        answer = ""
        try:
            yield [*shown, _assistant(answer)], note, None, True
            for answer in texts:
                if session.epoch != epoch:
                    return
                yield [*shown, _assistant(answer)], note, None, True
        except (ValueError, RuntimeError) as exc:  # generation itself failed (e.g. out of memory)
            logger.warning("generation failed", exc_info=True)
            yield session.display, error_text(str(exc)), None, False
            return
        finally:
            getattr(texts, "close", lambda: None)()  # an abandoned answer stops generating
    if session.epoch != epoch:
        return
    session.messages = [*messages, {"role": "assistant", "content": answer}]
    session.display = [*shown, _assistant(answer)]
    session.images.extend(images)
    yield session.display, *_finished(session, answer, grounding), True


def _finished(session: ChatSession, answer: str, grounding: bool):
    """The status line and grounding picture once an answer is complete."""
    picture = _grounding_picture(session, answer, grounding)
    if picture is not None:
        return f"Done: {len(find_boxes(answer))} box(es) drawn.", picture
    if not grounding:
        return "Done.", None
    return ("Done (no box in the answer)." if session.images else "Done (no image to draw boxes on)."), None


def build_app(handle: ModelHandle, title: str = TITLE):
    """The page (a `gr.Blocks`); importing gradio here keeps `import mllm.web.app` cheap."""
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        session = gr.State(ChatSession())
        gr.Markdown(f"## {title}\nUpload image(s), ask a question; answers stream as they are generated.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", elem_id="images")
                boxes = gr.Image(label="Grounding: boxes in the answer", type="pil", interactive=False)
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=420, render_markdown=False, elem_id="chatbot")
                question = gr.Textbox(
                    label="Question", placeholder="Ask about the image(s)…", elem_id="question"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown("Ready.", elem_id="status")
        panel = _decoding_panel(gr)

        def on_question(state, file_value, text, *knobs):
            grounding = knobs[-1]
            decoding = Decoding(*knobs[:-1])
            steps = respond(handle, state, file_value, text, decoding, grounding)
            for shown, note, picture, consumed in steps:
                yield _outputs(gr, shown, note, picture, consumed, final=note.startswith("Done"))

        inputs = [session, files, question, *panel]
        # The session is changed in place and never output: a late step of an answer cannot undo a Clear.
        outputs = [chatbot, status, boxes, question, files]
        common = {"concurrency_limit": None, "trigger_mode": "multiple", "show_progress": "minimal"}
        events = [
            send.click(on_question, inputs, outputs, api_name="ask", **common),
            question.submit(
                on_question, inputs, outputs, api_name="ask_enter", api_visibility="private", **common
            ),
        ]
        clear.click(
            _cleared, session, [chatbot, status, boxes, question, files], cancels=events, api_name="clear"
        )
    return app


def _outputs(gr, shown, note, picture, consumed, final: bool):
    """Map one step of `respond` to the page's outputs; parts left alone are gr.skip()."""
    skip = gr.skip()
    return (
        skip if shown is None else shown,
        note,
        picture if final else skip,
        "" if consumed else skip,
        None if consumed else skip,
    )


def _cleared(session: ChatSession):
    """A fresh conversation: empty chat, no images, no picture; an answer still streaming stops (through the
    session's epoch; the browser also cancels it, an API client cannot)."""
    session.clear()
    return [], "Cleared.", None, "", None


def _decoding_panel(gr) -> list:
    """The decoding controls, in `Decoding`'s field order, then the grounding checkbox."""
    preset = Decoding()
    with gr.Accordion("Decoding", open=True):
        with gr.Row():
            strategy = gr.Radio(["greedy", "sampling", "beam"], value=preset.strategy, label="Strategy")
            max_new = gr.Slider(
                1, 2048, value=preset.max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens"
            )
            repetition = gr.Slider(
                0.5, 2.0, value=preset.repetition_penalty, step=0.01, label="Repetition penalty"
            )
        with gr.Row():
            temperature = gr.Slider(
                0.05, 2.0, value=preset.temperature, step=0.05, label="Temperature (sampling)"
            )
            top_p = gr.Slider(0.05, 1.0, value=preset.top_p, step=0.01, label="Top-p (sampling)")
            top_k = gr.Slider(1, 500, value=preset.top_k, step=1, label="Top-k (sampling)")
            beams = gr.Slider(1, 8, value=preset.num_beams, step=1, label="Beams (beam search)")
        grounding = gr.Checkbox(
            value=True, label="Grounding mode: draw the boxes of an answer on the last image"
        )
    strategy.change(_preset_penalty, strategy, repetition, api_visibility="private")
    return [strategy, temperature, top_p, top_k, beams, repetition, max_new, grounding]


def _preset_penalty(strategy: str) -> float:
    """Switching strategy loads that strategy's repetition penalty preset (1.0 for greedy)."""
    return decoding_kwargs(strategy).get("repetition_penalty", 1.0)


def quiet_gradio_env() -> None:
    """Gradio's telemetry calls read this variable (not only the Blocks flag): off, unless the user set it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def launch(app, host: str, port: int, block: bool = True):
    """Serve `app` on host:port, never through a share link. Without `block` it returns at once with the running
    app (its `local_url` set; `close()` stops it)."""
    app.queue().launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        show_error=False,
        quiet=True,
        prevent_thread_lock=not block,
        max_file_size="50mb",
    )
    return app


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    max_length: int | None = None,
    max_slice_nums: int | None = None,
    block: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
):
    """Load the model directory (`mllm.load`, `max_slice_nums` overriding the processor's slicing) and serve the
    page (the body of `mllm web`)."""
    quiet_gradio_env()
    model, processor = load(model_dir, device, dtype, attn_implementation, max_slice_nums=max_slice_nums)
    if not isinstance(model, MLLMModel):
        raise ValueError(f"{model_dir}: mllm web runs MiniCPM-V models (model_type mllm or minicpmv) only")
    handle = ModelHandle(
        model, processor, max_length or model_max_length(model), threading.Lock(), max_image_pixels
    )
    logger.info("serving %s on http://%s:%d", model_dir, host, port)
    if host not in LOOPBACK_HOSTS:
        logger.warning("--host %s: the page is reachable from other machines and has no login", host)
    app = build_app(handle, title=f"{TITLE}: {Path(model_dir).name}")
    try:
        return launch(app, host, port, block)
    except OSError as exc:  # port taken, address not on this machine
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from exc
