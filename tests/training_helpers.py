"""TrainingArguments for tiny deterministic CPU training runs in tests."""

from __future__ import annotations

from pathlib import Path


def cpu_training_args(out: Path, **overrides):
    """Deterministic CPU settings (constant lr, no warm-up or decay, no saving, every step logged); keyword
    arguments override any TrainingArguments field."""
    from mllm.train.runner import MLLMTrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
    )
    base.update(overrides)
    return MLLMTrainingArguments(**base)
