"""`MLLMModel`: vision tower + resampler + LLM, fused the MiniCPM-V 2.6 way.

Data flow: slices [3, 14, L] -> `vpm` -> [L, vision_dim] tokens -> `resampler` -> 64 rows of LLM width per slice ->
written over the 64 `<unk>` placeholder embeddings at each `image_bound` range -> `llm`.

`forward` and `generate` take the processor's batch, an `MLLMInputs` (`mllm.model.inputs`: input_ids,
attention_mask, position_ids, image_bound, pixel_values, tgt_sizes), positionally or unpacked as keywords.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    TextIteratorStreamer,
)
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast

from mllm.model.chat import chat
from mllm.model.config import MiniCPMVConfig, MLLMConfig
from mllm.model.export import carry_remote_code
from mllm.model.fast_generate import FastGenerator
from mllm.model.inputs import BATCH_FIELDS, MLLMInputs, positions_from_mask
from mllm.model.llm import LLMForCausalLM
from mllm.model.loading import HUB_KWARGS, load_pretrained
from mllm.model.registry import RESAMPLER, projector_class
from mllm.model.resampler import Resampler
from mllm.model.vision import VisionTransformer
from mllm.model.vision_cache import VisionFeatureCache

TERMINATOR_TOKENS = ("<|im_end|>", "<|endoftext|>")


class ChatStreamer(TextIteratorStreamer):
    """Streams the text `MLLMModel._decode_text` returns: special tokens such as `<image>` or `<box>` are kept
    (not skipped) and terminators are dropped, so the joined, stripped pieces equal the non-streamed answer."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        super().__init__(tokenizer, skip_prompt=True)
        self.stop_ids = torch.tensor(stop_ids)
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Called by the generation thread when it dies: the reader gets the error instead of waiting forever."""
        self.error = error
        self.end()

    def __next__(self) -> str:
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise RuntimeError(f"generation failed: {self.error}") from self.error
            raise

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            value = value.reshape(-1).cpu()
            value = value[~torch.isin(value, self.stop_ids)]
        super().put(value)


def penalty_over_new_tokens(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Generation kwargs with `repetition_penalty` passed as our own processor over every new token.

    From `inputs_embeds`, transformers hands its repetition-penalty processor each row's left-padding length as a
    prompt length to skip, but the token ids it sees are only the new ones: a row padded by n would ignore its first n
    new tokens, so a prompt's answer would depend on the batch it sits in. The processor is given without that skip
    (and the built-in one switched off with penalty 1.0), which is what an unpadded, one-at-a-time call does.
    """
    penalty = kwargs.get("repetition_penalty")
    if penalty is None or penalty == 1.0:
        return kwargs
    processors = LogitsProcessorList(kwargs.get("logits_processor") or [])
    processors.insert(0, RepetitionPenaltyLogitsProcessor(float(penalty)))
    return {**kwargs, "repetition_penalty": 1.0, "logits_processor": processors}


def image_row_index(
    image_bound: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample index, token index) of every placeholder row, in order: ranges of each sample, samples in order.

    The ranges are expanded with repeat_interleave, so there is no Python loop over tokens.
    """
    bounds = [torch.as_tensor(b, dtype=torch.long).reshape(-1, 2) for b in image_bound]
    starts = torch.cat([b[:, 0] for b in bounds]).to(device)  # [R]
    lengths = torch.cat([b[:, 1] - b[:, 0] for b in bounds]).to(device)  # [R]
    samples = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(bounds)]).to(device)
    offsets = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(
        lengths.cumsum(0) - lengths, lengths
    )
    return torch.repeat_interleave(samples, lengths), torch.repeat_interleave(starts, lengths) + offsets


def normalize_rows(rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N, Q, D] -> the same with each slice's rows centred over Q and scaled to RMS 1 (`normalize_image_rows`)."""
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred / (centred.float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt().to(rows.dtype) + eps)


class MLLMModel(PreTrainedModel, GenerationMixin):
    """MiniCPM-V 2.6-compatible multimodal model. Submodules `llm`, `vpm`, `resampler` match the checkpoint's keys.

    `generate` is our own (vision once, then transformers' generate on the LLM's fused embeddings); the
    GenerationMixin base makes the model a generating one for transformers (`can_generate()`, a `generation_config`
    read from and saved to generation_config.json)."""

    config: MLLMConfig
    config_class = MLLMConfig
    base_model_prefix = "mllm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer", "VisionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: MLLMConfig):
        super().__init__(config)
        self.llm = LLMForCausalLM(config)
        self.vpm = VisionTransformer(config.vision, config.num_vision_layers)
        # "resampler" (MiniCPM-V) or a registered option, e.g. the toy world's "merge" / "mlp" (mllm.model.registry)
        projector = Resampler if config.projector == RESAMPLER else projector_class(config.projector)
        self.resampler = projector(config.query_num, config.hidden_size, config.vision.hidden_size)
        self.vision_cache: VisionFeatureCache | None = None  # see attach_vision_cache
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Resampler):
            torch.nn.init.trunc_normal_(module.query, std=0.02)
            module.reset_buffers(module.query.device)
        if getattr(module, "torch_default_init", False):  # the "cnn" vision stem, see VisionConfig.stem
            module.reset_parameters()
        std = getattr(module, "position_init_std", None)  # the vision position table, see VisionConfig
        if isinstance(module, torch.nn.Embedding) and std is not None:
            module.weight.data.normal_(0.0, std)

    # -- transformers plumbing ------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.llm.set_input_embeddings(value)

    @classmethod
    def from_pretrained(
        cls, model_dir, torch_dtype=None, device_map=None, device=None, **kwargs
    ) -> MLLMModel:
        """Load a checkpoint directory (single/sharded safetensors or .bin) strictly; see `mllm.model.loading`.
        What `AutoModel.from_pretrained` passes along is understood: a `config` it has read, and hub options (a
        local directory needs none)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
        model = load_pretrained(
            cls,
            model_dir,
            dtype=kwargs.pop("dtype", torch_dtype),
            device_map=device_map,
            device=device,
            **kwargs,
        )
        if (Path(model_dir) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        return model

    def save_pretrained(self, save_directory, *args, max_shard_size: int | str = "5GB", **kwargs) -> None:
        """transformers' own `save_pretrained` (config.json + safetensors in the checkpoint's key layout, shards and
        their index above `max_shard_size`; `state_dict` and `is_main_process`, which Trainer passes when it has
        gathered ZeRO-3 / FSDP shards, are honoured), with the 5 GB shards of the official checkpoint by default.

        transformers 5 writes safetensors only: `safe_serialization=False` is refused rather than ignored."""
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("safe_serialization=False: transformers 5 saves safetensors only")
        architectures = self.config.architectures
        super().save_pretrained(save_directory, *args, max_shard_size=max_shard_size, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if architectures and self.config.architectures != architectures:
            # transformers names this class; a checkpoint of the official layout keeps its ["MiniCPMV"]
            self.config.architectures = architectures
            self.config.save_pretrained(save_directory)
        carry_remote_code(self.config, Path(save_directory))

    # -- vision ---------------------------------------------------------------------------------------------------

    def _encode_slices(self, strips: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """All slices of the batch -> resampler rows [N, query_num, D], the tower run in chunks of vision_batch_size."""
        tgt_sizes = tgt_sizes.to(self.vpm.embeddings.patch_embedding.weight.device, torch.int32)
        encode = (
            self.vpm.encode_strips
            if self.vision_cache is None
            else partial(self.vision_cache.encode, self.vpm)
        )
        hidden = encode(
            strips, tgt_sizes, self.config._attn_implementation, self.config.vision_batch_size
        )  # [N, L, vision_dim]
        rows = self.resampler(hidden, tgt_sizes)  # [N, Q, D]
        return normalize_rows(rows) if self.config.normalize_image_rows else rows

    def attach_vision_cache(self, max_bytes: int) -> VisionFeatureCache:
        """Reuse the frozen tower's output for slices seen before (`mllm.model.vision_cache`), keeping up to
        `max_bytes` of them: for training with the tower frozen. Refused while a tower parameter is trainable."""
        trainable = [name for name, p in self.vpm.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"a vision cache needs a frozen vision tower; trainable: {trainable[:3]}{' ...' if len(trainable) > 3 else ''}"
            )
        if self.config.vision.attention_dropout > 0:
            raise ValueError(
                f"a vision cache would freeze the tower's dropout (attention_dropout {self.config.vision.attention_dropout})"
            )
        self.vision_cache = VisionFeatureCache(max_bytes)
        return self.vision_cache

    def get_vision_hidden_states(self, data: dict[str, Any]) -> list[torch.Tensor]:
        """Per sample the resampler rows of its slices [n_i, query_num, D] (an empty [0, Q, D] for no image)."""
        pixel_values = data["pixel_values"]
        strips = [strip for sample in pixel_values for strip in sample]
        counts = [len(sample) for sample in pixel_values]
        dim, dtype, device = self.config.hidden_size, self.llm.dtype, self.llm.device
        if not strips:
            return [torch.zeros(0, self.config.query_num, dim, dtype=dtype, device=device) for _ in counts]
        sizes = [torch.as_tensor(t).reshape(-1, 2) for t in data["tgt_sizes"] if t is not None and len(t)]
        tgt_sizes = torch.cat(sizes)
        if len(tgt_sizes) != len(strips):
            raise ValueError(
                f"data has {len(strips)} pixel_values slices but {len(tgt_sizes)} tgt_sizes rows"
            )
        rows = self._encode_slices(strips, tgt_sizes)
        return list(rows.split(counts))

    def _touch_vision(self) -> torch.Tensor:
        """A zero-weighted scalar through vpm and resampler: in training, a batch without images must still give
        every parameter a gradient, or distributed data parallel waits forever for the missing ones."""
        size = torch.tensor([[2, 2]], dtype=torch.int32)
        patch = self.config.vision.patch_size
        dummy = self.vpm.embeddings.patch_embedding.weight.new_zeros(3, patch, 4 * patch)
        return self._encode_slices([dummy], size).sum() * 0.0

    def get_vllm_embedding(self, data: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(inputs_embeds [B, T, D], vision hidden states per sample): token embeddings with each sample's resampler
        rows written, in order, over the rows of its image_bound ranges. With `image_index` ([B] ints), pixel_values
        and tgt_sizes list the distinct images and row b takes image image_index[b]."""
        vision = data.get("vision_hidden_states")
        if vision is None:
            vision = self.get_vision_hidden_states(data)
            if data.get("image_index") is not None:  # rows sharing an image (a preference pair): encoded once
                vision = [vision[i] for i in torch.as_tensor(data["image_index"]).tolist()]
        input_ids = data["input_ids"]
        embeds = self.llm.get_input_embeddings()(input_ids.to(self.llm.device))  # [B, T, D]
        rows = [v.reshape(-1, embeds.shape[-1]) for v in vision if len(v)]
        if rows:
            rows = torch.cat(rows).to(embeds.dtype)  # [R*Q, D]
            sample_idx, token_idx = image_row_index(data["image_bound"], embeds.device)
            if len(token_idx) != len(rows):
                raise ValueError(
                    f"image_bound covers {len(token_idx)} token positions but the images give {len(rows)} rows "
                    f"({self.config.query_num} per slice); per-sample bounds {[b.tolist() for b in data['image_bound']]}"
                )
            embeds = embeds.index_put((sample_idx, token_idx), rows)
        elif self.training:
            embeds = embeds + self._touch_vision()
        return embeds, vision

    # -- forward and generation -------------------------------------------------------------------------------------

    def forward(self, data: Mapping[str, Any] | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Fuse and run the LLM on a batch (`MLLMInputs`): `model(inputs)` and `model(**inputs)` are the same call.
        Other kwargs (labels, use_cache, ...) go to the LLM; an explicit attention_mask or position_ids wins over the
        batch's."""
        if data is None:
            data = {k: kwargs.pop(k) for k in BATCH_FIELDS if k in kwargs}
        inputs_embeds, _ = self.get_vllm_embedding(data)
        attention_mask = kwargs.pop("attention_mask", data.get("attention_mask"))
        position_ids = kwargs.pop("position_ids", data.get("position_ids"))
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        if position_ids is not None:
            position_ids = position_ids.to(inputs_embeds.device, torch.long)
        return self.llm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    @staticmethod
    def terminator_ids(tokenizer) -> list[int]:
        """Ids of `<|im_end|>` and `<|endoftext|>` as the tokenizer spells them (no remote-code attributes needed)."""
        ids = [tokenizer.convert_tokens_to_ids(t) for t in TERMINATOR_TOKENS]
        ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
        if not ids:
            raise ValueError(f"tokenizer knows none of the terminator tokens {TERMINATOR_TOKENS}")
        return ids

    def _decode_text(self, sequences: torch.Tensor, tokenizer) -> list[str]:
        """New tokens -> text: drop a leading bos, cut at the first terminator (padding only follows it)."""
        stops = set(self.terminator_ids(tokenizer))
        texts = []
        for row in sequences.tolist():
            if row and row[0] == tokenizer.bos_token_id:
                row = row[1:]
            cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
            texts.append(tokenizer.decode(row[:cut]).strip())
        return texts

    @torch.inference_mode()
    def generate(
        self,
        inputs: MLLMInputs | Mapping[str, Any] | torch.Tensor | None = None,
        pixel_values: list[list[torch.Tensor]] | None = None,
        tgt_sizes: list[torch.Tensor] | None = None,
        image_bound: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        tokenizer=None,
        *,
        input_ids: torch.Tensor | None = None,
        vision_hidden_states: list[torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        image_sizes: list | None = None,
        stream: bool = False,
        decode_text: bool = False,
        fast: bool = False,
        fast_compile: bool | None = None,
        **generation_kwargs,
    ):
        """Vision once, fused inputs_embeds, then transformers' generate on the LLM with a KV cache.

        `inputs` is the processor's batch (`MLLMInputs`): `generate(inputs, tokenizer=tok)`. Its fields may also
        come as keywords (`generate(**inputs, tokenizer=tok)`, the reference's `generate(input_ids=..., ...)`) or in
        the reference's positional order (a tensor in the place of `inputs` is `input_ids`). Token tensors go to the model's device here. `position_ids` and `image_sizes` are accepted and
        not used: generation derives positions from the attention mask, as transformers does. `generation_kwargs`
        override the model's `generation_config`.

        `fast=True` decodes with our static-cache path instead (`mllm.model.fast_generate`; same tokens, compiled
        decode step on CUDA unless `fast_compile=False`).

        Returns the new tokens [B, new] (left-padded prompts are fine), their texts with `decode_text`, or, with
        `stream`, a `TextIteratorStreamer` that yields text while generation runs in a background thread.
        """
        if tokenizer is None:
            raise ValueError("generate needs the tokenizer (terminator ids, decoding)")
        if isinstance(inputs, torch.Tensor):
            inputs, input_ids = None, inputs
        fields = {"input_ids": input_ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes}
        fields.update(image_bound=image_bound, attention_mask=attention_mask)
        fields.update(vision_hidden_states=vision_hidden_states)
        data = dict(MLLMInputs.of(inputs, **fields))
        batch = len(data["input_ids"])
        if stream and (batch != 1 or fast):
            # refused before any work starts (no generation thread is left running)
            raise ValueError(
                "stream=True needs a batch of one prompt and the plain path (fast=False does not stream)"
            )
        defaults = {"pixel_values": [[] for _ in range(batch)], "tgt_sizes": [None] * batch}
        defaults["image_bound"] = [torch.zeros(0, 2)] * batch
        data.update({k: v for k, v in defaults.items() if data.get(k) is None})
        inputs_embeds, _ = self.get_vllm_embedding(data)
        mask = data.get("attention_mask")
        if mask is None:
            mask = torch.ones(data["input_ids"].shape, dtype=torch.long)
        terminators = self.terminator_ids(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        kwargs = {"pad_token_id": pad, "eos_token_id": terminators, **generation_kwargs}
        kwargs.update(inputs_embeds=inputs_embeds, attention_mask=mask.to(inputs_embeds.device))
        if stream:
            return self._stream(tokenizer, kwargs)
        output = self._fast_generate(kwargs, fast_compile) if fast else self._llm_generate(kwargs)
        return self._decode_text(output, tokenizer) if decode_text else output

    def chat(self, image, msgs, tokenizer, processor, **kwargs):
        """Messages (+ images) -> answer text; see `mllm.model.chat.chat` for the arguments and defaults."""
        return chat(self, image, msgs, tokenizer, processor, **kwargs)

    def fast_generator(self, compile: bool | None = None):
        """The model's `FastGenerator` (static-cache decoding), kept so that its compiled step and decode cache serve
        every later call; a new one when `compile` asks for the other setting."""
        generator = self.__dict__.get("_fast_generator")
        if generator is None or (compile is not None and generator.step.enabled_compile != compile):
            generator = FastGenerator(self.llm, compile=compile)
            # A plain attribute (not a submodule): it stays out of state_dict and module traversal.
            self.__dict__["_fast_generator"] = generator
        return generator

    def _fast_generate(self, kwargs: dict[str, Any], compile: bool | None) -> torch.Tensor:
        generator = self.fast_generator(compile)
        return generator.generate(kwargs.pop("inputs_embeds"), kwargs.pop("attention_mask"), **kwargs)

    def _llm_generate(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """transformers' generate on the fused embeddings, with the model's `generation_config` as defaults. Its warning that repetition_penalty only sees the new
        tokens is silenced: that is exactly the reference's behaviour (the prompt holds image placeholders)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            config = copy.deepcopy(
                self.generation_config
            )  # the model's defaults, the call's settings over them
            model_kwargs = config.update(**penalty_over_new_tokens(kwargs))
            return self.llm.generate(generation_config=config, **model_kwargs)

    def _stream(self, tokenizer, kwargs: dict[str, Any]):
        """Start generation in a thread feeding a TextIteratorStreamer (batch size 1, checked by `generate`)."""
        streamer = ChatStreamer(tokenizer, self.terminator_ids(tokenizer))

        def run() -> None:
            try:
                with torch.inference_mode():
                    self._llm_generate({**kwargs, "streamer": streamer})
            except Exception as exc:  # handed to the reading thread, which raises it
                streamer.fail(exc)

        # Not a daemon: interpreter exit waits for generation (bounded by max_new_tokens) instead of killing a
        # thread inside torch, which aborts the process.
        threading.Thread(target=run).start()
        return streamer


class MiniCPMV(MLLMModel):
    """`MLLMModel` under the official checkpoint's class name and `model_type` ("minicpmv"), so that transformers'
    Auto classes map both spellings of config.json to this implementation."""

    config_class = MiniCPMVConfig


def register_auto_models() -> None:
    """Let `AutoModel` / `AutoModelForImageTextToText.from_pretrained(model_dir)` load this model for both model
    types (called when this module is imported)."""
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        auto_class.register(MLLMConfig, MLLMModel, exist_ok=True)
        auto_class.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)


register_auto_models()
