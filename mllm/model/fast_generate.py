"""Fast generation: a preallocated KV cache and a decode step that `torch.compile` can capture.

Why a separate path: transformers' `generate` with a `DynamicCache` grows the cache by concatenation every step and
launches hundreds of small kernels per token, so a 7.6B decoder at batch 1 runs at ~2.5x its memory-bandwidth floor.
Here the keys/values live in fixed [rows, K, S_max, d] buffers written in place, the decode step always sees the same
shapes (one new token, an additive mask over all S_max slots), so on CUDA it is compiled once (CUDA graphs via
`mode="reduce-overhead"`) and replayed. On CPU (or where compile fails) the same step runs eagerly and attends only to
the filled prefix of the buffers, which is also what makes it numerically the plain path.

The decoding rules are transformers' own (same logits processors, same beam bookkeeping, same padding of finished
rows), so the tokens equal `MLLMModel.generate(..., fast=False)`. The repetition penalty counts every generated token
of a row, as in an unpadded call (the plain path does the same through `modeling.penalty_over_new_tokens`).

Kept for now, pending the H200 comparison (issue 27): transformers' own static cache now drives our decoder too
(`MLLMModel.generate(cache_implementation="static")`, `mllm answer --static-cache`; same tokens, tested), but its beam
search (transformers 5.x) never runs a compiled forward. The rule: if that library path comes within 10% of this one
on the objhal_bench-size job and at batch 1 and 16 (`benchmarks/gpu_generate.py` on one H200), this module is
retired; otherwise this paragraph gives the measured reason. On CPU (tiny model, two loaded cores, 2026-12-04, per-step
Python overhead only) this path took 1.9 vs 3.3 ms per step at batch 1 greedy and 8.8 vs 13.7 ms at batch 16 beam 3,
which decides nothing for an 8B model on a GPU.

Shapes: B = prompts, N = beams, R = rows = B x N, T = prompt length (left-padded), S = cache slots (T + new tokens,
rounded up), D = hidden size, V = vocabulary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.exc import TorchDynamoException
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mllm.model.inputs import positions_from_mask
from mllm.model.llm import (
    Attention,
    DecoderLayer,
    LLMForCausalLM,
    additive_mask,
    apply_rotary,
    causal_bias,
    eager_attention,
)

logger = logging.getLogger(__name__)

SUPPORTED_KWARGS = {
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "length_penalty",
    "early_stopping",
    "pad_token_id",
    "eos_token_id",
    "use_cache",
}
SLOT_ROUNDING = 128
"""Cache lengths are rounded up to a multiple of this, so batches of similar length reuse one compiled graph."""
DEFAULT_MAX_NEW_TOKENS = 20
"""transformers' default (max_length 20 with an empty input_ids) when neither max_new_tokens nor max_length is set."""


@dataclass
class DecodeOptions:
    """Generation settings of one call, validated (a bad value is a ValueError naming the option)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    do_sample: bool = False
    num_beams: int = 1
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> DecodeOptions:
        unknown = sorted(set(kwargs) - SUPPORTED_KWARGS)
        if unknown:
            raise ValueError(f"fast generation does not support {unknown}; use fast=False for those options")
        known = {k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__ and v is not None}
        options = cls(**known)
        if options.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {options.max_new_tokens}")
        if options.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {options.num_beams}")
        if options.do_sample and options.num_beams > 1:
            raise ValueError("fast generation: beam sampling (do_sample with num_beams > 1) is not supported")
        if options.early_stopping not in (False, True, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {options.early_stopping!r}")
        return options


class StaticKVCache:
    """All layers' keys and values in one buffer [2L, R, K, S, d] (layer i: keys 2i, values 2i+1), written in place.

    One tensor rather than 2L: the compiled step takes a single static input, and a beam reorder or a prompt copy is
    one kernel instead of 2L. It speaks the one method our `Attention` uses (`update`), and returns the buffers cut to
    `attend_len` slots: all S slots in the compiled step (fixed shapes), only the filled prefix in eager decoding and
    prefill.
    """

    def __init__(self, storage: torch.Tensor):
        self.storage = storage  # [2L, R, K, S, d]
        self.positions: torch.Tensor | None = None  # [T] slots written by the current forward
        self.attend_len = storage.shape[3]

    @classmethod
    def allocate(cls, llm: LLMForCausalLM, rows: int, slots: int, dtype: torch.dtype) -> StaticKVCache:
        cfg = llm.config
        shape = (2 * cfg.num_hidden_layers, rows, cfg.num_key_value_heads, slots, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=llm.lm_head.weight.device))

    @property
    def rows(self) -> int:
        return self.storage.shape[1]

    @property
    def slots(self) -> int:
        return self.storage.shape[3]

    def mark_static(self) -> None:
        """Tell the compiler the buffer keeps its address (CUDA graphs then write into it in place)."""
        torch._dynamo.mark_static_address(self.storage)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.storage[2 * layer_idx], self.storage[2 * layer_idx + 1]  # [R, K, S, d] views
        keys.index_copy_(2, self.positions, k)  # k: [R, K, T, d] into slots `positions`
        values.index_copy_(2, self.positions, v)
        return keys[:, :, : self.attend_len], values[:, :, : self.attend_len]

    def load_prefix(self, prompt: StaticKVCache, times: int) -> None:
        """Slots 0..T-1 of every row from a prompt cache of B rows, each repeated `times` times (one per beam)."""
        length = prompt.slots
        source = prompt.storage.repeat_interleave(times, dim=1) if times > 1 else prompt.storage
        self.storage[:, :, :, :length] = source

    def reorder(self, rows: torch.Tensor, start: int, end: int) -> None:
        """Beam search: row r takes the cache of row rows[r] in slots start..end-1. The beams of one prompt share
        its prompt slots, so only the generated ones (start = prompt length) need copying."""
        window = self.storage[:, :, :, start:end]
        window.copy_(window.index_select(1, rows))


def run_layers(
    llm: LLMForCausalLM,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    bias: torch.Tensor,
    cache: StaticKVCache,
    decode: bool = False,
) -> torch.Tensor:
    """The decoder on [R, T, D] embeddings writing into the static cache; returns last-position logits [R, V] fp32.

    Goes around `LLMModel.forward` on purpose: that one asks the cache for its length (a Python int that changes every
    step and would recompile a captured graph) and builds its own mask; here the caller passes both. `decode` (T = 1)
    runs `decode_layer`, which attends without copying the grouped key/value heads.
    """
    model = llm.model
    rope = model.rotary_emb(position_ids, embeds.dtype)  # 2 x [R, T, d]
    x = embeds
    for layer in model.layers:
        x = decode_layer(layer, x, rope, bias, cache) if decode else layer(x, rope, bias, None, cache)
    return llm.lm_head(model.norm(x[:, -1])).float()  # [R, V]


def decode_layer(
    layer: DecoderLayer, x: torch.Tensor, rope, bias: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """`DecoderLayer.forward` for one new token per row, with `decode_attention` in place of the module's attention."""
    x = x + decode_attention(layer.self_attn, layer.input_layernorm(x), rope, bias, cache)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def decode_attention(
    attn: Attention, x: torch.Tensor, rope, bias: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """Attention of one new token per row [R, 1, D] over the cache, grouped-query style without `repeat_kv`.

    `repeat_kv` would copy every cached key/value head H/K times each step (7x the cache's bytes for Qwen2-7B, the
    dominant memory traffic at batch 48). With one query position, the n_rep = H/K query heads that share key/value
    head k can instead stand in the query-length slot: q [R, K, n_rep, d] against k, v [R, K, S, d], the mask
    [R, 1, 1, S] broadcast over them. Same numbers per head, no copy.
    """
    rows = x.shape[0]
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = apply_rotary(attn._split_heads(attn.q_proj(x), heads), *rope)  # [R, H, 1, d]
    k = apply_rotary(attn._split_heads(attn.k_proj(x), kv_heads), *rope)  # [R, K, 1, d]
    v = attn._split_heads(attn.v_proj(x), kv_heads)  # [R, K, 1, d]
    keys, values = cache.update(k, v, attn.layer_idx)  # [R, K, S, d]
    q = q.reshape(
        rows, kv_heads, heads // kv_heads, head_dim
    )  # head h = k * n_rep + j, as repeat_kv orders them
    if (attn.config._attn_implementation or "sdpa") == "eager":
        out = eager_attention(q, keys, values, bias, 0.0)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)  # [R, K, n_rep, d]
    return attn.o_proj(out.reshape(rows, 1, heads * head_dim))


class DecodeStep:
    """One token for every row: ids [R] at slot `slot` -> logits [R, V]. Compiled on request, eager otherwise."""

    def __init__(self, llm: LLMForCausalLM, compile: bool, compile_fn: Callable | None = None):
        self.llm = llm
        self.enabled_compile = compile
        self.compiled: Callable | None = None
        self.compile_error: str | None = None
        """Why torch.compile failed, when it did (the step then runs eagerly)."""
        if compile:
            compile_fn = compile_fn or default_compile
            self.compiled = compile_fn(self._step_full)

    def _step_full(self, ids, position_ids, bias, slot, storage):
        cache = StaticKVCache(storage)
        cache.positions = slot
        embeds = self.llm.model.embed_tokens(ids[:, None])  # [R, 1, D]
        return run_layers(self.llm, embeds, position_ids[:, None], bias, cache, decode=True)

    def __call__(
        self,
        ids: torch.Tensor,
        position_ids: torch.Tensor,
        key_valid: torch.Tensor,
        slot: int,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """key_valid [R, S] bool: the slots each row may attend to (its prompt without padding, its new tokens)."""
        dtype = cache.storage.dtype
        slot_t = torch.tensor([slot], device=ids.device)
        if self.compiled is not None:
            bias = additive_mask(key_valid, dtype)[:, None, None, :]  # [R, 1, 1, S]
            try:
                # The last step's logits are no longer read: CUDA graphs may reuse their memory for this replay.
                torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(ids, position_ids, bias, slot_t, cache.storage)
            except TorchDynamoException as exc:
                # Only a failure of torch.compile itself (tracing, the backend's compiler) falls back: an error of
                # the step (out of memory, a bad input) is the caller's to see. The reason is logged in full and
                # kept in `compile_error`.
                self.compile_error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "torch.compile of the decode step failed; decoding eagerly from now on (%s)",
                    self.compile_error,
                    exc_info=True,
                )
                self.compiled = None
        cache.attend_len = slot + 1
        cache.positions = slot_t
        bias = additive_mask(key_valid[:, : slot + 1], dtype)[:, None, None, :]  # [R, 1, 1, slot+1]
        embeds = self.llm.model.embed_tokens(ids[:, None])
        return run_layers(self.llm, embeds, position_ids[:, None], bias, cache, decode=True)


def default_compile(fn: Callable) -> Callable:
    """CUDA graphs through inductor: within a call the step's shapes never change, so one capture is replayed every
    token. `dynamic=None`: the first shape compiles static, a second one (other rows or slots) recompiles once with
    symbolic sizes, after which new shapes only record a new CUDA graph instead of compiling again."""
    return torch.compile(fn, mode="reduce-overhead", fullgraph=True)


def prefill(
    llm: LLMForCausalLM, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """The whole left-padded prompt [B, T, D] into slots 0..T-1; returns the last position's logits [B, V]."""
    batch, length = attention_mask.shape
    position_ids = positions_from_mask(attention_mask)  # [B, T]
    bias = causal_bias(attention_mask, batch, length, 0, embeds.dtype, embeds.device)  # [B, 1, T, T]
    cache.positions = torch.arange(length, device=embeds.device)
    cache.attend_len = length
    return run_layers(llm, embeds, position_ids, bias, cache)


def build_processors(options: DecodeOptions, eos: torch.Tensor) -> LogitsProcessorList:
    """transformers' own logits processors, in the order its `generate` applies them."""
    processors = LogitsProcessorList()
    if options.repetition_penalty is not None and options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(options.repetition_penalty)))
    if options.min_new_tokens > 0:
        processors.append(
            MinNewTokensLengthLogitsProcessor(0, options.min_new_tokens, eos, device=eos.device)
        )
    if options.do_sample:
        if options.temperature is not None and options.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(options.temperature)))
        if options.top_k is not None and options.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=int(options.top_k)))
        if options.top_p is not None and options.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(options.top_p)))
    return processors


class FastGenerator:
    """Static-cache greedy / sampling / beam search over an `LLMForCausalLM`, from fused prompt embeddings.

    Keep one per model: it keeps its decode cache between calls (reused while the row count matches and the slots
    suffice; slot counts are rounded up to SLOT_ROUNDING), so a compiled step is captured once per shape, not per call.
    """

    def __init__(self, llm: LLMForCausalLM, compile: bool | None = None, compile_fn: Callable | None = None):
        """`compile` None: on CUDA only. `compile_fn` replaces `torch.compile(mode="reduce-overhead")` (tests pass
        an identity or a dynamo-only backend to run the fixed-shape step on CPU)."""
        backend = llm.config._attn_implementation or "sdpa"
        if backend not in ("sdpa", "eager"):
            raise ValueError(
                f"fast generation needs attn_implementation 'sdpa' or 'eager' (the static cache passes an additive "
                f"mask), got {backend!r}"
            )
        if compile is None:
            compile = llm.lm_head.weight.device.type == "cuda"
        self.llm = llm
        self.step = DecodeStep(llm, compile, compile_fn)
        self._cache: StaticKVCache | None = None

    def decode_cache(self, rows: int, slots: int, dtype: torch.dtype) -> StaticKVCache:
        """The kept cache when it fits (same rows and dtype, enough slots), else a new one (the old one is freed)."""
        cache, device = self._cache, self.llm.lm_head.weight.device
        stale = cache is None or cache.storage.dtype != dtype or cache.storage.device != device
        if stale or cache.rows != rows or cache.slots < slots:
            self._cache = None  # free the old buffers before allocating the new ones
            cache = StaticKVCache.allocate(self.llm, rows, slots, dtype)
            if self.step.compiled is not None:
                cache.mark_static()
            self._cache = cache
        cache.attend_len = cache.slots
        return cache

    @torch.inference_mode()
    def generate(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """New tokens [B, n] for prompts given as embeddings [B, T, D] with a left-padding mask [B, T]."""
        pad = kwargs.get("pad_token_id")
        eos_ids = kwargs.get("eos_token_id")
        if pad is None or eos_ids is None:
            raise ValueError("fast generation needs pad_token_id and eos_token_id")
        options = DecodeOptions.from_kwargs(kwargs)
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=device)
        attention_mask = attention_mask.to(device).bool()
        batch, length = attention_mask.shape
        beams = options.num_beams
        prompt_cache = StaticKVCache.allocate(self.llm, batch, length, dtype)
        logits = prefill(self.llm, inputs_embeds, attention_mask, prompt_cache)  # [B, V]
        slots = math.ceil((length + options.max_new_tokens) / SLOT_ROUNDING) * SLOT_ROUNDING
        cache = self.decode_cache(batch * beams, slots, dtype)
        cache.load_prefix(prompt_cache, beams)
        del prompt_cache
        key_valid = torch.zeros(batch, cache.slots, dtype=torch.bool, device=device)  # [B, S]
        key_valid[:, :length] = attention_mask
        state = _Rows(key_valid, attention_mask.sum(-1), length).repeat(beams)
        processors = build_processors(options, eos)
        if beams > 1:
            logits = logits.repeat_interleave(beams, dim=0)  # [R, V]
            return self._beam_search(logits, cache, state, options, processors, eos, pad)
        return self._sample(logits, cache, state, options, processors, eos, pad)

    def _advance(self, tokens: torch.Tensor, cache: StaticKVCache, state: _Rows) -> torch.Tensor:
        """Feed one token per row at the next slot; returns the next logits [R, V]."""
        slot = state.next_slot
        state.key_valid[:, slot] = True
        logits = self.step(tokens, state.positions, state.key_valid, slot, cache)
        state.positions = state.positions + 1
        state.next_slot += 1
        return logits

    def _sample(self, logits, cache, state, options, processors, eos, pad) -> torch.Tensor:
        """Greedy or sampling with per-row stopping: a finished row emits pad until every row is done."""
        rows = len(logits)
        out = torch.empty(rows, 0, dtype=torch.long, device=logits.device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=logits.device)
        for step in range(options.max_new_tokens):
            scores = processors(out, logits)  # [R, V]
            if options.do_sample:
                tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = scores.argmax(-1)
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
            out = torch.cat([out, tokens[:, None]], dim=1)
            unfinished &= ~torch.isin(tokens, eos)
            if step + 1 == options.max_new_tokens or not bool(unfinished.any()):
                break
            logits = self._advance(tokens, cache, state)
        return out

    def _beam_search(self, logits, cache, state, options, processors, eos, pad) -> torch.Tensor:
        """Beam search over B prompts x N beams in one batch, with transformers' bookkeeping (see `BeamState`)."""
        beams = BeamState(len(logits) // options.num_beams, options, eos, pad, logits.device)
        for step in range(options.max_new_tokens):
            log_probs = processors(beams.running_tokens(step), F.log_softmax(logits, dim=-1))  # [R, V]
            source_rows, tokens, go_on = beams.advance(log_probs, step)
            if not go_on:
                break
            cache.reorder(source_rows, state.prompt_slots, state.next_slot)
            state.reorder(source_rows)
            logits = self._advance(tokens, cache, state)
        return beams.result()


class _Rows:
    """Per-row decoding position: which slots a row may see, its next RoPE position, the next slot to write."""

    def __init__(self, key_valid: torch.Tensor, positions: torch.Tensor, next_slot: int):
        self.key_valid = key_valid  # [R, S] bool
        self.positions = positions  # [R] long: real tokens so far = position of the next token
        self.next_slot = next_slot
        self.prompt_slots = next_slot

    def repeat(self, times: int) -> _Rows:
        if times == 1:
            return self
        return _Rows(
            self.key_valid.repeat_interleave(times, 0),
            self.positions.repeat_interleave(times, 0),
            self.next_slot,
        )

    def reorder(self, rows: torch.Tensor) -> None:
        self.key_valid = self.key_valid.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)


class BeamState:
    """transformers' vectorised beam search bookkeeping, per prompt: N running beams and N finished hypotheses.

    Every step keeps the top K = max(2, 1 + n_eos) x N continuations over all beams, so that N of them can go on even
    when the best ones end; those among the top N that end (or hit max length) compete with the finished
    hypotheses by score / length ** length_penalty. A prompt is done when no running beam can beat its worst finished
    hypothesis (early_stopping False: judged at the current length). Output: the best hypothesis of each prompt,
    filled with pad (or the first eos when pad is 0, as transformers does) to the longest one.
    """

    def __init__(self, batch: int, options: DecodeOptions, eos: torch.Tensor, pad: int, device: torch.device):
        n, steps = options.num_beams, options.max_new_tokens
        self.batch, self.n, self.options, self.eos = batch, n, options, eos
        self.keep = max(2, 1 + len(eos)) * n
        self.fill = pad if pad else int(eos[0])
        self.running = torch.full((batch, n, steps), self.fill, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(batch, n, device=device)
        self.running_scores[:, 1:] = -1e9  # only beam 0 may expand at the first step (all beams are equal)
        self.finished = self.running.clone()
        self.finished_scores = torch.full((batch, n), -1e9, device=device)
        self.finished_lengths = torch.zeros(batch, n, dtype=torch.long, device=device)
        self.is_finished = torch.zeros(batch, n, dtype=torch.bool, device=device)
        self.improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    def running_tokens(self, step: int) -> torch.Tensor:
        return self.running[:, :, :step].reshape(self.batch * self.n, step)  # [R, step]

    def advance(self, log_probs: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Choose the continuations; returns (source row of every new row [R], its token [R], whether to go on)."""
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(self.batch, self.n, vocab) + self.running_scores[:, :, None]).view(
            self.batch, -1
        )
        top_scores, top_index = totals.topk(self.keep, dim=-1)  # [B, K]
        from_beam, tokens = top_index // vocab, top_index % vocab
        candidates = self.running.gather(
            1, from_beam[:, :, None].expand(-1, -1, self.running.shape[2])
        ).clone()
        candidates[:, :, step] = tokens  # [B, K, steps]
        last_step = step + 1 == self.options.max_new_tokens
        ends = torch.isin(tokens, self.eos) | last_step  # [B, K]
        self._collect_finished(candidates, top_scores, ends, step)
        alive_scores = top_scores - ends.float() * 1e9
        pick = alive_scores.topk(self.n, dim=-1).indices  # [B, N]
        self.running = candidates.gather(1, pick[:, :, None].expand(-1, -1, candidates.shape[2]))
        self.running_scores = alive_scores.gather(1, pick)
        beam_of = from_beam.gather(1, pick)  # [B, N]: which old beam each new one extends
        source_rows = (beam_of + torch.arange(self.batch, device=pick.device)[:, None] * self.n).reshape(-1)
        self._update_improvable(step + 1)
        go_on = self.improvable.any() & ~ends.all()
        if self.options.early_stopping is True:
            go_on &= ~self.is_finished.all()
        go_on = not last_step and bool(go_on)  # one host sync per step
        return source_rows, tokens.gather(1, pick).reshape(-1), go_on

    def _collect_finished(self, candidates, top_scores, ends, step) -> None:
        """Merge the ending candidates among the top N into the finished hypotheses (best N kept)."""
        opts = self.options
        in_top_n = torch.arange(self.keep, device=ends.device) < self.n
        just_finished = ends & in_top_n[None, :]
        scores = top_scores / ((step + 1) ** opts.length_penalty)
        if opts.early_stopping is True:
            scores = scores - self.is_finished.all(-1, keepdim=True).float() * 1e9
        scores = scores - (~self.improvable).float() * 1e9 - (~just_finished).float() * 1e9
        merged_scores = torch.cat([self.finished_scores, scores], dim=1)  # [B, N + K]
        best = merged_scores.topk(self.n, dim=-1).indices  # [B, N]
        lengths = torch.full_like(top_scores, step + 1, dtype=torch.long)
        merged = torch.cat([self.finished, candidates], dim=1)
        self.finished = merged.gather(1, best[:, :, None].expand(-1, -1, merged.shape[2]))
        self.finished_scores = merged_scores.gather(1, best)
        self.finished_lengths = torch.cat([self.finished_lengths, lengths], dim=1).gather(1, best)
        self.is_finished = torch.cat([self.is_finished, just_finished], dim=1).gather(1, best)

    def _update_improvable(self, generated: int) -> None:
        opts = self.options
        if opts.early_stopping == "never" and opts.length_penalty > 0.0:
            generated = opts.max_new_tokens
        best_running = self.running_scores[:, :1] / (generated**opts.length_penalty)
        worst_finished = torch.where(
            self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, -1.0e9
        )
        self.improvable &= (best_running > worst_finished).any(-1, keepdim=True)

    def result(self) -> torch.Tensor:
        """The best hypothesis per prompt [B, longest], filled after its end."""
        width = int(self.finished_lengths[:, 0].max())
        return self.finished[:, 0, :width]
