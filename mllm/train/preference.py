"""Preference alignment (NCA pair loss, DPO or IPO) with `transformers.Trainer`: only `compute_loss`,
`prediction_step` (evaluation scores held-out pairs with the same loss) and the public `log` hook (to add the
averaged reward metrics) are overridden.

    mllm logp --model SFT_DIR --data preference_train.json --out ref.jsonl          # reference log-probs, once
    mllm train preference --model SFT_DIR --data preference_train.json --logps ref.jsonl --output-dir OUT

A batch holds B pairs as 2B rows (chosen, then rejected) that go through the model in one forward; the B images
go through the vision tower once and their resampler rows are used by both rows of their pair. The reference
model is never loaded during training: its log-probs come from the precomputed file (checked against the data).
With `--replay-data`, each training batch also carries a batch of SFT conversations whose cross-entropy is added to
the loss (a replay of skills the pairs do not exercise, like InstructGPT's pretraining mix). Everything else
(optimizer, schedule, accumulation, checkpoints, resume, DDP/DeepSpeed, TensorBoard) is Trainer's.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from mllm.data.conversations import preference_data
from mllm.data.preference import PreferenceDataset
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, check_max_image_pixels
from mllm.train.curves import plot_curves_after_training
from mllm.train.guards import StopOnNonFinite
from mllm.train.logps import compute_reference_logps, concatenated_forward, load_reference_logps
from mllm.train.losses import IGNORE_INDEX, PREFERENCE_LOSS_TYPES, preference_loss, sft_loss_per_sample
from mllm.train.runner import MLLMTrainingArguments, check_output_dir, resolve_resume
from mllm.train.sft import (
    MAX_IMAGE_PIXELS_HELP,
    DataArguments,
    ModelArguments,
    attach_vision_cache,
    load_for_training,
    make_collator,
    sft_dataset,
    sft_forward,
)

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.jsonl"
EVAL_REFERENCE_FILE = "eval_reference_logps.jsonl"
CURVES_PNG = "preference_curves.png"
CURVE_KEYS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "eval_loss",
    "eval_rewards/margins",
]
"""What the curves PNG shows (the eval_ ones only when --eval-data was given)."""


@dataclass
class PreferenceArguments:
    """Preference data, reference log-probs and the loss."""

    data: str = field(
        metadata={"help": "Preference data (RLAIF-V JSON: idx, question, chosen, rejected, image)."}
    )
    logps: str | None = field(
        default=None,
        metadata={
            "help": "Reference log-prob file from `mllm logp`. Default: computed with the initial model into "
            f"OUTPUT_DIR/{REFERENCE_FILE} (resumable), unless every item carries inline `logps`."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out preference pairs in the same format, scored with the same loss at each evaluation "
            "(--eval-strategy steps --eval-steps N): eval_loss and eval_rewards/* in the log and the curves."
        },
    )
    eval_logps: str | None = field(
        default=None,
        metadata={
            "help": "Reference log-prob file for --eval-data. Default: computed with the initial model into "
            f"OUTPUT_DIR/{EVAL_REFERENCE_FILE} (resumable), unless every item carries inline `logps`."
        },
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder that image_path values are relative to (default: the JSON's)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Longest sequence in tokens (image included)."})
    max_slice_nums: int | None = field(
        default=None, metadata={"help": "Override the processor's max_slice_nums."}
    )
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={"help": MAX_IMAGE_PIXELS_HELP})
    beta: float = field(
        default=0.1,
        metadata={
            "help": "Reward scale r = beta * (log pi - log pi_ref). 0.1 (DPO's and RLAIF-V's value) suits summed "
            "log-probs of responses of tens to hundreds of tokens: a 10-nat change moves the reward by 1, where "
            "the sigmoids are still far from saturation. Raise it (e.g. 1-5) with --use-average-logp."
        },
    )
    loss_type: str = field(
        default="nca_pair",
        metadata={"help": f"One of {', '.join(PREFERENCE_LOSS_TYPES)} (nca_pair: the exercise's)."},
    )
    use_average_logp: bool = field(
        default=False,
        metadata={"help": "Use per-token average log-probs instead of sums (length-normalised)."},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an SFT term (token-mean cross-entropy on the chosen response); 0 = off."
        },
    )
    replay_data: str | None = field(
        default=None,
        metadata={
            "help": "SFT conversations (the SFT JSON format) replayed during training: every training micro-batch "
            "adds --replay-weight x the cross-entropy of --replay-batch-size of them (each conversation's mean "
            "token loss counting once), so that skills the pairs do not exercise (boxes, short answers) are not "
            "forgotten; drawn in a seeded order that a resumed run continues. Images are relative to "
            "--image-folder (default: this file's folder)."
        },
    )
    replay_weight: float = field(default=1.0, metadata={"help": "Weight of the --replay-data term."})
    replay_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Replayed conversations per micro-batch and process (default: --per-device-train-batch-size)."
        },
    )
    logp_batch_size: int = field(
        default=4, metadata={"help": "Pairs per batch when the reference log-probs are computed here."}
    )

    def __post_init__(self) -> None:
        check_max_image_pixels(self.max_image_pixels)
        if not Path(self.data).is_file():
            raise ValueError(f"--data: file not found: {self.data}")
        if self.logps is not None and not Path(self.logps).is_file():
            raise ValueError(f"--logps: file not found: {self.logps} (omit --logps to compute it)")
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            raise ValueError(f"--eval-data: file not found: {self.eval_data}")
        if self.eval_logps is not None and self.eval_data is None:
            raise ValueError("--eval-logps needs --eval-data (the pairs it belongs to)")
        if self.eval_logps is not None and not Path(self.eval_logps).is_file():
            raise ValueError(f"--eval-logps: file not found: {self.eval_logps} (omit it to compute it)")
        if self.loss_type not in PREFERENCE_LOSS_TYPES:
            raise ValueError(
                f"--loss-type must be one of {', '.join(PREFERENCE_LOSS_TYPES)}, got {self.loss_type!r}"
            )
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"--sft-weight must be >= 0, got {self.sft_weight}")
        if self.replay_data is not None and not Path(self.replay_data).is_file():
            raise ValueError(f"--replay-data: file not found: {self.replay_data}")
        if self.replay_weight <= 0:
            raise ValueError(f"--replay-weight must be positive, got {self.replay_weight}")
        if self.replay_batch_size is not None and self.replay_batch_size <= 0:
            raise ValueError(f"--replay-batch-size must be positive, got {self.replay_batch_size}")
        if self.max_length <= 0 or self.logp_batch_size <= 0:
            raise ValueError("--max-length and --logp-batch-size must be positive")


def replay_indices(
    n_items: int, batch_size: int, call: int, rank: int, world_size: int, seed: int
) -> list[int]:
    """Items of the replay batch of training micro-batch `call` (counted from 0 over the whole run) on process
    `rank`: consecutive windows of an endless walk through seeded permutations of the items (one per pass), the
    processes taking turns, so that no item repeats within a pass and a resumed run draws what the unbroken run
    would have."""
    if n_items <= 0:
        raise ValueError("the replay data hold no items")
    start = (call * world_size + rank) * batch_size
    indices, order, epoch = [], None, None
    for position in range(start, start + batch_size):
        pass_index, offset = divmod(position, n_items)
        if pass_index != epoch:
            order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + pass_index))
            epoch = pass_index
        indices.append(int(order[offset]))
    return indices


def refuse_length_pieces(args: TrainingArguments) -> None:
    """`--length-pieces` (an SFT flag of the shared arguments) would do nothing here: refuse it."""
    if getattr(args, "length_pieces", 1) > 1:
        raise ValueError("--length-pieces serves `mllm train sft`; preference training runs each batch whole")


class PreferenceTrainer(Trainer):
    """Trainer whose loss is a preference loss over (chosen, rejected) pairs against precomputed reference
    log-probs, plus an optional SFT term on the chosen response and an optional replay of SFT conversations.

    The loss is a mean over the pairs of a micro-batch, so Trainer divides it by the accumulation steps
    (`loss_is_scaled_for_ga = False`, and no target-token counting)."""

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        preference_args: PreferenceArguments,
        replay_dataset: Any = None,
        replay_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        refuse_length_pieces(self.args)
        self.add_callback(StopOnNonFinite())
        if getattr(self.args, "vision_cache_mb", 0):
            attach_vision_cache(self.model, self.args.vision_cache_mb, self.is_deepspeed_enabled)
        self.preference_args = preference_args
        if (replay_dataset is None) != (replay_collator is None):
            raise ValueError("a replay dataset needs its collator, and a collator its dataset")
        self.replay_dataset, self.replay_collator = replay_dataset, replay_collator
        self._replay_at = (-1, -1)  # (global step, micro-batch within it) of the last replay batch
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._eval_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.preference_step(model, inputs)
        if model.training and self.replay_dataset is not None:
            replay = self.replay_loss(model)
            metrics.setdefault("loss/preference", loss.detach())
            metrics["loss/replay"] = replay.detach()
            loss = loss + self.preference_args.replay_weight * replay
        if model.training:
            for key, value in metrics.items():
                self._metrics[key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss of a held-out batch (no logits); its reward metrics go to the next eval log."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.preference_step(model, inputs)
        for key, value in metrics.items():
            self._eval_metrics[key].append(value)
        return loss.detach(), None, None

    def preference_step(self, model, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached batch-mean metrics) of one concatenated batch."""
        args = self.preference_args
        suffix = "_avg_logps" if args.use_average_logp else "_logps"
        if "ref_chosen" + suffix not in inputs:
            raise ValueError(f"batch {inputs.get('idx')} has no reference log-probs (see --logps)")
        result = concatenated_forward(model, inputs)
        n = len(inputs["idx"])
        policy = result.averages if args.use_average_logp else result.sums  # [2B]
        ref_chosen = inputs["ref_chosen" + suffix].to(policy.device)  # [B]
        ref_rejected = inputs["ref_rejected" + suffix].to(policy.device)  # [B]
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy[:n], policy[n:], ref_chosen, ref_rejected, args.beta, args.loss_type
        )
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy[:n].detach().mean(),
            "logps/rejected": policy[n:].detach().mean(),
            "logps/ref_chosen": ref_chosen.mean(),
            "logps/ref_rejected": ref_rejected.mean(),
        }
        if args.sft_weight > 0:
            n_tokens = (inputs["labels"][:n, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            sft = -result.per_token[:n].sum() / n_tokens  # token-mean cross-entropy of the chosen responses
            metrics["loss/preference"] = loss.detach()
            metrics["loss/sft"] = sft.detach()
            loss = loss + args.sft_weight * sft
        return loss, metrics

    def replay_loss(self, model) -> torch.Tensor:
        """Cross-entropy (per-sample mean) of this micro-batch's replayed conversations. The micro-batch is counted
        from the global step, so a run resumed from a checkpoint draws the batches the unbroken run would have."""
        step = self.state.global_step
        micro = self._replay_at[1] + 1 if self._replay_at[0] == step else 0
        self._replay_at = (step, micro)
        call = step * self.args.gradient_accumulation_steps + micro
        size = self.preference_args.replay_batch_size or self.args.per_device_train_batch_size
        indices = replay_indices(
            len(self.replay_dataset),
            size,
            call,
            self.args.process_index,
            self.args.world_size,
            self.args.seed,
        )
        batch = self._prepare_inputs(self.replay_collator([self.replay_dataset[i] for i in indices]))
        return sft_loss_per_sample(sft_forward(model, batch).logits, batch["labels"])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics averaged since the last training log (or over the evaluation), and over processes."""
        if "loss" in logs and self._metrics:
            logs = {**logs, **self._averaged(self._metrics, "")}
        if "eval_loss" in logs and self._eval_metrics:
            logs = {**logs, **self._averaged(self._eval_metrics, "eval_")}
        super().log(logs, start_time)

    def _averaged(self, store: dict[str, list[torch.Tensor]], prefix: str) -> dict[str, float]:
        """Means of the stored batch metrics (emptying the store), named prefix + key."""
        keys = sorted(store)
        means = torch.stack([torch.stack(store[k]).float().mean() for k in keys])  # [K]
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        store.clear()
        return {prefix + k: round(v, 6) for k, v in zip(keys, means.tolist())}


def attach_reference(
    model: torch.nn.Module,
    dataset: PreferenceDataset,
    logps: str | None,
    default_file: str,
    model_args: ModelArguments,
    pref_args: PreferenceArguments,
    training_args: TrainingArguments,
) -> None:
    """Load the reference log-probs from `logps`, or first compute them with the initial model (each process its
    share) into OUTPUT_DIR/default_file; items that all carry inline log-probs need neither."""
    inline = all(pair.reference is not None for pair in dataset.pairs)
    if logps is None and inline:
        logger.info("using the reference log-probs carried by the items of %s", dataset.data_path)
        return
    path = Path(logps) if logps else Path(training_args.output_dir) / default_file
    if logps is None:
        logger.info(
            "no reference log-probs given for %s: computing them with the initial model into %s",
            dataset.data_path,
            path,
        )
        model.to(training_args.device)
        compute_reference_logps(
            model,
            dataset,
            path,
            model_args.model,
            batch_size=pref_args.logp_batch_size,
            rank=training_args.process_index,
            world_size=training_args.world_size,
        )
    load_reference_logps(path, dataset, tokenizer_dir=model_args.model)


def build_preference_trainer(
    model_args: ModelArguments, pref_args: PreferenceArguments, training_args: TrainingArguments
) -> PreferenceTrainer:
    refuse_length_pieces(training_args)  # before the reference log-probs are computed
    model, processor = load_for_training(model_args, training_args, pref_args.max_slice_nums)

    def pairs(data: str, logps: str | None, default_file: str) -> PreferenceDataset:
        dataset = preference_data(
            data, model, processor, pref_args.image_folder, pref_args.max_length, pref_args.max_image_pixels
        )
        attach_reference(model, dataset, logps, default_file, model_args, pref_args, training_args)
        return dataset

    train = pairs(pref_args.data, pref_args.logps, REFERENCE_FILE)
    held_out = (
        pairs(pref_args.eval_data, pref_args.eval_logps, EVAL_REFERENCE_FILE) if pref_args.eval_data else None
    )
    replay, replay_collator = None, None
    if pref_args.replay_data:
        replay_args = DataArguments(
            data=pref_args.replay_data,
            image_folder=pref_args.image_folder,
            max_length=pref_args.max_length,
            max_image_pixels=pref_args.max_image_pixels,
        )
        replay = sft_dataset(pref_args.replay_data, processor, replay_args)
        replay_collator = make_collator(processor, replay_args, model)
    return PreferenceTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=train.collator(),
        processing_class=processor,
        preference_args=pref_args,
        replay_dataset=replay,
        replay_collator=replay_collator,
    )


def parse_preference_args(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, PreferenceArguments, MLLMTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str]) -> int:
    """`mllm train preference [flags]`: train, save the model and state, plot loss/rewards/margins vs step."""
    model_args, pref_args, training_args = parse_preference_args(argv)
    check_output_dir(training_args)
    trainer = build_preference_trainer(model_args, pref_args, training_args)
    trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        png = plot_curves_after_training(out, CURVE_KEYS, out / CURVES_PNG)
        logger.info("preference training done: model in %s, curves in %s", out, png)
    return 0
