"""The model-family interface (`mllm.vlm`) on tiny random models of each transformers family, built in code, and
on our MiniCPM-V fixture checkpoint.

Each family is checked against transformers' own path on the same inputs: the prompt built by the processor's
`apply_chat_template(..., tokenize=True)` (BLIP-2 / InstructBLIP: the processor on the literal prompt), one
conversation at a time, unpadded. Our interface builds batches of several conversations (left-padded for
generation, right-padded for training) from our chat format.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.vlm_tiny import FAMILIES, build_tiny
from PIL import Image

from mllm.api import load_vlm
from mllm.model.chat import decoding_kwargs
from mllm.train.losses import IGNORE_INDEX, preference_loss
from mllm.vlm import model_family
from mllm.vlm.hf import BLIP_FAMILIES
from mllm.vlm.minicpmv import MiniCPMVVLM
from mllm.vlm.processors import IMAGE_ONLY_PROCESSORS

QUESTIONS = ("What is in the image?", "Is there a dog? Describe the picture.")
ANSWERS = ("Yes", "There is a cat and a green box.")
TARGET_FORMAT = {
    "minicpmv": "{}<|im_end|>",
    "llava": " {}</s>",
    "llava_onevision": "{}<|im_end|>",
    "qwen2_vl": "{}<|im_end|>",
    "qwen2_5_vl": "{}<|im_end|>",
    "blip-2": " {}</s>",
    "instructblip": " {}</s>",
}
"""What each family must learn to write for an answer: the answer as its template renders it, then the token
that ends its turn (LLaVA-1.5's template writes none: its eos, as LLaVA was trained)."""


def _images() -> list[Image.Image]:
    red = Image.new("RGB", (64, 48), (200, 10, 10))
    green = Image.new("RGB", (40, 56), (10, 200, 10))
    green.paste((250, 250, 0), (5, 5, 30, 20))
    return [red, green]


@pytest.fixture(scope="module", params=("minicpmv", *FAMILIES))
def vlm(request, tmp_path_factory):
    if request.param == "minicpmv":  # ours: the fixture checkpoint, with small images kept small
        model_dir = request.getfixturevalue("small_model_dir")
    else:
        model_dir = build_tiny(request.param, tmp_path_factory.mktemp(request.param.replace("-", "_")))
    return load_vlm(model_dir, device="cpu")


def _conversation(image, question, answer=None) -> list[dict]:
    conversation = [{"role": "user", "content": [image, question]}]
    if answer is not None:
        conversation.append({"role": "assistant", "content": answer})
    return conversation


def _family(vlm) -> str:
    return "minicpmv" if isinstance(vlm, MiniCPMVVLM) else vlm.family


def reference_inputs(vlm, image, question) -> dict:
    """transformers' own inputs for one question about one image (unpadded); ours: our processor's."""
    if isinstance(vlm, MiniCPMVVLM):
        return vlm.processor.chat_batch([_conversation(image, question)])
    if vlm.family in BLIP_FAMILIES:
        prompt = f"Question: {question} Answer:" if vlm.family == "blip-2" else question
        return dict(vlm.processor(images=image, text=prompt, return_tensors="pt"))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]
    return dict(
        vlm.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    )


def _reference_generate(vlm, inputs: dict, kwargs: dict) -> list[int]:
    """The new tokens of the model's own `generate` on one unpadded prompt."""
    with torch.inference_mode():
        if isinstance(vlm, MiniCPMVVLM):
            keys = ("input_ids", "pixel_values", "tgt_sizes", "image_bound", "attention_mask")
            tokens = vlm.model.generate(**{k: inputs[k] for k in keys}, tokenizer=vlm.tokenizer, **kwargs)
            return [t for t in tokens[0].tolist() if t != vlm.processor.pad_token_id]
        return vlm.model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_generation_equals_transformers_generate(vlm, strategy) -> None:
    images = _images()
    kwargs = decoding_kwargs(strategy, max_new_tokens=6)
    batch = vlm.prepare([_conversation(i, q) for i, q in zip(images, QUESTIONS)])
    assert bool((batch.inputs["attention_mask"][0] == 0).any())  # the shorter prompt is padded (on the left)
    ours = vlm.generate_tokens(batch, **kwargs)
    for b, (image, question) in enumerate(zip(images, QUESTIONS)):
        reference = _reference_generate(vlm, reference_inputs(vlm, image, question), kwargs)
        row = ours[b].tolist()
        assert row[: len(reference)] == reference
        assert all(tok in vlm.stop_ids() for tok in row[len(reference) :])
    assert ours[0].tolist() != ours[1].tolist()  # the two images lead to different answers
    assert vlm.decode(ours) == vlm.answer([_conversation(i, q) for i, q in zip(images, QUESTIONS)], **kwargs)


def test_labels_cover_exactly_the_assistant_tokens(vlm) -> None:
    images = _images()
    batch = vlm.prepare(
        [_conversation(i, q, a) for i, q, a in zip(images, QUESTIONS, ANSWERS)], with_labels=True
    )
    ids, labels, mask = batch.inputs["input_ids"], batch.labels, batch.inputs["attention_mask"]
    assert mask[:, -1].tolist().count(0) == 1  # right padding
    for b, (image, question, answer) in enumerate(zip(images, QUESTIONS, ANSWERS)):
        target = vlm.tokenizer(TARGET_FORMAT[_family(vlm)].format(answer), add_special_tokens=False)[
            "input_ids"
        ]
        positions = (labels[b] != IGNORE_INDEX).nonzero().view(-1).tolist()
        start, end = positions[0], positions[-1] + 1
        assert positions == list(range(start, end))  # one run, at the end (ours keeps ChatML's last newline)
        assert vlm.tokenizer.decode(ids[b, end : int(mask[b].sum())]).strip() == ""
        assert labels[b, start:end].tolist() == target == ids[b, start:end].tolist()
        # the context before the answer is exactly the prompt transformers builds for generation
        prompt = reference_inputs(vlm, image, question)
        assert ids[b, :start].tolist() == prompt["input_ids"][0].tolist()
        if _family(vlm) == "instructblip":  # the Q-Former reads the instruction, never the answer
            qformer = batch.inputs["qformer_input_ids"][b][batch.inputs["qformer_attention_mask"][b] == 1]
            assert qformer.tolist() == prompt["qformer_input_ids"][0].tolist()


def test_multi_turn_labels_where_the_template_allows_them(vlm) -> None:
    image = _images()[0]
    conversation = [
        *_conversation(image, QUESTIONS[0], ANSWERS[0]),
        {"role": "user", "content": QUESTIONS[1]},
        {"role": "assistant", "content": ANSWERS[1]},
    ]
    if _family(vlm) in ("llava", "llava_onevision", *BLIP_FAMILIES):
        # their templates render an earlier answer differently from what the model generates (no eos between
        # LLaVA-1.5's or the BLIP prompts' turns; "assistant \n" vs "assistant\n" in OneVision's): one
        # conversation per turn instead
        with pytest.raises(ValueError, match="own conversation"):
            vlm.prepare([conversation], with_labels=True)
        return
    batch = vlm.prepare([conversation], with_labels=True)
    labels = batch.labels[0]
    targets = [labels[i].item() for i in range(len(labels)) if labels[i] != IGNORE_INDEX]
    expected = "".join(TARGET_FORMAT[_family(vlm)].format(a) for a in ANSWERS)
    assert targets == vlm.tokenizer(expected, add_special_tokens=False)["input_ids"]


def _direct_logp(vlm, image, question, answer) -> float:
    """log p(answer tokens | prompt) from one unpadded forward of transformers' model on its own inputs."""
    inputs = reference_inputs(vlm, image, question)
    target = vlm.tokenizer(TARGET_FORMAT[_family(vlm)].format(answer), add_special_tokens=False)["input_ids"]
    n_prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, len(target), dtype=torch.long)], dim=1
        )
    with torch.no_grad():
        if isinstance(vlm, MiniCPMVVLM):
            inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0)
            logits = vlm.model(inputs).logits[0].double()  # [T, V]
        else:
            logits = vlm.model(**inputs).logits[0].double()  # [T, V]
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[n_prompt + i - 1, tok]) for i, tok in enumerate(target))


def test_response_logps_equal_a_direct_computation(vlm) -> None:
    images = _images()
    batch = vlm.prepare(
        [_conversation(i, q, a) for i, q, a in zip(images, QUESTIONS, ANSWERS)], with_labels=True
    )
    with torch.no_grad():
        _, sums, averages = vlm.response_logps(batch)
    for b, (image, question, answer) in enumerate(zip(images, QUESTIONS, ANSWERS)):
        direct = _direct_logp(vlm, image, question, answer)
        assert sums[b].item() == pytest.approx(direct, rel=1e-4, abs=1e-3)
        n_target = int((batch.labels[b] != IGNORE_INDEX).sum())
        assert averages[b].item() == pytest.approx(direct / n_target, rel=1e-4, abs=1e-3)


def test_parameter_groups_cover_every_parameter_and_freeze(vlm) -> None:
    groups = {name: vlm.group_of(name) for name, _ in vlm.model.named_parameters()}
    assert set(groups.values()) == {"vision", "projector", "llm"}
    vlm.freeze(vision=True, llm=True)
    try:
        trainable = {name for name, p in vlm.model.named_parameters() if p.requires_grad}
        assert trainable == {name for name, group in groups.items() if group == "projector"}
    finally:
        vlm.freeze()
    assert all(p.requires_grad for p in vlm.model.parameters())


def _train(vlm, loss_fn, lr: float, steps: int = 4) -> list[float]:
    """A few AdamW steps, dropout off (eval mode) so that the loss depends on the weights alone."""
    optimizer = torch.optim.AdamW([p for p in vlm.model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_sft_steps_lower_the_loss(vlm) -> None:
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    batch = vlm.prepare(
        [_conversation(i, q, a) for i, q, a in zip(_images(), QUESTIONS, ANSWERS)], with_labels=True
    )
    try:
        losses = _train(vlm, lambda: vlm.sft_loss(batch), lr=3e-4)
    finally:
        vlm.model.load_state_dict(state)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] * 0.9, losses


@pytest.mark.parametrize("loss_type", ["nca_pair", "dpo"])
def test_preference_steps_lower_the_loss(vlm, loss_type) -> None:
    images = _images()
    chosen = [_conversation(i, q, a) for i, q, a in zip(images, QUESTIONS, ANSWERS)]
    rejected = [_conversation(i, q, a) for i, q, a in zip(images, QUESTIONS, reversed(ANSWERS))]
    batch = vlm.prepare(chosen + rejected, with_labels=True)  # chosen rows, then rejected rows
    with torch.no_grad():
        reference = vlm.response_logps(batch)[1]  # [2B]

    def loss() -> torch.Tensor:
        sums = vlm.response_logps(batch)[1]
        losses, _, _ = preference_loss(sums[:2], sums[2:], reference[:2], reference[2:], 0.1, loss_type)
        return losses.mean()

    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    try:
        # the fixture checkpoint's weights are larger than the tiny models': a smaller step keeps Adam monotone
        losses = _train(vlm, loss, lr=3e-5 if isinstance(vlm, MiniCPMVVLM) else 1e-4)
    finally:
        vlm.model.load_state_dict(state)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses


def test_save_and_load_round_trip(vlm, tmp_path) -> None:
    vlm.save_pretrained(tmp_path)
    again = load_vlm(tmp_path, device="cpu")
    conversations = [_conversation(_images()[1], QUESTIONS[1])]
    assert again.family == vlm.family and again.box_format == vlm.box_format
    assert again.answer(conversations, max_new_tokens=4) == vlm.answer(conversations, max_new_tokens=4)


@pytest.mark.parametrize("family", sorted(IMAGE_ONLY_PROCESSORS))
def test_image_only_processor_equals_the_stock_processor(family, tmp_path, monkeypatch) -> None:
    """Our processor without a video processor gives exactly what transformers' own processor gives, built here
    with its (torchvision-needing) video processor check bypassed; and a directory saved by the stock class (its
    name in processor_config.json, a video_preprocessor_config.json beside it) loads with ours."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    model_dir = build_tiny(family, tmp_path)
    ours = IMAGE_ONLY_PROCESSORS[family].from_pretrained(model_dir)
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(
        ProcessorMixin,
        "check_argument_for_proper_class",
        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg),
    )
    stock_name = {
        "llava_onevision": "LlavaOnevisionProcessor",
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
    }[family]
    extra = (
        {"num_image_tokens": 16, "vision_feature_select_strategy": "full"}
        if family == "llava_onevision"
        else {}
    )
    stock = getattr(transformers, stock_name)(
        ours.image_processor, ours.tokenizer, None, chat_template=ours.chat_template, **extra
    )
    texts = [f"{t} {ours.image_token} {q}" for t, q in zip(("A", "B"), QUESTIONS)]
    args = dict(text=texts, images=_images(), padding=True, return_tensors="pt")
    expected, got = stock(**args), ours(**args)
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    config = json.loads((model_dir / "processor_config.json").read_text())
    (model_dir / "processor_config.json").write_text(json.dumps({**config, "processor_class": stock_name}))
    (model_dir / "video_preprocessor_config.json").write_text("{}")
    loaded = load_vlm(model_dir, device="cpu")
    assert type(loaded.processor) is IMAGE_ONLY_PROCESSORS[family]


def test_model_family_refuses_unknown_and_missing_configs(tmp_path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        model_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        load_vlm(tmp_path)
    t5 = {"model_type": "blip-2", "text_config": {"model_type": "t5", "is_encoder_decoder": True}}
    (tmp_path / "config.json").write_text(json.dumps(t5))
    with pytest.raises(ValueError, match="encoder-decoder language model"):
        load_vlm(tmp_path)


def test_assistant_target_and_alignment_by_hand() -> None:
    from mllm.vlm.chat_labels import align_labels, assistant_target

    # LLaVA-1.5: a space before the answer, no stop string after it: the eos ends the target
    full, context = "USER: <image>\nQ ASSISTANT: Yes ", "USER: <image>\nQ ASSISTANT:"
    assert assistant_target(full, context, "Yes", ["</s>"], "</s>", "x") == " Yes</s>"
    # OneVision: the turn says "assistant \n", the generation prompt "assistant\n": the answer and its stop string
    full, context = "<|im_start|>assistant \nYes<|im_end|>", "<|im_start|>assistant\n"
    assert assistant_target(full, context, "Yes", ["<|im_end|>"], "<|im_end|>", "x") == "Yes<|im_end|>"
    with pytest.raises(ValueError, match="verbatim"):
        assistant_target(full, context, "No", ["<|im_end|>"], "<|im_end|>", "x")
    # pad id = eos id (a tokenizer without a pad token): the eos target is still labelled, padding is not
    bos, image, eos = 1, 9, 2
    row, mask = [bos, image, image, 5, 6, 7, eos, eos, eos], [1, 1, 1, 1, 1, 1, 1, 0, 0]
    labels = align_labels(row, mask, [([image, 5, 6], False), ([7, eos], True)], image, 1, "x")
    assert labels == [IGNORE_INDEX] * 5 + [7, eos, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="cannot be located"):
        align_labels(row, mask, [([image, 5], False), ([6, 7, eos], True), ([4], False)], image, 1, "x")
