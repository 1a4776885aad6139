"""`MLLMModel` on the tiny MiniCPM-V 2.6-layout checkpoint reproduces the reference outputs stored beside it."""

from __future__ import annotations

import pytest
import torch
from helpers.fixture_data import batch_data, expected

from mllm.model.modeling import MLLMModel
from mllm.model.vision import navit_position_ids, pad_strips

TOL = 1e-4  # the fixture README's float32 tolerance for vpm, resampler and logits


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return MLLMModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    return batch_data(tiny_model_dir)


@pytest.fixture(scope="module")
def vision(tiny_model_dir):
    return expected(tiny_model_dir, "vision_tower")


def set_attn(model: MLLMModel, attn: str) -> None:
    model.config._attn_implementation = attn


def test_loads_every_weight_and_drops_the_last_vision_layer(model):
    assert len(model.vpm.encoder.layers) == 2  # num_hidden_layers 3, drop_vision_last_layer
    assert sum(p.numel() for p in model.parameters()) == 2_475_328
    assert not any(p.is_meta for p in model.parameters())
    assert model.resampler.pos_embed.shape == (70, 70, 256)


def test_position_ids_bucketed_onto_the_70x70_table(vision):
    ids = navit_position_ids(vision["vision.tgt_sizes"], vision["vision.position_ids"].shape[1], 70)
    assert torch.equal(ids, vision["vision.position_ids"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vision_tower(model, data, vision, attn):
    pixels = pad_strips([s for sample in data["pixel_values"] for s in sample])
    mask = vision["vision.patch_attention_mask"]
    with torch.no_grad():
        hidden = model.vpm(pixels, mask, vision["vision.tgt_sizes"], attn)
    valid = mask[:, 0]
    assert hidden.shape == vision["vision.last_hidden_state"].shape
    assert (hidden - vision["vision.last_hidden_state"])[valid].abs().max().item() <= TOL


def test_resampler_from_stored_vision_states(model, vision, tiny_model_dir):
    stored = expected(tiny_model_dir, "resampler")
    with torch.no_grad():
        rows = model.resampler(vision["vision.last_hidden_state"], vision["vision.tgt_sizes"])
    assert (rows[:4] - stored["resampler.sample0"]).abs().max().item() <= TOL
    assert (rows[4:] - stored["resampler.sample1"]).abs().max().item() <= TOL


@pytest.mark.parametrize("chunk", [16, 2])
def test_vision_hidden_states_end_to_end(model, data, tiny_model_dir, chunk):
    """Pixels -> vpm (in chunks of vision_batch_size slices) -> resampler, split per sample."""
    stored = expected(tiny_model_dir, "resampler")
    model.config.vision_batch_size = chunk
    try:
        with torch.no_grad():
            states = model.get_vision_hidden_states(data)
    finally:
        model.config.vision_batch_size = 16
    assert [tuple(s.shape) for s in states] == [(4, 64, 256), (1, 64, 256)]
    assert (states[0] - stored["resampler.sample0"]).abs().max().item() <= TOL
    assert (states[1] - stored["resampler.sample1"]).abs().max().item() <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_fused_embeddings_and_logits(model, data, tiny_model_dir, attn):
    stored = expected(tiny_model_dir, "forward")
    set_attn(model, attn)
    try:
        with torch.no_grad():
            embeds, _ = model.get_vllm_embedding(data)
            logits = model(data, attention_mask=data["attention_mask"]).logits
    finally:
        set_attn(model, "sdpa")
    valid = data["attention_mask"].bool()
    assert (embeds - stored["forward.inputs_embeds"])[valid].abs().max().item() <= TOL
    assert torch.isfinite(logits).all()
    assert (logits - stored["forward.logits"])[valid].abs().max().item() <= TOL


def test_image_rows_replace_exactly_the_bound_ranges(model, data):
    """Outside image_bound the fused input is the token embedding (image_id, <image>, <slice> included)."""
    with torch.no_grad():
        embeds, states = model.get_vllm_embedding(data)
        tokens = model.get_input_embeddings()(data["input_ids"])
    inside = torch.zeros(data["input_ids"].shape, dtype=torch.bool)
    for b, bounds in enumerate(data["image_bound"]):
        for start, end in bounds.tolist():
            inside[b, start:end] = True
    assert torch.equal(embeds[~inside], tokens[~inside])
    assert torch.equal(embeds[0, 84:148], states[0][1])  # second range of sample 0 = its first grid slice


def test_position_ids_default_from_the_mask(model, data):
    without = {k: v for k, v in data.items() if k != "position_ids"}
    with torch.no_grad():
        a = model(data).logits
        b = model(without).logits
    valid = data["attention_mask"].bool()
    assert torch.equal(a[valid], b[valid])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_text_only(model, tiny_model_dir, attn):
    stored = expected(tiny_model_dir, "text_only")
    set_attn(model, attn)
    try:
        with torch.no_grad():
            logits = model.llm(input_ids=stored["text.input_ids"]).logits
    finally:
        set_attn(model, "sdpa")
    assert (logits - stored["text.logits"]).abs().max().item() <= TOL


def test_bound_and_image_count_mismatch_is_a_clear_error(model, data):
    broken = dict(data, image_bound=[data["image_bound"][0][:3], data["image_bound"][1]])
    with pytest.raises(ValueError, match="image_bound covers"):
        model.get_vllm_embedding(broken)


def test_training_batch_without_images_still_touches_vision(tiny_model_dir):
    model = MLLMModel.from_pretrained(tiny_model_dir)
    model.train()
    ids = torch.tensor([[984, 362, 198, 40, 41, 985]])
    data = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "image_bound": [torch.zeros(0, 2)],
        "pixel_values": [[]],
        "tgt_sizes": [None],
    }
    loss = model(data, labels=ids).loss
    loss.backward()
    vision_params = list(model.vpm.parameters()) + list(model.resampler.parameters())
    assert all(p.grad is not None for p in vision_params)
    assert all(float(p.grad.abs().max()) == 0.0 for p in vision_params)
    assert model.llm.lm_head.weight.grad.abs().max() > 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, data):
    grads = []
    for checkpointing in (False, True):
        model = MLLMModel.from_pretrained(tiny_model_dir)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.llm.model.gradient_checkpointing and model.vpm.encoder.gradient_checkpointing
        labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
        model(data, labels=labels).loss.backward()
        grads.append(
            [
                model.vpm.embeddings.patch_embedding.weight.grad,
                model.llm.model.layers[0].mlp.up_proj.weight.grad,
            ]
        )
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, atol=1e-6)
