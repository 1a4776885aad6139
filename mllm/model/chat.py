"""`chat`: messages (+ images) -> processor -> `MLLMModel.generate` -> text. Also the decoding presets.

The presets are the exercise's `chat()` defaults: sampling = top_p 0.8, top_k 100, temperature 0.7,
repetition_penalty 1.05; otherwise beam search with 3 beams and repetition_penalty 1.2. `greedy` is plain argmax
decoding (what the parity fixtures use).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

STRATEGIES = ("greedy", "sampling", "beam")


def decoding_kwargs(strategy: str, **overrides: Any) -> dict[str, Any]:
    """transformers generation kwargs for a strategy; `overrides` with value None are ignored."""
    # Every preset sets the same keys, so that a preset applied over another (chat()'s default, then the
    # caller's choice) leaves nothing of the first behind.
    presets = {
        "greedy": {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0},
        "sampling": {
            "do_sample": True,
            "num_beams": 1,
            "top_p": 0.8,
            "top_k": 100,
            "temperature": 0.7,
            "repetition_penalty": 1.05,
        },
        "beam": {"do_sample": False, "num_beams": 3, "repetition_penalty": 1.2},
    }
    if strategy not in presets:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    kwargs = dict(presets[strategy])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def model_max_length(model) -> int | None:
    """The longest prompt the model's positions cover (its config's max_position_embeddings): the limit that the
    web page, `mllm chat` and `mllm answer` check prompts against."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(
        getattr(config, "llm_config", None), "max_position_embeddings", None
    )


def _with_image(
    msgs: list[dict[str, Any]], image: Image.Image | list[Image.Image] | None
) -> list[dict[str, Any]]:
    """Put `image` (one or several) in front of the first user message's content, as MiniCPM-V's chat() does."""
    if image is None:
        return msgs
    images = image if isinstance(image, list) else [image]
    msgs = [dict(m) for m in msgs]
    first = next((m for m in msgs if m.get("role") == "user"), None)
    if first is None:
        raise ValueError("msgs: an image was given but there is no user message to attach it to")
    content = first["content"] if isinstance(first["content"], list) else [first["content"]]
    first["content"] = [*images, *content]
    return msgs


def chat(
    model,
    image,
    msgs,
    tokenizer,
    processor,
    sampling: bool = False,
    max_new_tokens: int = 1024,
    stream: bool = False,
    max_slice_nums: int | None = None,
    max_length: int | None = None,
    **generation_kwargs: Any,
):
    """Answer one conversation (`msgs` a list of messages) or a batch (`msgs` a list of conversations).

    `image` is None, a PIL image or a list of images for one conversation, or one such entry per conversation for a
    batch; images may also be given inside the messages' content lists. Returns a string, a list of strings for a
    batch, or with `stream` a generator of text pieces (one conversation only). Decoding defaults follow the
    exercise (`sampling` chooses between its two presets); keyword arguments override them.
    """
    batched = bool(msgs) and isinstance(msgs[0], list)
    if stream and batched:  # before anything starts: a generation thread must not be left running
        raise ValueError("stream=True answers one conversation at a time (msgs: one list of messages)")
    conversations = msgs if batched else [msgs]
    images = image if batched else [image]
    if images is None:
        images = [None] * len(conversations)
    if len(images) != len(conversations):
        raise ValueError(
            f"image: expected one entry per conversation ({len(conversations)}), got {len(images)}"
        )
    conversations = [_with_image(c, i) for c, i in zip(conversations, images)]
    batch = processor.chat_batch(conversations, max_slice_nums=max_slice_nums, max_length=max_length)
    kwargs = decoding_kwargs("sampling" if sampling else "beam", max_new_tokens=max_new_tokens)
    kwargs.update(generation_kwargs)
    result = model.generate(batch, tokenizer=tokenizer, stream=stream, decode_text=not stream, **kwargs)
    return result if stream or batched else result[0]
