"""Our Qwen2-family decoder against transformers' own Qwen2ForCausalLM and LlamaForCausalLM, same random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mllm.model.config import MLLMConfig
from mllm.model.llm import LLMForCausalLM
from mllm.model.presets import preset_fields

TINY = preset_fields("tiny-llm", max_position_embeddings=256)
TOL = 1e-5


def build_pair(family: str, attn: str, seed: int = 0) -> tuple[torch.nn.Module, LLMForCausalLM]:
    """transformers' model with random O(1)-scale weights, and ours loaded strictly from its state dict."""
    torch.manual_seed(seed)
    if family == "qwen2":
        ref = Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation=attn))
    else:
        ref = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=attn))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ours = LLMForCausalLM(MLLMConfig(**TINY, attention_bias=family == "qwen2", attn_implementation=attn))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def left_padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [3, 11] with 0, 4 and 7 pad tokens on the left, the mask and HF-style position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_transformers_with_left_padding(family, attn):
    ref, ours = build_pair(family, attn)
    assert (ours.model.layers[0].self_attn.q_proj.bias is not None) == (family == "qwen2")
    assert ours.config._attn_implementation == attn
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    assert torch.isfinite(got).all()
    assert (got - expected)[valid].abs().max().item() <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_does_not_change_a_row(attn):
    """A left-padded row gives the logits of the same tokens alone."""
    _, ours = build_pair("qwen2", attn)
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        batched = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        alone = ours(input_ids=ids[2:, 7:]).logits
    assert (batched[2, 7:] - alone[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_incremental_decoding_equals_full_forward(attn):
    _, ours = build_pair("qwen2", attn)
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        prefix = 8
        out = ours(
            input_ids=ids[:, :prefix],
            attention_mask=mask[:, :prefix],
            position_ids=pos[:, :prefix],
            use_cache=True,
        )
        steps = [out.logits]
        cache = out.cache
        assert cache.get_seq_length() == prefix
        for t in range(prefix, ids.shape[1]):
            out = ours(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=pos[:, t : t + 1],
                cache=cache,
                use_cache=True,
            )
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full)[mask.bool()].abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_generate_matches_transformers(family):
    ref, ours = build_pair(family, "sdpa", seed=1)
    ids, mask, _ = left_padded_batch()
    kwargs = dict(
        max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    expected = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    ref_logits, our_logits = torch.stack(expected.logits), torch.stack(got.logits)  # [steps, B, V]
    assert (ref_logits - our_logits).abs().max().item() <= TOL
    top2 = ref_logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min().item() > 1e-4, (
        "argmax too close to a tie for a token comparison"
    )
    assert torch.equal(got.sequences, expected.sequences)
    # From inputs_embeds (what MLLMModel does) generate returns only the new tokens, the same ones.
    embeds = ours.get_input_embeddings()(ids)
    new = ours.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(new, expected.sequences[:, ids.shape[1] :])


def test_beam_search_matches_transformers():
    ref, ours = build_pair("qwen2", "sdpa", seed=1)
    ids, mask, _ = left_padded_batch()
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    embeds = ours.get_input_embeddings()(ids)
    expected = ref.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    assert torch.equal(ours.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs), expected)


def static_compile_config():
    """transformers' compiled static-cache forward, captured by dynamo as one graph and run without a code generator
    (so it runs on CPU in seconds): a graph break or a recompile error fails the test."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    return config


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("beams", [1, 3])
def test_static_cache_generate_matches_transformers(attn, beams):
    """`generate(cache_implementation="static")` runs our decoder (transformers prepares the masks over all cache
    slots) and gives transformers' Qwen2 tokens, eager and with the forward compiled, left-padded, from embeddings
    (what MLLMModel passes) and from ids."""
    ref, ours = build_pair("qwen2", attn, seed=1)
    ids, mask, _ = left_padded_batch()
    embeds = ours.get_input_embeddings()(ids)
    kwargs = dict(max_new_tokens=6, num_beams=beams, do_sample=False, pad_token_id=0, repetition_penalty=1.2)
    expected = ref.generate(
        inputs_embeds=embeds, attention_mask=mask, cache_implementation="static", **kwargs
    )
    assert torch.equal(expected, ref.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs))
    got = ours.generate(inputs_embeds=embeds, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(got, expected)
    from_ids = ref.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    got = ours.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(got, from_ids)  # the penalty also counts the prompt's ids here
    compiled = ours.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        cache_implementation="static",
        compile_config=static_compile_config(),
        **kwargs,
    )
    # transformers compiles the forward of greedy/sampling only; its beam search runs the static cache eagerly
    assert (getattr(ours, "_compiled_call", None) is not None) == (beams == 1)
    assert torch.equal(compiled, expected)


def test_labels_give_shifted_cross_entropy():
    _, ours = build_pair("qwen2", "sdpa")
    ids, mask, pos = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, TINY["vocab_size"])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MLLMConfig(**{**TINY, "num_attention_heads": 4, "num_key_value_heads": 3})
