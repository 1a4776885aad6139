"""Prompt building, placeholder expansion and batching: parity with part (b) of minicpmv26_tiny and unit checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mllm.processing.processor import IMAGE_MARKER, MLLMProcessor


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return MLLMProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    return json.loads((tiny_model_dir / "expected" / "expected.json").read_text())


@pytest.fixture(scope="module")
def batch_tensors(tiny_model_dir):
    return load_file(str(tiny_model_dir / "expected" / "processor_batch.safetensors"))


@pytest.fixture(scope="module")
def images(tiny_model_dir):
    loaded = {}
    for name in ("1000x300", "448x448", "90x60", "1344x896"):
        image = Image.open(tiny_model_dir / "images" / f"img_{name}.png")
        image.load()
        loaded[name] = image
    return loaded


@pytest.fixture(scope="module")
def fixture_msgs(images):
    return [
        [{"role": "user", "content": [images["1000x300"], "Describe the image."]}],
        [{"role": "user", "content": [images["448x448"], "What is this?"]}],
    ]


@pytest.fixture(scope="module")
def fixture_batch(processor, fixture_msgs):
    return processor.chat_batch(fixture_msgs, max_length=8192)


def test_special_token_ids(processor, expected):
    ids = expected["tokenizer"]["special_token_ids"]
    sp = processor.special_ids
    assert (sp.unk, sp.im_start, sp.im_end, sp.slice_start, sp.slice_end) == (
        ids["<unk>"],
        ids["<image>"],
        ids["</image>"],
        ids["<slice>"],
        ids["</slice>"],
    )
    assert (sp.im_id_start, sp.im_id_end, sp.chat_start) == (
        ids["<image_id>"],
        ids["</image_id>"],
        ids["<|im_start|>"],
    )
    assert sp.terminators == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert processor.pad_token_id == ids["<|endoftext|>"]


def test_chat_template_and_expanded_prompts(processor, fixture_msgs, images, expected):
    batch = expected["batch"]
    for b, msgs in enumerate(fixture_msgs):
        prompt, prompt_images = processor.prepare_chat_inputs(msgs)
        assert prompt == batch["chat_template_prompts"][b]
        assert len(prompt_images) == 1 and prompt_images[0] is msgs[0]["content"][0]
        encoded = processor.encode(prompt, prompt_images)
        assert encoded["expanded_text"] == batch["expanded_prompts"][b]
        assert encoded["input_ids"].tolist() == batch["input_ids"][b][-batch["unpadded_lengths"][b] :]
        assert encoded["image_sizes"] == [tuple(s) for s in batch["image_sizes"][b]]
    # The stored message form (marker already in the string) gives the same prompt.
    assert processor.prepare_chat_inputs(batch["messages"][0])[0] == batch["chat_template_prompts"][0]


def test_batch_matches_fixture(fixture_batch, batch_tensors, expected):
    out = fixture_batch
    ref_mask = batch_tensors["batch.attention_mask"].bool()
    assert out["input_ids"].shape == (2, 291) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].dtype == torch.long and out["position_ids"].dtype == torch.long
    # Same real lengths, hence the same pad counts (198 for sample 1), and the same ids where valid.
    assert torch.equal(out["attention_mask"].bool(), ref_mask)
    assert out["attention_mask"].sum(1).tolist() == expected["batch"]["unpadded_lengths"]
    assert torch.equal(out["input_ids"][ref_mask], batch_tensors["batch.input_ids"][ref_mask])
    assert (out["input_ids"][1, :198] == 983).all()  # the tokenizer's pad id, <|endoftext|>
    assert torch.equal(out["position_ids"][ref_mask], batch_tensors["batch.position_ids"][ref_mask])
    assert torch.equal(out["position_ids"], batch_tensors["batch.position_ids"])  # padded positions are 1
    for b in range(2):
        assert out["image_bound"][b].dtype == torch.long
        assert torch.equal(out["image_bound"][b], batch_tensors[f"batch.image_bound.{b}"])
        assert out["tgt_sizes"][b].dtype == torch.int32
        assert torch.equal(out["tgt_sizes"][b], batch_tensors[f"batch.tgt_sizes.{b}"])
    assert [len(pv) for pv in out["pixel_values"]] == expected["batch"]["num_slices_per_sample"]
    assert out["image_sizes"] == [[(1000, 300)], [(448, 448)]]


def test_batch_pixels_match_image_fixture(fixture_batch, tiny_model_dir):
    """The strips in the batch are the stored bit-exact slices of (a)."""
    stored = load_file(str(tiny_model_dir / "expected" / "image_processing.safetensors"))
    for j, strip in enumerate(fixture_batch["pixel_values"][0]):
        ref = stored[f"imgproc.img_1000x300.s9.slice{j}.pixel_u8"].to(torch.float32)
        assert torch.equal(strip, (ref / 255 - 0.5) / 0.5)
    ref = stored["imgproc.img_448x448.s9.slice0.pixel_u8"].to(torch.float32)
    assert torch.equal(fixture_batch["pixel_values"][1][0], (ref / 255 - 0.5) / 0.5)


def test_text_only_prompt_matches_fixture(processor, expected):
    text = expected["text_only"]
    out = processor.chat_batch([text["messages"]])
    assert processor.prepare_chat_inputs(text["messages"])[0] == text["prompt"]
    assert out["input_ids"][0].tolist() == text["input_ids"]
    assert out["attention_mask"].all() and out["position_ids"][0].tolist() == list(range(32))
    assert out["pixel_values"] == [[]]
    assert out["tgt_sizes"][0].shape == (0, 2) and out["image_bound"][0].shape == (0, 2)


def test_several_turns_and_images(processor, images):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [images["90x60"], images["1344x896"], "Compare them."]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": ["And this one?", images["448x448"]]},
    ]
    before = [dict(m) for m in msgs]
    prompt, prompt_images = processor.prepare_chat_inputs(msgs)
    assert msgs == before  # the caller's messages are not modified
    assert [im.size for im in prompt_images] == [(90, 60), (1344, 896), (448, 448)]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert f"<|im_start|>user\n{IMAGE_MARKER}\n{IMAGE_MARKER}\nCompare them.<|im_end|>\n" in prompt
    assert f"<|im_start|>user\nAnd this one?\n{IMAGE_MARKER}<|im_end|>\n<|im_start|>assistant\n" in prompt
    encoded = processor.encode(prompt, prompt_images)
    text = encoded["expanded_text"]
    # Image ids count within the sample, in order.
    assert (
        text.index("<image_id>0</image_id>")
        < text.index("<image_id>1</image_id>")
        < text.index("<image_id>2</image_id>")
    )
    assert encoded["tgt_sizes"].tolist() == [[26, 39], [26, 39]] + [[32, 32]] * 6 + [[32, 32]]
    assert len(encoded["pixel_values"]) == 9
    ids, bound = encoded["input_ids"], encoded["image_bound"]
    sp = processor.special_ids
    assert bound.shape == (9, 2) and ((bound[:, 1] - bound[:, 0]) == 64).all()
    for start, end in bound.tolist():
        assert ids[start - 1].item() in (sp.im_start, sp.slice_start)
        assert ids[end].item() in (sp.im_end, sp.slice_end)
        assert (ids[start:end] == sp.unk).all()
    assert (ids == sp.unk).sum().item() == 9 * 64


def test_image_tags_in_an_earlier_answer_do_not_break_the_next_turn(processor, images):
    """An undertrained model can generate `<image>` or `</slice>`; fed back as history they would open bogus image
    ranges. They are dropped from assistant turns (and only there: the caller's messages are not modified)."""
    msgs = [
        {"role": "user", "content": [images["90x60"], "What is this?"]},
        {"role": "assistant", "content": "A <image>red</slice> square (<image>./</image>)."},
        {"role": "user", "content": "Are you sure?"},
    ]
    before = [dict(m) for m in msgs]
    prompt, prompt_images = processor.prepare_chat_inputs(msgs)
    assert msgs == before
    assert "<|im_start|>assistant\nA red square (./).<|im_end|>" in prompt
    encoded = processor.encode(prompt, prompt_images)
    assert len(encoded["image_bound"]) == len(encoded["tgt_sizes"])  # only the real image's ranges
    user_tag = processor.prepare_chat_inputs([{"role": "user", "content": "a literal <image> tag"}])[0]
    with pytest.raises(ValueError, match="unbalanced image tags"):
        processor.encode(user_tag, [])


def test_left_padding_and_exclamation_not_masked(processor, images):
    short = processor.prepare_chat_inputs([{"role": "user", "content": "Hi!"}])[0]
    long = processor.prepare_chat_inputs(
        [{"role": "user", "content": [images["448x448"], "Wow! What is it?"]}]
    )[0]
    out = processor([short, long], [[], [images["448x448"]]])
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = [len(processor.tokenizer.encode(short)), out["input_ids"].shape[1]]
    assert mask.sum(1).tolist() == lengths
    pad = lengths[1] - lengths[0]
    assert (mask[0, :pad] == 0).all() and (mask[0, pad:] == 1).all()
    bang = (ids == 0) & (torch.arange(ids.shape[1]) >= torch.tensor([[pad], [0]]))
    assert bang[0].sum() == 1 and bang[1].sum() == 1  # "!" is id 0 ...
    assert (mask[bang] == 1).all()  # ... and stays unmasked
    assert out["position_ids"][0, :pad].eq(1).all()
    assert out["position_ids"][0, pad:].tolist() == list(range(lengths[0]))
    assert out["position_ids"][1].tolist() == list(range(lengths[1]))
    assert out["image_bound"][0].shape == (0, 2)
    # A single sample gives the same ids and bound as in the batch, shifted by its pad.
    alone = processor([long], [[images["448x448"]]])
    assert torch.equal(alone["input_ids"][0], ids[1]) and torch.equal(
        alone["image_bound"][0], out["image_bound"][1]
    )


def test_max_length(processor, images):
    prompt, prompt_images = processor.prepare_chat_inputs(
        [{"role": "user", "content": [images["448x448"], "Hi"]}]
    )
    n = len(processor.encode(prompt, prompt_images)["input_ids"])
    assert processor([prompt], [prompt_images], max_length=n)["input_ids"].shape == (1, n)
    with pytest.raises(ValueError, match=r"sample 1: .* more than max_length=" + str(n - 1)):
        processor(["short", prompt], [[], prompt_images], max_length=n - 1)


def test_bad_input(processor, images):
    with pytest.raises(
        ValueError, match=r"msgs\[0\]\.content\[1\]: expected a str or a PIL image, got Tensor"
    ):
        processor.prepare_chat_inputs([{"role": "user", "content": ["look", torch.zeros(3, 4, 4)]}])
    with pytest.raises(ValueError, match=r"msgs\[1\]\.role.*'robot'"):
        processor.prepare_chat_inputs([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match=r"msgs_batch\[1\]"):
        processor.chat_batch([[{"role": "user", "content": "a"}], [{"role": "tool", "content": "b"}]])
    with pytest.raises(ValueError, match="non-empty"):
        processor.prepare_chat_inputs([])
    with pytest.raises(ValueError, match=r"sample 0, image 0.*PIL"):
        processor([IMAGE_MARKER + "x"], [["not an image"]])
    with pytest.raises(ValueError, match="1 image markers .* 2 images"):
        processor([IMAGE_MARKER + "x"], [[images["90x60"], images["90x60"]]])
    with pytest.raises(ValueError, match="0 image markers .* 1 images"):
        processor(["no marker"], [[images["90x60"]]])
    with pytest.raises(ValueError, match="one list of images per prompt"):
        processor(["a", "b"], [[]])
    with pytest.raises(ValueError, match="sample 0: unbalanced image tags"):
        processor(["a literal <slice> tag"])
    with pytest.raises(ValueError, match="unbalanced"):
        processor.image_bound_from_ids(torch.tensor([986, 982, 997, 987, 987]))


def test_missing_special_token(tmp_path, tiny_model_dir):
    """A tokenizer without <slice> (renamed here to <slyce>) is refused with a message naming token and dir."""
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        text = (tiny_model_dir / name).read_text()
        (tmp_path / name).write_text(text.replace('"<slice>"', '"<slyce>"'))
    shutil.copy(tiny_model_dir / "preprocessor_config.json", tmp_path / "preprocessor_config.json")
    with pytest.raises(ValueError, match=rf"'<slice>'.*{tmp_path}"):
        MLLMProcessor.from_pretrained(tmp_path)
