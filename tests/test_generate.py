"""`MLLMModel.generate` on the fixture: the reference's greedy tokens, alone and in a left-padded batch."""

from __future__ import annotations

import pytest
import torch
from helpers.fixture_data import batch_data, expected, single_sample
from helpers.fixture_data import generate_on as run
from transformers import AutoTokenizer, TextIteratorStreamer

from mllm.model.modeling import MLLMModel

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return MLLMModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    return batch_data(tiny_model_dir)


def test_terminators_resolved_by_token_name(model, tokenizer):
    assert model.terminator_ids(tokenizer) == [985, 983]


@pytest.mark.parametrize("index", [0, 1])
def test_greedy_tokens_and_step_logits_for_each_sample_alone(model, data, tokenizer, tiny_model_dir, index):
    stored = expected(tiny_model_dir, "generate")
    out = run(
        model,
        single_sample(data, index),
        tokenizer,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences[0], stored[f"generate.sample{index}.tokens"])
    step_logits = torch.stack(out.logits)[:, 0]  # [12, V]
    assert (step_logits - stored[f"generate.sample{index}.step_logits"]).abs().max().item() <= 1e-4


def test_left_padded_batch_gives_the_same_tokens(model, data, tokenizer, tiny_model_dir):
    stored = expected(tiny_model_dir, "generate")
    tokens = run(model, data, tokenizer, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert tokens.shape == (2, NEW_TOKENS)
    assert torch.equal(tokens[0], stored["generate.sample0.tokens"])
    assert torch.equal(tokens[1], stored["generate.sample1.tokens"])


def test_decode_text_matches_the_reference(model, data, tokenizer):
    texts = run(model, data, tokenizer, max_new_tokens=NEW_TOKENS, do_sample=False, decode_text=True)
    assert texts == ["sterstersterstersterstpor", "phone\ufffd otherooBe\ufffd otheroogherAfter then"]


def test_decode_text_drops_bos_terminator_and_padding(model, tokenizer):
    rows = torch.tensor([[984, 285, 260, 985, 983, 983], [285, 0, 260, 983, 0, 0]])
    assert model._decode_text(rows, tokenizer) == ["ster", tokenizer.decode([285, 0, 260]).strip()]


def test_precomputed_vision_states_give_the_same_tokens(model, data, tokenizer):
    with torch.no_grad():
        states = model.get_vision_hidden_states(data)
    a = run(model, data, tokenizer, max_new_tokens=4, do_sample=False)
    b = run(model, data, tokenizer, max_new_tokens=4, do_sample=False, vision_hidden_states=states)
    assert torch.equal(a, b)


def test_beam_sampling_and_length_controls_pass_through(model, data, tokenizer):
    beams = run(
        model, data, tokenizer, max_new_tokens=5, num_beams=3, repetition_penalty=1.2, length_penalty=1.0
    )
    assert beams.shape[0] == 2 and beams.shape[1] <= 5
    torch.manual_seed(0)
    sampled = run(
        model,
        data,
        tokenizer,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=True,
        top_p=0.8,
        top_k=100,
        temperature=0.7,
        repetition_penalty=1.05,
    )
    assert sampled.shape == (2, 6)
    assert not torch.isin(sampled, torch.tensor([985, 983])).any()  # min_new_tokens blocks terminators


def test_stream_yields_the_greedy_text(model, data, tokenizer):
    one = single_sample(data, 1)
    streamer = run(model, one, tokenizer, max_new_tokens=NEW_TOKENS, do_sample=False, stream=True)
    assert isinstance(streamer, TextIteratorStreamer)
    streamed = "".join(streamer)
    text = run(model, one, tokenizer, max_new_tokens=NEW_TOKENS, do_sample=False, decode_text=True)[0]
    assert streamed.strip() == text


def test_stream_needs_a_single_prompt(model, data, tokenizer):
    with pytest.raises(ValueError, match="batch of one"):
        run(model, data, tokenizer, max_new_tokens=2, stream=True)


def test_text_only_prompt(model, tokenizer):
    ids = torch.tensor([[984, 362, 198, 40, 41, 985, 198, 984, 440, 198]])
    tokens = model.generate(ids, tokenizer=tokenizer, max_new_tokens=3, do_sample=False)
    expected_next = model.llm(input_ids=ids).logits[0, -1].argmax()
    assert tokens[0, 0] == expected_next
