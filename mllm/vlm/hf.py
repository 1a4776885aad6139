"""`VLM` over transformers' own image-text-to-text models: LLaVA-1.5, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, BLIP-2
and InstructBLIP (decoder-only language models; the Flan-T5 variants of the BLIP families are refused).

Prompts come from the processor's chat template (`apply_chat_template` on messages whose content is
`{"type": "image"}` / `{"type": "text"}` parts); BLIP-2 and InstructBLIP ship none, so they get the prompt formats of
their papers (`FALLBACK_TEMPLATES`). The processor call (image-token expansion, pixels, padding) and `generate` are
transformers' own; see `mllm.vlm.processors` for the families whose processor needs an image-only variant here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm.vlm.chat_labels import align_labels, assistant_pieces
from mllm.vlm.interface import VLM, Conversation, VLMBatch
from mllm.vlm.processors import IMAGE_ONLY_PROCESSORS

FALLBACK_TEMPLATES = {
    # BLIP-2's VQA prompt (Li et al. 2023, "Question: {} Answer:"); the answer follows after a space.
    "blip-2": (
        "{% for m in messages %}{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% if m['role'] == 'user' %}{{ 'Question: ' + c['text'] + ' Answer:' }}{% else %}{{ ' ' + c['text'] }}"
        "{% endif %}{% endfor %}{% endfor %}"
    ),
    # InstructBLIP reads the instruction as it is (Dai et al. 2023); the answer follows after a space.
    "instructblip": (
        "{% for m in messages %}{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% if m['role'] == 'user' %}{{ c['text'] }}{% else %}{{ ' ' + c['text'] }}{% endif %}"
        "{% endfor %}{% endfor %}"
    ),
}
"""Prompt formats for the families without a chat template (system messages are refused for them)."""

BOX_FORMATS = {
    "llava": "llava",
    "llava_onevision": "llava",
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen25vl",
    "blip-2": "shikra",
    "instructblip": "shikra",
}
"""The box syntax each family writes (see `mllm.boxes`)."""

PARAMETER_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "llava": {
        "vision": ("model.vision_tower.",),
        "projector": ("model.multi_modal_projector.",),
        "llm": ("model.language_model.", "lm_head."),
    },
    "llava_onevision": {
        "vision": ("model.vision_tower.",),
        "projector": ("model.multi_modal_projector.", "model.image_newline"),
        "llm": ("model.language_model.", "lm_head."),
    },
    "qwen2_vl": {
        "vision": ("model.visual.",),
        "projector": ("model.visual.merger.",),
        "llm": ("model.language_model.", "lm_head."),
    },
    "blip-2": {
        "vision": ("vision_model.",),
        "projector": ("query_tokens", "qformer.", "language_projection."),
        "llm": ("language_model.",),
    },
}
"""Parameter-name prefixes of the vision tower, the projector and the LLM; the longest matching prefix wins (so
Qwen2-VL's merger, inside `model.visual`, is the projector)."""
PARAMETER_GROUPS["qwen2_5_vl"] = PARAMETER_GROUPS["qwen2_vl"]
PARAMETER_GROUPS["instructblip"] = PARAMETER_GROUPS["blip-2"]

HF_FAMILIES = tuple(BOX_FORMATS)  # = mllm.vlm.HF_TYPES
BLIP_FAMILIES = ("blip-2", "instructblip")


def load_hf_family(model_dir: str | Path, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model in eval mode on `device`, processor) of a transformers checkpoint directory of a supported family; what
    `mllm.load` returns for such a directory."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    family = config.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(
            f"{model_dir}: model_type {family!r} is not one of the supported families {HF_FAMILIES}"
        )
    if family in BLIP_FAMILIES and config.get("text_config", {}).get("is_encoder_decoder"):
        raise ValueError(
            f"{model_dir}: a {family} model with an encoder-decoder language model (Flan-T5) is not "
            "supported: its labels and log-probs live on the decoder side"
        )
    processor_cls = IMAGE_ONLY_PROCESSORS.get(family, AutoProcessor)
    processor = processor_cls.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).to(device)
    return model.eval(), processor


def hf_messages(conversation: Conversation, where: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Our messages -> transformers' content parts ({"type": "image"} / {"type": "text", "text": ...}) and the images
    in order of appearance."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    messages, images = [], []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise ValueError(f"{where}, message {i}: expected a dict with role user, assistant or system")
        content = message.get("content")
        items = [content] if isinstance(content, (str, Image.Image)) else content
        if not isinstance(items, list):
            raise ValueError(
                f"{where}, message {i}: content must be a string or a list of strings and images"
            )
        parts = []
        for j, item in enumerate(items):
            if isinstance(item, Image.Image):
                images.append(item.convert("RGB"))
                parts.append({"type": "image"})
            elif isinstance(item, str):
                parts.append({"type": "text", "text": item})
            else:
                raise ValueError(f"{where}, message {i}, content {j}: expected a str or a PIL image")
        messages.append({"role": message["role"], "content": parts})
    return messages, images


def answer_text(message: dict[str, Any]) -> str:
    """The text of an assistant message (its text parts joined, as the templates render them)."""
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


class HFVLM(VLM):
    """A transformers image-text-to-text model and its processor."""

    def __init__(self, model, processor, family: str) -> None:
        if family not in HF_FAMILIES:
            raise ValueError(f"model_type {family!r} is not one of the supported families {HF_FAMILIES}")
        self.model = model
        self.processor = processor
        self.family = family
        self.box_format = BOX_FORMATS[family]
        self.tokenizer = processor.tokenizer
        self.template = processor.chat_template or FALLBACK_TEMPLATES.get(family)
        if self.template is None:
            raise ValueError(f"the {family} processor has no chat template")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(str(processor.image_token))
        self.terminators = self._terminators()
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.terminators[0]
        )
        with_specials = self.tokenizer("x")["input_ids"]
        self.n_leading_specials = len(with_specials) - len(
            self.tokenizer("x", add_special_tokens=False)["input_ids"]
        )

    def _terminators(self) -> list[int]:
        """The generation config's eos ids, then the tokenizer's eos."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ValueError(
                f"the {self.family} model names no eos token (generation_config.json, tokenizer)"
            )
        return ids

    # -- prompts ----------------------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The chat template's text of transformers-format messages."""
        if self.family in BLIP_FAMILIES and any(m["role"] == "system" for m in messages):
            raise ValueError(
                f"{self.family} has no chat template and no system prompt; remove the system message"
            )
        return self.processor.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _images(self, per_sample: list[list[Image.Image]]) -> list[Image.Image] | None:
        if self.family in BLIP_FAMILIES:
            for b, images in enumerate(per_sample):
                if len(images) != 1:
                    raise ValueError(
                        f"conversation {b}: {self.family} takes exactly one image, got {len(images)}"
                    )
        flat = [image for images in per_sample for image in images]
        return flat or None

    def prepare(self, conversations: list[Conversation], with_labels: bool = False) -> VLMBatch:
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("conversations: expected a non-empty list of conversations")
        converted = [hf_messages(c, f"conversation {b}") for b, c in enumerate(conversations)]
        images = self._images([imgs for _, imgs in converted])
        if not with_labels:
            texts = [self.render(messages, True) for messages, _ in converted]
            return VLMBatch(self._process(texts, images, "left", texts))
        pieces = [
            assistant_pieces(
                self.render,
                messages,
                answer_text,
                self.tokenizer.convert_ids_to_tokens(self.terminators),
                self.tokenizer.eos_token,
                f"conversation {b}",
            )
            for b, (messages, _) in enumerate(converted)
        ]
        texts = ["".join(text for text, _ in p) for p in pieces]
        # InstructBLIP's Q-Former reads the instruction only (the prompt before the last answer), never the answer.
        prompts = ["".join(text for text, _ in p[:-1]) for p in pieces]
        inputs = self._process(texts, images, "right", prompts)
        labels = []
        for b, (row, mask) in enumerate(zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())):
            piece_ids = [
                (self.tokenizer(t, add_special_tokens=False)["input_ids"], tgt) for t, tgt in pieces[b]
            ]
            where = f"conversation {b}"
            labels.append(
                align_labels(row, mask, piece_ids, self.image_token_id, self.n_leading_specials, where)
            )
        return VLMBatch(inputs, torch.tensor(labels, dtype=torch.long, device=self.device))

    def _process(
        self, texts: list[str], images: list[Image.Image] | None, side: str, qformer_texts: list[str]
    ) -> dict[str, Any]:
        """transformers' processor on the batch, padded on `side`, moved to the model (pixels in its dtype)."""
        inputs = dict(
            self.processor(text=texts, images=images, padding=True, padding_side=side, return_tensors="pt")
        )
        if "qformer_input_ids" in inputs:
            qformer = self.processor.qformer_tokenizer(qformer_texts, padding=True, return_tensors="pt")
            inputs["qformer_input_ids"] = qformer["input_ids"]
            inputs["qformer_attention_mask"] = qformer["attention_mask"]
        dtype = self.model.dtype
        return {
            k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }

    # -- forward, generation ----------------------------------------------------------------------------------------

    def logits(self, batch: VLMBatch) -> torch.Tensor:
        return self.model(**batch.inputs, use_cache=False).logits  # [B, T, V]

    @torch.inference_mode()
    def generate_tokens(self, batch: VLMBatch, **generation_kwargs: Any) -> torch.Tensor:
        kwargs = {"eos_token_id": self.terminators, "pad_token_id": self.pad_id, **generation_kwargs}
        sequences = self.model.generate(**batch.inputs, **kwargs)  # [B, T + new]
        return sequences[:, batch.inputs["input_ids"].shape[1] :]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        stops = set(self.terminators)
        texts = []
        for row in tokens.tolist():
            cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=False).strip())
        return texts

    # -- training plumbing ------------------------------------------------------------------------------------------

    def stop_ids(self) -> set[int]:
        return {*self.terminators, self.pad_id}

    def parameter_groups(self) -> dict[str, tuple[str, ...]]:
        return PARAMETER_GROUPS[self.family]

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(str(out_dir))
        self.processor.save_pretrained(str(out_dir))
