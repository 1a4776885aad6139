"""The static-cache path (`fast=True`) gives the plain path's tokens: greedy and beam search, alone and left-padded,
on the fixture checkpoint and on a tiny Qwen2-shaped decoder; sampling is seeded and stops per row."""

from __future__ import annotations

import pytest
import torch
from helpers.fixture_data import batch_data, expected, single_sample
from helpers.fixture_data import generate_on as run
from transformers import AutoTokenizer

from mllm.model.config import MLLMConfig
from mllm.model.fast_generate import FastGenerator
from mllm.model.llm import LLMForCausalLM
from mllm.model.modeling import MLLMModel
from mllm.model.presets import preset_fields

TINY = preset_fields("tiny-llm", max_position_embeddings=512, attention_bias=True)
PAD = 0


def identity(fn):
    return fn


def dynamo_only(fn):
    """torch.compile's graph capture without a code generator: proves the fixed-shape step traces as one graph."""
    return torch.compile(fn, backend="eager", dynamic=False, fullgraph=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return MLLMModel.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    return batch_data(tiny_model_dir)


def test_fixture_greedy_batch_gives_the_reference_tokens(model, data, tokenizer, tiny_model_dir):
    stored = expected(tiny_model_dir, "generate")
    tokens = run(model, data, tokenizer, max_new_tokens=12, do_sample=False, fast=True)
    assert torch.equal(tokens[0], stored["generate.sample0.tokens"])
    assert torch.equal(tokens[1], stored["generate.sample1.tokens"])
    assert torch.equal(tokens, run(model, data, tokenizer, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("index", [0, 1])
def test_fixture_beam_alone_equals_plain(model, data, tokenizer, index):
    one = single_sample(data, index)
    kwargs = dict(max_new_tokens=16, num_beams=3, repetition_penalty=1.2)
    assert torch.equal(run(model, one, tokenizer, fast=True, **kwargs), run(model, one, tokenizer, **kwargs))


def test_fixture_beam_batch_equals_plain_and_each_row_alone(model, data, tokenizer):
    kwargs = dict(max_new_tokens=16, num_beams=3)
    fast = run(model, data, tokenizer, fast=True, **kwargs)
    assert torch.equal(fast, run(model, data, tokenizer, **kwargs))
    # With a repetition penalty, transformers' own processor would skip the first n_pad new tokens of a padded row
    # (`penalty_over_new_tokens`); both paths count them all, so each row equals its prompt generated alone.
    penalised = run(model, data, tokenizer, fast=True, repetition_penalty=1.2, **kwargs)
    assert torch.equal(penalised, run(model, data, tokenizer, repetition_penalty=1.2, **kwargs))
    for index in (0, 1):
        alone = run(model, single_sample(data, index), tokenizer, repetition_penalty=1.2, **kwargs)
        assert torch.equal(penalised[index, : alone.shape[1]], alone[0])


def test_fixture_fixed_shape_step_under_dynamo_equals_plain(model, data, tokenizer):
    """The step CUDA compiles (all cache slots, additive mask), traced by dynamo as one graph, run on CPU."""
    model.__dict__["_fast_generator"] = FastGenerator(model.llm, compile=True, compile_fn=dynamo_only)
    try:
        for kwargs in (dict(max_new_tokens=8, do_sample=False), dict(max_new_tokens=8, num_beams=3)):
            fast = run(model, data, tokenizer, fast=True, **kwargs)
            assert model._fast_generator.step.compiled is not None  # no fallback happened
            assert torch.equal(fast, run(model, data, tokenizer, **kwargs))
    finally:
        model.__dict__.pop("_fast_generator")


@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(num_beams=3, repetition_penalty=1.2)])
def test_fixture_library_static_cache_equals_plain_and_fast(model, data, tokenizer, kwargs):
    """transformers' own static-cache engine (`mllm answer --static-cache`) on the images + left-padded batch: the
    plain path's tokens, and the fast path's."""
    static = run(model, data, tokenizer, max_new_tokens=12, cache_implementation="static", **kwargs)
    assert torch.equal(static, run(model, data, tokenizer, max_new_tokens=12, **kwargs))
    assert torch.equal(static, run(model, data, tokenizer, max_new_tokens=12, fast=True, **kwargs))


def test_fast_rejects_stream_and_unknown_options(model, data, tokenizer):
    one = single_sample(data, 1)
    with pytest.raises(ValueError, match="stream"):
        run(model, one, tokenizer, max_new_tokens=2, fast=True, stream=True)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        run(model, one, tokenizer, max_new_tokens=2, fast=True, no_repeat_ngram_size=3)


# -- the tiny Qwen2-shaped decoder, with terminators chosen so rows and beams end at different steps ---------------


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    model = LLMForCausalLM(MLLMConfig(**TINY, attn_implementation="sdpa"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)  # larger weights collapse every row onto one token at once
    return model.eval()


def prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [3, 11] left-padded by 0, 4 and 7 tokens, and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def mid_run_terminators(llm, embeds, mask) -> list[int]:
    """Tokens a plain greedy run emits mid-way in rows 0 and 1 (not at their start): as terminators they end rows
    at different steps, and beams at different lengths."""
    tokens = llm.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD
    )
    eos = [int(tokens[0, 3]), int(tokens[1, 1])]
    assert not set(eos) & {int(tokens[0, 0]), int(tokens[1, 0])}, tokens
    return eos


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False),
        dict(num_beams=3),
        dict(num_beams=3, length_penalty=0.5),
        dict(num_beams=2, early_stopping=True),
        dict(num_beams=3, early_stopping="never"),
    ],
    ids=["greedy", "beam3", "beam3-lp0.5", "beam2-early", "beam3-never"],
)
@pytest.mark.parametrize("compile_fn", [None, identity], ids=["eager-prefix", "fixed-shape"])
def test_qwen2_shaped_batch_and_rows_alone_equal_plain(llm, kwargs, compile_fn):
    ids, mask = prompts()
    embeds = llm.get_input_embeddings()(ids)
    eos = mid_run_terminators(llm, embeds, mask)
    common = dict(max_new_tokens=10, pad_token_id=PAD, eos_token_id=eos, **kwargs)
    gen = FastGenerator(llm, compile=compile_fn is not None, compile_fn=compile_fn)
    plain = llm.generate(inputs_embeds=embeds, attention_mask=mask, **common)
    fast = gen.generate(embeds, mask, **common)
    assert torch.equal(fast, plain)
    ends = [next((i for i, tok in enumerate(row) if tok in eos), None) for row in fast.tolist()]
    assert len({e for e in ends if e is not None}) >= 2 or fast.shape[1] < 10, (
        ends
    )  # rows end at different steps
    for row in range(3):
        real = mask[row].bool()
        alone = gen.generate(embeds[row : row + 1, real], mask[row : row + 1, real], **common)
        assert torch.equal(alone[0], fast[row, : alone.shape[1]])


def test_sampling_is_seeded_and_stops_per_row(llm):
    ids, mask = prompts()
    embeds = llm.get_input_embeddings()(ids)
    eos = mid_run_terminators(llm, embeds, mask)
    gen = FastGenerator(llm)
    kwargs = dict(
        max_new_tokens=12,
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.05,
        pad_token_id=PAD,
        eos_token_id=eos,
    )
    torch.manual_seed(3)
    first = gen.generate(embeds, mask, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(gen.generate(embeds, mask, **kwargs), first)
    stopped = 0
    for row in first.tolist():
        ends = [i for i, tok in enumerate(row) if tok in eos]
        if ends:
            stopped += 1
            assert all(tok == PAD for tok in row[ends[0] + 1 :])  # a finished row only pads
    assert stopped >= 1
    torch.manual_seed(3)
    long = gen.generate(embeds, mask, **{**kwargs, "min_new_tokens": 12})
    assert long.shape == (3, 12) and not torch.isin(long, torch.tensor(eos)).any()


def test_options_are_validated(llm):
    ids, mask = prompts()
    embeds = llm.get_input_embeddings()(ids)
    gen = FastGenerator(llm)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(embeds, mask, max_new_tokens=0, pad_token_id=PAD, eos_token_id=[1])
    with pytest.raises(ValueError, match="beam sampling"):
        gen.generate(embeds, mask, do_sample=True, num_beams=2, pad_token_id=PAD, eos_token_id=[1])
    flash = LLMForCausalLM(MLLMConfig(**TINY, attn_implementation="eager"))
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        FastGenerator(flash)


def test_decode_cache_is_kept_between_calls(llm):
    ids, mask = prompts()
    embeds = llm.get_input_embeddings()(ids)
    gen = FastGenerator(llm)
    gen.generate(embeds, mask, max_new_tokens=3, pad_token_id=PAD, eos_token_id=[1])
    kept = gen._cache.storage
    gen.generate(embeds[:, 2:], mask[:, 2:], max_new_tokens=3, pad_token_id=PAD, eos_token_id=[1])
    assert gen._cache.storage is kept  # same rows, fewer slots: no new allocation (no new CUDA graph)


def failing_step(error: Exception):
    """A `compile_fn` whose compiled step raises `error` (as a failing torch.compile would on its first call)."""

    def compile_fn(fn):
        def step(*args):
            raise error

        return step

    return compile_fn


def test_compiler_failure_falls_back_and_says_why(llm, caplog):
    from torch._dynamo.exc import BackendCompilerFailed

    ids, mask = prompts()
    embeds = llm.get_input_embeddings()(ids)
    common = dict(max_new_tokens=5, pad_token_id=PAD, eos_token_id=[1])
    failure = BackendCompilerFailed(identity, RuntimeError("no C compiler"), None)
    gen = FastGenerator(llm, compile=True, compile_fn=failing_step(failure))
    with caplog.at_level("WARNING", logger="mllm.model.fast_generate"):
        tokens = gen.generate(embeds, mask, **common)
    assert torch.equal(tokens, FastGenerator(llm).generate(embeds, mask, **common))
    assert gen.step.compiled is None and "BackendCompilerFailed" in gen.step.compile_error
    assert "no C compiler" in caplog.text and "decoding eagerly" in caplog.text


def test_an_error_of_the_step_itself_is_not_swallowed(llm):
    ids, mask = prompts()
    embeds = llm.get_input_embeddings()(ids)
    gen = FastGenerator(llm, compile=True, compile_fn=failing_step(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        gen.generate(embeds, mask, max_new_tokens=5, pad_token_id=PAD, eos_token_id=[1])
