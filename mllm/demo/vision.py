"""Demo stage `vision`: the random model's tower learns the toy world's boxes before SFT (`mllm train vision`).

It reads the world's COCO-format instances (shape = category, `color` = attribute) and trains the tower with
per-token labels and, with `vision_align_rows`, the projector with rows aligned to the shape and colour words
(mllm/toy/pretrain.py), resumable from its checkpoints; the held-out object-token accuracy of the shape, colour and
box heads is the stage's figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm.demo.build import init_model_dir, world_dir
from mllm.demo.config import DemoConfig
from mllm.demo.stages import training_arguments

VISION_STAGE = "vision"


def vision_model_dir(config: DemoConfig) -> Path:
    return config.out / VISION_STAGE / "model"


def pretrained_model_dir(config: DemoConfig) -> Path:
    """The model that the SFT stages start from: the one with the trained tower, or the random one."""
    return vision_model_dir(config) if config.vision_steps > 0 else init_model_dir(config)


def train_vision_stage(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """`mllm train vision` in the demo's training processes; the loss curve goes to folder/loss.png."""
    from mllm.train.curves import plot_curves
    from mllm.train.launch import run_in_processes

    figures = run_in_processes(
        fit_vision, (config,), config.training_processes(), config.threads_per_process()
    )
    plot_curves(vision_model_dir(config), ["loss"], folder / "loss.png")
    return figures


def fit_vision(config: DemoConfig) -> dict[str, Any]:
    """One training process of the `vision` stage, resumed from the newest checkpoint."""
    from mllm.toy.pretrain import VisionPretrainArguments, train_vision
    from mllm.toy.world import REGION_WORDS
    from mllm.train.runner import resolve_resume

    annotations = world_dir(config) / "coco" / "annotations"
    args = VisionPretrainArguments(
        model=str(init_model_dir(config)),
        instances=str(annotations / "instances_train2014.json"),
        image_folder=str(world_dir(config)),
        attribute="color",
        eval_instances=str(annotations / "instances_val2014.json"),
        eval_limit=config.n_test,
        align_rows=config.vision_align_rows,
        row_boxes=config.vision_row_boxes,
        region_words=",".join(REGION_WORDS) if config.vision_align_regions else None,
        weights_dtype="float32",  # with `bf16`: autocast over float32 weights
        attn_implementation=config.attn_implementation,
    )
    training_args = training_arguments(
        config,
        vision_model_dir(config),
        config.vision_steps,
        config.vision_batch_size,
        config.vision_lr,
        save_total_limit=1,
        bf16=config.uses_bf16(),
    )
    resume = resolve_resume(training_args)  # the newest checkpoint in the output folder, if any
    figures = train_vision(args, training_args, resume)
    summary = (
        f"{figures['steps']} steps, loss {figures['first_loss']:.3f} -> {figures['final_loss']:.3f}; held-out object "
        f"tokens: shape {figures['category_accuracy']:.1%}, colour {figures['attribute_accuracy']:.1%}, box IoU >= 0.5 "
        f"{figures['box_accuracy']:.1%}"
    )
    return {
        **figures,
        "resumed_from": Path(resume).name if resume else None,
        "loss_png": "loss.png",
        "summary": summary,
    }
