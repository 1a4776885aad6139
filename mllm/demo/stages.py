"""Stage bookkeeping of `mllm demo`: one folder per stage, a `done.json` marker when it finished, skip on re-run.

Why markers rather than "the output exists": a stage killed halfway leaves partial outputs (a half-trained run, an
answers file with 40 of 300 lines). Only `done.json`, written atomically as the stage's last act, says the outputs
are complete; a stage without it runs again and resumes from whatever its own tools can resume (Trainer
checkpoints, answers files that skip finished items).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mllm.demo.config import DemoConfig
from mllm.files import write_json_atomic

logger = logging.getLogger(__name__)

DONE = "done.json"
CONFIG_FILE = "demo_config.json"


class DemoInterrupted(RuntimeError):
    """Raised by the testing hook `DemoConfig.sft_interrupt_after`: the demo stops as if it had been killed."""


@dataclass
class StageRecord:
    """What `done.json` holds: the stage's figures and how long it took."""

    name: str
    """Stage name (also its folder name)."""
    seconds: float
    """Wall time of the run that finished it (an earlier interrupted attempt is not counted)."""
    figures: dict[str, Any]
    """The stage's numbers; `summary` is its one-line summary."""
    skipped: bool = False
    """True when this run found the stage already done."""


def check_config(config: DemoConfig) -> None:
    """Record the settings in OUT/demo_config.json; refuse to continue a folder made with other settings.

    A folder made before a field existed lacks it; such a field counts as stored at its default, which by
    convention keeps what the demo did before the field was added (`DemoConfig`). A missing field set to another
    value, or a stored field the code no longer knows, is refused like any other difference."""
    path = config.out / CONFIG_FILE
    wanted = json.loads(json.dumps(config.fingerprint()))
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        added = {k: v for k, v in field_defaults().items() if k in wanted and k not in stored}
        merged = {**added, **stored}
        if merged != wanted:
            changed = sorted(k for k in set(merged) | set(wanted) if merged.get(k) != wanted.get(k))
            raise ValueError(
                f"--out {config.out} holds a demo run with other settings ({', '.join(changed)} differ); "
                "use another --out or delete that folder"
            )
        if added:
            logger.info(
                "%s predates %s: taken at the default, as that run did", path, ", ".join(sorted(added))
            )
        return
    write_json_atomic(path, wanted)


def field_defaults() -> dict[str, Any]:
    """Each `DemoConfig` field's default as demo_config.json would store it (`bf16` left out: it is resolved per
    machine)."""
    defaults = {f.name: f.default for f in fields(DemoConfig) if f.default is not MISSING}
    return {k: v for k, v in json.loads(json.dumps(defaults, default=str)).items() if k != "bf16"}


def stage_dir(config: DemoConfig, name: str) -> Path:
    return config.out / name


def read_record(config: DemoConfig, name: str) -> StageRecord | None:
    """The finished stage's record, or None if it has not finished."""
    path = stage_dir(config, name) / DONE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return StageRecord(name=name, seconds=data["seconds"], figures=data["figures"], skipped=True)


def run_stage(
    config: DemoConfig, name: str, fn: Callable[[Path], dict[str, Any]], echo: Callable[[str], None] = print
) -> StageRecord:
    """Run `fn(stage_dir) -> figures` unless the stage is done; write done.json; print a one-line summary."""
    record = read_record(config, name)
    if record is not None:
        echo(f"[{name}] already done ({record.seconds:.0f} s): {record.figures.get('summary', '')}")
        return record
    folder = stage_dir(config, name)
    folder.mkdir(parents=True, exist_ok=True)
    echo(f"[{name}] running ...")
    start = time.perf_counter()
    figures = fn(folder)
    seconds = time.perf_counter() - start
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(
        folder / DONE, {"stage": name, "seconds": seconds, "finished_at": finished, "figures": figures}
    )
    echo(f"[{name}] done in {seconds:.0f} s: {figures.get('summary', '')}")
    return StageRecord(name=name, seconds=seconds, figures=figures)


def training_arguments(
    config: DemoConfig, output_dir: Path, steps: int, batch_size: int, lr: float, **overrides
):
    """The TrainingArguments of the demo's training stages: `steps` steps of `batch_size` (split over the training
    processes), peak `lr` on a cosine schedule after a 5% warm-up, checkpoints every `sft_save_steps` (resumable:
    `resume_from_checkpoint` is "auto", for `mllm.train.runner.resolve_resume`), no reporting; keyword arguments
    override any field. Build them inside the training process: they set up its distributed state."""
    from mllm.train.runner import MLLMTrainingArguments

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size // config.training_processes(),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=min(10, max(1, steps // 20)),
        save_strategy="steps",
        save_steps=config.sft_save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=config.torch_device() == "cpu",
        resume_from_checkpoint="auto",
        ddp_find_unused_parameters=False,  # every trained parameter takes part in every step
    )
    settings.update(overrides)
    return MLLMTrainingArguments(**settings)
