"""The language model: a Qwen2-family decoder (also loads Llama-family weights with `attention_bias=False`).

Read this file top to bottom: norm, rotary position embedding, the attention itself (three interchangeable backends),
the MLP, one decoder layer, the stack, and the causal-LM head. Shapes use B = batch, T = new tokens in this call,
S = all keys seen so far (cached + new), H = query heads, K = key/value heads, d = head_dim, D = hidden size.

The KV cache is a transformers `Cache` (a `DynamicCache` by default), so `transformers.GenerationMixin.generate`
(greedy, sampling, beam search) drives this model unchanged, also from `inputs_embeds`; with
`cache_implementation="static"` too (the masks transformers prepares over all cache slots are used as given, and the
forward traces as one graph, so on CUDA transformers compiles it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from mllm.model.config import MLLMConfig
from mllm.model.losses import sft_loss


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the model dtype (bf16 squares lose too much)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for arbitrary (possibly left-padded) position ids."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
            / self.head_dim
        )
        return 1.0 / (self.theta**exponents)  # [d/2]

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent table (after building on the meta device)."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: the 90-degree turn of every rotary pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, heads, T, d] by their positions' angles (cos/sin are [B, T, d])."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]: the same angle for every head
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: each of the K key/value heads serves n_rep = H/K consecutive query heads."""
    if n_rep == 1:
        return x
    batch, kv_heads, seq, head_dim = x.shape
    x = x[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)  # [B, K, n_rep, S, d]
    return x.reshape(batch, kv_heads * n_rep, seq, head_dim)  # [B, H, S, d]


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, spelled out.

    q: [B, H, T, d]; k, v: [B, H, S, d]; bias: [B, 1, T, S] additive, 0 where a query may look and a very negative
    number where it may not (future tokens, padding). Returns [B, H, T, d].
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, H, T, S]
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # each row sums to 1 over the keys
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)  # [B, H, T, d]: a weighted average of the values


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """The same computation through torch's fused kernel. `bias=None` with several queries means plain causal from
    an empty cache (top-left aligned: query i sees keys 0..i, so unfilled static-cache slots after them stay unseen);
    `bias` may be additive or bool (True = may attend, as transformers' prepared masks)."""
    is_causal = bias is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """flash-attn 2 (GPU, fp16/bf16 only). transformers' wrapper unpads left-padded rows into flash-attn's varlen
    kernel; flash-attn handles grouped kv heads itself."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = _flash_attention_forward(
        q.transpose(1, 2).to(dtype),  # flash-attn wants [B, T, heads, d]
        k.transpose(1, 2).to(dtype),
        v.transpose(1, 2).to(dtype),
        padding_mask,
        query_length=q.shape[2],
        is_causal=True,
        dropout=dropout,
        attn_implementation="flash_attention_2",
    )
    return out.transpose(1, 2).to(q.dtype)  # [B, H, T, d]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = may attend) -> additive: 0 where allowed and dtype's most negative finite value elsewhere, rather
    than -inf, so a fully blocked row (a padding query) softmaxes to a harmless uniform row instead of NaN."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def causal_bias(
    padding_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask [B, 1, T, S]: query i (absolute position past_len + i) may see key j iff j <= past_len + i and
    key j is not padding (`additive_mask`)."""
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, S]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :kv_len].bool()  # [B, 1, T, S]
    return additive_mask(allowed.expand(batch, 1, q_len, kv_len), dtype)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, grouped-query heads and a KV cache."""

    def __init__(self, config: MLLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias  # Qwen2: True, Llama: False; o_proj never has one
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, heads, self.head_dim).transpose(1, 2)  # [B, heads, T, d]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # [B, T, D]
        q = apply_rotary(self._split_heads(self.q_proj(x), self.num_heads), *rope)  # [B, H, T, d]
        k = apply_rotary(self._split_heads(self.k_proj(x), self.num_kv_heads), *rope)  # [B, K, T, d]
        v = self._split_heads(self.v_proj(x), self.num_kv_heads)  # [B, K, T, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, K, S, d]: the past keys/values and these ones
        dropout = self.config.attention_dropout if self.training else 0.0
        backend = self.config._attn_implementation or "sdpa"
        if backend == "flash_attention_2":
            out = flash_attention(q, k, v, padding_mask, dropout)
        else:
            n_rep = self.num_heads // self.num_kv_heads
            attend = eager_attention if backend == "eager" else sdpa_attention
            out = attend(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), bias, dropout)  # [B, H, T, d]
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)  # [B, T, H*d]
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MLLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MLLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, bias, padding_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, bias, padding_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLMPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing (config class, attention backends, weight init)."""

    config: MLLMConfig
    config_class = MLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_compile_fullgraph = True  # tests/test_llm_parity.py: the static-cache forward under fullgraph=True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers(module.inv_freq.device)


class LLMModel(LLMPreTrainedModel):
    """Embeddings -> decoder layers -> final norm. Its keys are `model.*` under the causal LM."""

    def __init__(self, config: MLLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _attention_inputs(self, attention_mask, x, past_len):
        """Build what the backend needs: an additive bias (eager/sdpa) or the 2D padding mask (flash).

        `generate` with a static cache passes the masks it prepared itself (`create_masks_for_generate`, outside the
        compiled forward): a dict by layer type, each a [B, 1, T, S] mask over every cache slot (bool for sdpa,
        additive for eager) or None where sdpa's causal flag serves. They are used as given."""
        batch, q_len = x.shape[:2]
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask["full_attention"]
            if attention_mask is None:
                return None, None
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool and self.config._attn_implementation == "eager":
                attention_mask = additive_mask(attention_mask, x.dtype)  # eager adds the mask to the scores
            return attention_mask, None  # a [B, 1, T, S] mask: additive, or bool for sdpa
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        padding_mask = attention_mask if padded else None
        backend = self.config._attn_implementation or "sdpa"
        if backend == "flash_attention_2" or (
            backend == "sdpa" and not padded and (past_len == 0 or q_len == 1)
        ):
            return None, padding_mask  # the kernel's own causal flag (or nothing to block, for one new token)
        return causal_bias(padding_mask, batch, q_len, past_len, x.dtype, x.device), padding_mask

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Returns (last hidden state [B, T, D], cache). `attention_mask` [B, S] covers cached and new tokens."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + x.shape[1], device=x.device)[None].expand(
                x.shape[0], -1
            )
        rope = self.rotary_emb(position_ids, x.dtype)  # 2 x [B, T, d]
        bias, padding_mask = self._attention_inputs(attention_mask, x, past_len)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, rope, bias, padding_mask, cache)
            else:
                x = layer(x, rope, bias, padding_mask, cache)
        return self.norm(x), cache


class LLMForCausalLM(LLMPreTrainedModel, GenerationMixin):
    """Decoder + untied (or tied) lm_head; the `llm` of `MLLMModel`, and what `generate` runs."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLLMConfig):
        super().__init__(config)
        self.model = LLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` [B, T] with IGNORE_INDEX on ignored positions gives the mean next-token cross-entropy in `.loss`.
        `logits_to_keep=n` computes logits for the last n positions only (generation needs just the last)."""
        hidden, cache = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=bool(use_cache),  # only when asked (generate always asks): scoring passes keep no K/V
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = sft_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
