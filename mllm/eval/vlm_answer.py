"""Answer functions over any model family (`mllm.vlm.VLM`), in the shape `generate_answers` and the decoding
comparison take: a batch of `QuestionItem`s -> (answers, number of new tokens)."""

from __future__ import annotations

from typing import Any

from mllm.eval.answer import QuestionItem, item_conversation
from mllm.vlm import VLM, VLMBatch


def vlm_answer_fn(vlm: VLM, generation_kwargs: dict[str, Any]):
    """A batch of items -> answers from one `generate` call of `vlm` with `generation_kwargs` (one of our decoding
    presets, `mllm.model.chat.decoding_kwargs`). Carries `prepare` (the processor work, which `generate_answers`
    runs for the next batch in a thread while this one generates)."""

    def prepare(batch: list[QuestionItem]) -> VLMBatch:
        return vlm.prepare([item_conversation(item) for item in batch])

    def answer(batch: list[QuestionItem], inputs: VLMBatch | None = None) -> tuple[list[str], int]:
        tokens = vlm.generate_tokens(inputs if inputs is not None else prepare(batch), **generation_kwargs)
        return vlm.decode(tokens), vlm.count_generated(tokens)

    answer.prepare = prepare
    return answer
