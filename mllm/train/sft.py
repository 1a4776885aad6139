"""Supervised fine-tuning with `transformers.Trainer`: the overrides are `compute_loss` and, for length-grouped
batches, the sampler.

    model, processor = load_for_training(model_args, training_args)  # freeze flags, LoRA
    dataset = SupervisedDataset(data_args.data, processor, ...)   # labels on answer tokens only
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset,
                         data_collator=make_collator(processor, data_args), processing_class=processor)
    trainer.train()

Everything else (optimizer, schedule, gradient accumulation, checkpoints, resume, DDP/DeepSpeed, TensorBoard) is
Trainer's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, set_seed
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler

from mllm.api import load
from mllm.data.conversations import ConversationDataset, VLMCollator
from mllm.data.sft import SupervisedDataset, data_collator, split_by_length
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, check_max_image_pixels
from mllm.model.losses import sample_loss_sum, sft_loss, sft_loss_per_sample, token_loss_sum
from mllm.model.modeling import MLLMModel
from mllm.processing.processor import MLLMProcessor
from mllm.train.guards import StopOnNonFinite
from mllm.vlm import VLM, as_vlm

logger = logging.getLogger(__name__)

WEIGHTS_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""`--weights-dtype` values and the torch dtypes they load the weights in (None: decided by --bf16 / --fp16)."""

WEIGHTS_DTYPE_HELP = (
    "dtype of the weights while training: auto (bfloat16 / float16 with --bf16 / --fp16, else float32), or float32 "
    "with --bf16 / --fp16 for mixed precision (float32 weights and optimizer, half-precision autocast), or "
    "bfloat16 / float16."
)


def check_weights_dtype(name: str) -> None:
    """Reject an unknown `--weights-dtype`, naming the flag."""
    if name not in WEIGHTS_DTYPES:
        raise ValueError(f"--weights-dtype must be one of {sorted(WEIGHTS_DTYPES)}, got {name!r}")


def resolve_weights_dtype(name: str, training_args: TrainingArguments) -> torch.dtype:
    """The dtype to load a checkpoint in for training: `--weights-dtype`, or for "auto" bf16 / fp16 weights with
    --bf16 / --fp16 and float32 otherwise (transformers 5 alone would keep the dtype the file was saved in)."""
    dtype = WEIGHTS_DTYPES[name]
    if dtype is None:
        half = torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else None)
        dtype = half or torch.float32
    return dtype


MAX_IMAGE_PIXELS_HELP = (
    "Largest image (width x height) a sample may have; a bigger one or a decompression bomb is refused, naming the "
    "file and item, from its header (default 8192x8192 = mllm.io.DEFAULT_MAX_IMAGE_PIXELS)."
)

LLM_LORA_TARGETS = r"llm\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""Default LoRA targets: every linear projection of the language model (not the vision tower)."""


@dataclass
class ModelArguments:
    """Which model to train and which of its parts."""

    model: str = field(
        metadata={"help": "Model directory (config.json, weights, tokenizer, preprocessor_config.json)."}
    )
    tune_vision: bool = field(default=False, metadata={"help": "Train the vision encoder (vpm)."})
    tune_llm: bool = field(
        default=True, metadata={"help": "Train the language model (all of it, or LoRA adapters)."}
    )
    tune_resampler: bool = field(default=True, metadata={"help": "Train the resampler."})
    tune_embeddings: bool = field(
        default=True,
        metadata={
            "help": "With --tune-llm, train the LLM's token embeddings too (the output layer as well when they are "
            "tied). Off keeps the vocabulary's vectors fixed, e.g. when the projector was aligned to them."
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default=LLM_LORA_TARGETS, metadata={"help": "Regex of module names that get adapters."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    weights_dtype: str = field(default="auto", metadata={"help": WEIGHTS_DTYPE_HELP})

    def __post_init__(self) -> None:
        check_weights_dtype(self.weights_dtype)
        if self.use_lora and self.lora_r <= 0:
            raise ValueError(f"--lora-r must be positive, got {self.lora_r}")
        if not (self.tune_vision or self.tune_llm or self.tune_resampler or self.use_lora):
            raise ValueError(
                "nothing to train: --tune-vision, --tune-llm, --tune-resampler and --use-lora are all off"
            )


@dataclass
class DataArguments:
    """Where the data is and how long a sample may be."""

    data: str = field(metadata={"help": "Training data in the SFT JSON format."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation data in the same format."})
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder that image paths are relative to (default: the JSON file's folder)."},
    )
    max_length: int = field(
        default=2048, metadata={"help": "Longest sample in tokens (image placeholders included)."}
    )
    max_slice_nums: int | None = field(
        default=None, metadata={"help": "Override the processor's max_slice_nums."}
    )
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={"help": MAX_IMAGE_PIXELS_HELP})

    def __post_init__(self) -> None:
        check_max_image_pixels(self.max_image_pixels)
        if self.max_length <= 0:
            raise ValueError(f"--max-length must be positive, got {self.max_length}")
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')}: file not found: {path}")


def default_training_arguments(**overrides: Any) -> dict[str, Any]:
    """Trainer settings this framework relies on (the command line may still override them)."""
    base = {
        "remove_unused_columns": False,  # our samples are dicts of tensors and lists, not a datasets.Dataset
        "label_names": ["labels"],
        "prediction_loss_only": True,  # never gather [N, T, V] logits during evaluation
        "report_to": ["tensorboard"],
        "logging_steps": 10,
        "save_safetensors": True,
    }
    base.update(overrides)
    return base


def sft_forward(model, batch: dict[str, Any]):
    """The model's outputs on an SFT batch: ours (`data_collator`) or another family's (`VLMCollator`, whose forward
    keywords are under "inputs"); the labels stay out of the forward."""
    if "inputs" in batch:  # another family's batch (mllm.data.conversations): its forward keywords
        return model(**batch["inputs"], use_cache=False)
    return model({k: v for k, v in batch.items() if k != "labels"})


def loss_sums_by_length(
    model, batch: dict[str, Any], pieces: int, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) of a `data_collator` batch from one forward per `split_by_length` piece: the per-sample
    parts (`sample_loss_sum`) or the token parts (`token_loss_sum`), added over the pieces for the caller to
    divide."""
    loss_sum = sample_loss_sum if per_sample else token_loss_sum
    total, count = 0.0, 0
    for piece in split_by_length(batch, pieces):
        piece_total, piece_count = loss_sum(sft_forward(model, piece).logits, piece["labels"])
        total, count = total + piece_total, count + piece_count
    return total, count


def attach_vision_cache(model: torch.nn.Module, cache_mb: int, deepspeed: bool) -> None:
    """`--vision-cache-mb`: the frozen tower's outputs reused per slice (`mllm.model.vision_cache`), refused where
    the rows could go stale (a trainable tower, dropout), under DeepSpeed, and for the other families."""
    base = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # under LoRA: the wrapped model
    if not isinstance(base, MLLMModel):
        raise ValueError(
            f"--vision-cache-mb serves this framework's MiniCPM-V model, not {type(base).__name__}"
        )
    if deepspeed:
        raise ValueError(
            "--vision-cache-mb is not supported with --deepspeed: ZeRO gathers the tower's weights as its modules "
            "run, and the cache skips them"
        )
    try:
        base.attach_vision_cache(cache_mb * 2**20)
    except ValueError as err:
        raise ValueError(f"--vision-cache-mb: {err}") from err


class SFTTrainer(Trainer):
    """Trainer whose loss is next-token cross-entropy on answer tokens: by default normalised over the target tokens
    of the accumulated batch; with `--loss-reduction sample` each conversation's mean token loss counts once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(StopOnNonFinite())
        cache_mb = getattr(self.args, "vision_cache_mb", 0)
        if cache_mb:
            attach_vision_cache(self.model, cache_mb, self.is_deepspeed_enabled)
        self.per_sample_loss = getattr(self.args, "loss_reduction", "token") == "sample"
        if self.per_sample_loss:
            # a mean over one micro-batch's samples: Trainer must divide it by the accumulation steps
            self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pieces = getattr(self.args, "length_pieces", 1)
        if pieces > 1 and "inputs" in inputs:
            raise ValueError(
                "--length-pieces splits this framework's MiniCPM-V batches; another family's batch runs whole (use 1)"
            )
        if pieces > 1 and not return_outputs:  # evaluation (return_outputs) runs the whole batch
            outputs = None
            loss = self.loss_by_length(model, inputs, pieces, num_items_in_batch)
        else:
            outputs = sft_forward(model, inputs)
            if self.per_sample_loss:
                loss = sft_loss_per_sample(outputs.logits, inputs["labels"])
            else:
                loss = sft_loss(outputs.logits, inputs["labels"], num_items_in_batch)
        if (
            not self.per_sample_loss
            and self.args.average_tokens_across_devices
            and num_items_in_batch is not None
        ):
            # num_items_in_batch counts the targets of every process and DDP averages the processes' gradients:
            # scale back up so that the step is the one of the whole global batch (as Trainer's own loss path)
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def loss_by_length(self, model, inputs, pieces: int, num_items_in_batch=None) -> torch.Tensor:
        """`--length-pieces`: the batch's loss from forwards on `pieces` groups of samples of similar length
        (`split_by_length`), each padded only to its own longest; the same loss and gradients as one forward on
        the whole batch, up to rounding."""
        total, count = loss_sums_by_length(model, inputs, pieces, self.per_sample_loss)
        if not self.per_sample_loss and num_items_in_batch is not None:
            count = num_items_in_batch  # the targets of the whole accumulated batch, as `sft_loss` divides
        return total / torch.as_tensor(count, device=total.device).clamp(min=1).to(total.dtype)

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the vision tower's parameters in groups of their own at
        `--vision-learning-rate` (the schedule scales every group alike)."""
        already = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        vision_lr = getattr(self.args, "vision_learning_rate", None)
        if vision_lr is None or already:
            return optimizer
        opt_model = self.model if model is None else model
        vision = {id(p) for name, p in opt_model.named_parameters() if is_vision_parameter(name)}
        groups = []
        for group in optimizer.param_groups:
            for in_vision in (False, True):
                params = [p for p in group["params"] if (id(p) in vision) == in_vision]
                if params:
                    groups.append({**group, "params": params, "lr": vision_lr if in_vision else group["lr"]})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def _get_train_sampler(self, train_dataset=None):
        """`--train-sampling-strategy group_by_length` with the lengths the dataset already knows (Trainer's own
        path would load every sample, images included, to measure it); anything else is Trainer's."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(
            dataset, ConversationDataset
        ):
            raise ValueError(
                "--train-sampling-strategy group_by_length: another family's items have no length before its "
                "processor expands their images (at batch time); use the default sampling"
            )
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)


def set_family_trainable(vlm: VLM, args: ModelArguments) -> None:
    """The freeze flags on another family's groups (`VLM.parameter_groups`): --tune-vision the vision tower,
    --tune-resampler the projector (LLaVA's multi_modal_projector, Qwen2-VL's merger, BLIP-2's Q-Former, query
    tokens and language projection), --tune-llm the language model (frozen under LoRA, which adds adapters)."""
    vlm.freeze(
        vision=not args.tune_vision, projector=not args.tune_resampler, llm=not args.tune_llm or args.use_lora
    )


def family_lora_config(vlm: VLM, args: ModelArguments):
    """peft LoRA settings for another family: adapters on the LLM group's linear layers (the output head excepted)
    unless --lora-target-modules names others; the modules of the vision and projector groups being tuned are
    saved beside the adapter. A group member that is a bare parameter (BLIP-2's query_tokens, OneVision's
    image_newline) cannot be saved by peft: it stays frozen under LoRA, and the log says so."""
    from peft import LoraConfig

    if args.lora_target_modules == LLM_LORA_TARGETS:
        head = {
            name for name, module in vlm.model.named_modules() if module is vlm.model.get_output_embeddings()
        }
        targets: str | list[str] = [
            name
            for name, module in vlm.model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in head and vlm.group_of(name + ".") == "llm"
        ]
    else:
        targets = args.lora_target_modules
    saved: list[str] = []
    groups = vlm.parameter_groups()
    for group, on in (("vision", args.tune_vision), ("projector", args.tune_resampler)):
        for prefix in groups[group] if on else ():
            name = prefix.rstrip(".")
            if any(name.startswith(kept + ".") for kept in saved):
                continue  # inside a module already saved whole (Qwen2-VL's merger in its visual tower)
            if _is_module(vlm.model, name):
                saved.append(name)
            else:
                logger.warning(
                    "LoRA: %s of the %s model is a bare parameter; it stays frozen", name, vlm.family
                )
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=saved or None,
        bias="none",
    )


def _is_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def is_vision_parameter(name: str) -> bool:
    """Whether a parameter name (of the model, or of its peft or DDP wrapper) belongs to the vision tower `vpm`."""
    return name.startswith("vpm.") or ".vpm." in name


def set_trainable(model: torch.nn.Module, args: ModelArguments) -> None:
    """requires_grad by component: `vpm`, `llm`, `resampler` (LoRA adapters are added after this)."""
    model.vpm.requires_grad_(args.tune_vision)
    model.resampler.requires_grad_(args.tune_resampler)
    model.llm.requires_grad_(args.tune_llm and not args.use_lora)
    if not args.tune_embeddings:
        model.llm.get_input_embeddings().requires_grad_(False)
        model.llm.get_output_embeddings().requires_grad_(False)


def apply_lora(model: torch.nn.Module, args: ModelArguments) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters; fully trained parts are saved with the adapter."""
    from peft import LoraConfig, get_peft_model

    modules_to_save = [
        name for name, on in (("resampler", args.tune_resampler), ("vpm", args.tune_vision)) if on
    ]
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    return get_peft_model(model, config)


@contextmanager
def full_weights_on_load() -> Iterator[None]:
    """Under `--deepspeed` ZeRO-3 before DeepSpeed's communication is set up (CPU training: accelerate opens a torch
    process group, DeepSpeed's own comes later), load whole weights, as our loader always does: transformers'
    from_pretrained (the other families) would build the model inside `deepspeed.zero.Init`, which then takes the world
    size as 1 (DeepSpeed's batch-size assertion stopped both processes of a torchrun launch). DeepSpeed partitions the
    weights when Trainer starts it, as for ours. Where it is set up (GPUs), zero.Init partitions while loading, as
    transformers intends."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed.comm  # installed: ZeRO-3 is on

    if deepspeed.comm.is_initialized():
        yield
        return
    # the object registered (by TrainingArguments, or accelerate's copy of it): transformers keeps only a weakref
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def load_for_training(
    args: ModelArguments, training_args: TrainingArguments, max_slice_nums: int | None = None
):
    """Model (with freeze flags and optional LoRA) and processor from a model directory, in `--weights-dtype` (by
    default the dtype the training arguments ask for: bf16/fp16 weights, else float32), on the CPU until Trainer
    places it; gradient checkpointing non-reentrant by default. `max_slice_nums` overrides the processor's
    slicing."""
    set_seed(
        training_args.seed
    )  # what is made before Trainer seeds itself (LoRA adapters) must not vary by run
    torch_dtype = resolve_weights_dtype(args.weights_dtype, training_args)
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    with full_weights_on_load():
        model, processor = load(
            args.model, "cpu", torch_dtype, args.attn_implementation, max_slice_nums=max_slice_nums
        )
    model.train()
    if isinstance(model, MLLMModel):
        set_trainable(model, args)
        if args.use_lora:
            model = apply_lora(model, args)
    else:
        vlm = as_vlm(model, processor)
        set_family_trainable(vlm, args)
        if args.use_lora:
            from peft import get_peft_model

            model = get_peft_model(model, family_lora_config(vlm, args))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
    return model, processor


def make_collator(processor, data_args: DataArguments, model: torch.nn.Module | None = None):
    """Our `data_collator`, or for another family (`model` then needed) its `VLMCollator`."""
    if isinstance(processor, MLLMProcessor):
        return partial(data_collator, pad_token_id=processor.pad_token_id, max_length=data_args.max_length)
    return VLMCollator(as_vlm(model, processor), data_args.max_length, "--data / --eval-data")


def sft_dataset(path: str, processor, data_args: DataArguments) -> Dataset:
    """The SFT data tokenized by our processor (`SupervisedDataset`), or as conversations for another family."""
    if isinstance(processor, MLLMProcessor):
        return SupervisedDataset(
            path, processor, data_args.image_folder, data_args.max_length, data_args.max_image_pixels
        )
    return ConversationDataset(path, data_args.image_folder, data_args.max_image_pixels)


def build_sft_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    trainer_cls: type[Trainer] = SFTTrainer,
) -> Trainer:
    model, processor = load_for_training(model_args, training_args, data_args.max_slice_nums)
    train = sft_dataset(data_args.data, processor, data_args)
    evaluation = sft_dataset(data_args.eval_data, processor, data_args) if data_args.eval_data else None
    return trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=make_collator(processor, data_args, model),
        processing_class=processor,
    )
