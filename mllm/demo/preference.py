"""Demo stages for preference alignment: reference log-probs of the SFT model, then NCA training (resumable).

They call what `mllm logp` and `mllm train preference` call (`compute_reference_logps`, `build_preference_trainer`)
on the toy world's RLAIF-V-format pairs (chosen = a correct description, rejected = one with an absent shape).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mllm.demo.build import world_dir
from mllm.demo.config import DemoConfig
from mllm.demo.sft import sft_data_path, sft_model_dir
from mllm.demo.stages import training_arguments

logger = logging.getLogger(__name__)

LOGPS_STAGE = "logps"
PREFERENCE_STAGE = "preference"


def preference_data(config: DemoConfig) -> Path:
    return world_dir(config) / "preference" / "preference_train.json"


def logps_path(config: DemoConfig) -> Path:
    return config.out / LOGPS_STAGE / "reference_logps.jsonl"


def preference_model_dir(config: DemoConfig) -> Path:
    return config.out / PREFERENCE_STAGE / "model"


def replay_data_path(config: DemoConfig) -> Path:
    return config.out / PREFERENCE_STAGE / "replay_rec.json"


def write_replay_data(config: DemoConfig) -> int:
    """The REC conversations of the mixed SFT file (ids "rec:..."), for `preference_replay_rec`; their count."""
    from mllm.io import read_json, write_json_atomic

    rec = [item for item in read_json(sft_data_path(config)) if str(item.get("id", "")).startswith("rec:")]
    if not rec:
        raise ValueError(f"{sft_data_path(config)}: no REC conversations (ids 'rec:...') to replay")
    write_json_atomic(replay_data_path(config), rec, indent=None)
    return len(rec)


def compute_logps(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """Reference log-probs of every pair under the SFT model (resumable: finished pairs are kept)."""
    import json

    from mllm.api import load
    from mllm.data.preference import PreferenceDataset
    from mllm.train.logps import compute_reference_logps

    model_dir = sft_model_dir(config)
    model, processor = load(model_dir, config.torch_device(), "float32")
    dataset = PreferenceDataset(preference_data(config), processor, world_dir(config), 512)
    out = compute_reference_logps(
        model, dataset, logps_path(config), model_dir, batch_size=8, pad_token_id=processor.pad_token_id
    )
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    chosen = sum(r["chosen_logp"] for r in lines) / len(lines)
    rejected = sum(r["rejected_logp"] for r in lines) / len(lines)
    preferred = sum(r["chosen_logp"] > r["rejected_logp"] for r in lines) / len(lines)
    return {
        "pairs": len(lines),
        "mean_chosen_logp": chosen,
        "mean_rejected_logp": rejected,
        "chosen_more_likely": preferred,
        "summary": f"{len(lines)} pairs: mean log p(chosen) {chosen:.2f}, log p(rejected) {rejected:.2f}; "
        f"chosen more likely in {100 * preferred:.0f}% of pairs",
    }


def train_preference(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """NCA (the exercise's pair loss) from the SFT model in the demo's training processes; vision tower frozen, LLM
    trained (its embeddings unless `preference_tune_embeddings` is off), the resampler too unless
    `preference_tune_resampler` is off; with `preference_replay_rec`, the SFT's REC conversations replayed. Curves go
    to folder/loss.png and folder/rewards.png."""
    from mllm.train.curves import plot_curves
    from mllm.train.launch import run_in_processes
    from mllm.train.preference import CURVE_KEYS

    if config.preference_replay_rec > 0:
        logger.info("%d REC conversations to replay", write_replay_data(config))
    figures = run_in_processes(
        fit_preference, (config, folder / "run"), config.training_processes(), config.threads_per_process()
    )
    plot_curves(folder / "run", ["loss"], folder / "loss.png")
    plot_curves(
        folder / "run",
        [k for k in CURVE_KEYS if k.startswith("rewards/") and k != "rewards/accuracies"],
        folder / "rewards.png",
    )
    return figures


def fit_preference(config: DemoConfig, run_dir: Path) -> dict[str, Any]:
    """One training process of the `preference` stage (`mllm train preference`'s Trainer), resumed from the newest
    checkpoint."""
    from mllm.train.preference import PreferenceArguments, build_preference_trainer
    from mllm.train.runner import resolve_resume
    from mllm.train.sft import ModelArguments

    args = training_arguments(
        config,
        run_dir,
        config.preference_steps,
        config.preference_batch_size,
        config.preference_lr,
        lr_scheduler_type="constant_with_warmup",
        logging_steps=min(5, max(1, config.preference_steps // 20)),
        save_steps=50,
        save_total_limit=1,
    )
    trainer = build_preference_trainer(
        ModelArguments(
            model=str(sft_model_dir(config)),
            attn_implementation=config.attn_implementation,
            tune_resampler=config.preference_tune_resampler,
            tune_embeddings=config.preference_tune_embeddings,
        ),
        PreferenceArguments(
            data=str(preference_data(config)),
            logps=str(logps_path(config)),
            image_folder=str(world_dir(config)),
            max_length=512,
            beta=config.preference_beta,
            loss_type=config.preference_loss,
            replay_data=str(replay_data_path(config)) if config.preference_replay_rec > 0 else None,
            replay_weight=config.preference_replay_rec or 1.0,
        ),
        args,
    )
    resume = resolve_resume(args)  # the newest checkpoint in run_dir, if any
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(preference_model_dir(config)))
    trainer.save_state()
    logs = [row for row in trainer.state.log_history if "rewards/margins" in row]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    margin0, margin1 = first.get("rewards/margins", float("nan")), last.get("rewards/margins", float("nan"))
    return {
        "steps": trainer.state.global_step,
        "resumed_from": Path(resume).name if resume else None,
        "first_loss": first.get("loss"),
        "final_loss": last.get("loss"),
        "first_margin": margin0,
        "final_margin": margin1,
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "summary": f"{trainer.state.global_step} steps, reward margin {margin0:.2f} -> {margin1:.2f}, "
        f"loss {first.get('loss', float('nan')):.3f} -> {last.get('loss', float('nan')):.3f}",
    }
