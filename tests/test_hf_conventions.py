"""The one batch type and transformers' conventions: the processor's `MLLMInputs` goes into `forward` and `generate`
positionally or unpacked (with the same result as the reference's keyword call), the processor accepts the
reference's call, transformers' Auto classes load a model directory, the model generates with a GenerationConfig
saved beside it, and `chat(stream=True)` on a batch is refused before a generation thread starts."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from mllm.model.inputs import MLLMInputs
from mllm.model.modeling import MiniCPMV, MLLMModel
from mllm.processing.processor import IMAGE_MARKER, MLLMProcessor

GREEDY = {"max_new_tokens": 4, "do_sample": False}
PRE = "preprocessor_config.json"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return MLLMModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return MLLMProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def image(tiny_model_dir):
    return Image.open(tiny_model_dir / "images" / "img_448x448.png").convert("RGB")


def prompt(processor, text: str = "What is this?") -> str:
    return processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_MARKER}\n{text}"}], tokenize=False, add_generation_prompt=True
    )


def test_one_batch_type_in_forward_and_generate(model, processor, image):
    inputs = processor(prompt(processor), [image], return_tensors="pt")
    assert isinstance(inputs, MLLMInputs) and inputs.input_ids.shape == inputs["attention_mask"].shape
    tokenizer = processor.tokenizer
    reference = model.generate(  # the reference's keyword call, fields unpacked by hand
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        tgt_sizes=inputs["tgt_sizes"],
        image_bound=inputs["image_bound"],
        attention_mask=inputs["attention_mask"],
        tokenizer=tokenizer,
        **GREEDY,
    )
    assert torch.equal(model.generate(inputs, tokenizer=tokenizer, **GREEDY), reference)
    assert torch.equal(model.generate(**inputs, tokenizer=tokenizer, **GREEDY), reference)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, model(**inputs).logits)


def test_processor_accepts_the_reference_call(processor, image):
    text = prompt(processor)
    two = prompt(processor, f"{IMAGE_MARKER}\nAnd this?")
    flat = processor(two, [image, image.copy()], return_tensors="pt")  # one prompt, a flat list of its images
    nested = processor([two], [[image, image.copy()]])
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert len(flat["pixel_values"][0]) == 2 * len(processor(text, image)["pixel_values"][0])
    single = processor(text, image, return_tensors=None)["input_ids"]
    assert torch.equal(single, processor(text, [image]).input_ids)
    one_slice = processor(text, image, max_slice_nums=1)  # the call's override beats the processor's setting
    assert len(one_slice["tgt_sizes"][0]) <= 2
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text, image, return_tensors="np")
    with pytest.raises(ValueError, match="unknown arguments"):
        processor(text, image, padding_side="left")


def test_processor_owns_its_slicing(tiny_model_dir, image):
    default = MLLMProcessor.from_pretrained(tiny_model_dir)
    small = MLLMProcessor.from_pretrained(tiny_model_dir, max_slice_nums=1)
    assert (default.max_slice_nums, small.max_slice_nums) == (9, 1)
    wide = image.resize((1344, 448))
    assert len(small(prompt(small), wide)["tgt_sizes"][0]) < len(
        default(prompt(default), wide)["tgt_sizes"][0]
    )


def test_auto_classes_load_a_model_directory(tiny_model_dir, model, processor, image, tmp_path):
    auto = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(auto, MLLMModel) and isinstance(AutoModel.from_pretrained(tiny_model_dir), MLLMModel)
    assert isinstance(AutoProcessor.from_pretrained(tiny_model_dir), MLLMProcessor)
    assert auto.can_generate() and isinstance(auto.generation_config, GenerationConfig)
    inputs = processor(prompt(processor), image)
    expected = model.generate(inputs, tokenizer=processor.tokenizer, **GREEDY)
    assert torch.equal(auto.generate(inputs, tokenizer=processor.tokenizer, **GREEDY), expected)
    # the official layout's spellings (model_type "minicpmv", processor_class "MiniCPMVProcessor") resolve to the
    # same implementation without remote code
    official = tmp_path / "official"
    shutil.copytree(tiny_model_dir, official, ignore=shutil.ignore_patterns("expected", "images"))
    for name, key, value in (
        ("config.json", "model_type", "minicpmv"),
        (PRE, "processor_class", "MiniCPMVProcessor"),
    ):
        data = json.loads((official / name).read_text())
        (official / name).write_text(json.dumps({**data, key: value}))
    assert type(AutoModel.from_pretrained(official)) is MiniCPMV
    assert type(AutoProcessor.from_pretrained(official)).__name__ == "MiniCPMVProcessor"


def test_generation_config_is_saved_and_used(model, processor, image, tmp_path):
    inputs = processor(prompt(processor), image)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    GenerationConfig(max_new_tokens=2, do_sample=False).save_pretrained(tmp_path)
    reloaded = MLLMModel.from_pretrained(tmp_path)
    assert reloaded.generation_config.max_new_tokens == 2
    tokens = reloaded.generate(inputs, tokenizer=processor.tokenizer)  # the config's defaults decide
    assert tokens.shape[1] <= 2
    assert reloaded.generate(inputs, tokenizer=processor.tokenizer, max_new_tokens=3).shape[1] <= 3


def test_streaming_a_batch_is_refused_before_any_thread_starts(model, processor):
    threads = threading.active_count()
    conversation = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="one conversation at a time"):
        model.chat(None, [conversation], processor.tokenizer, processor, stream=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="batch of one"):
        model.generate(processor.chat_batch([conversation] * 2), tokenizer=processor.tokenizer, stream=True)
    assert threading.active_count() == threads
