"""Demo stages for supervised fine-tuning: the mixed training file, then the Trainer run (resumable).

The mixed file is what `mllm prepare-grounding --rec ... --mix-sft sft/train.json` writes: the REC records turned into
conversations with boxes on the 0..1000 grid (a subset of the records, `write_rec_subset`), plus every item of the SFT
file. Training is `build_sft_trainer` (the code behind `mllm train sft`) with checkpoints every `sft_save_steps`; a
re-run after a kill resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm.demo.build import world_dir
from mllm.demo.config import DemoConfig
from mllm.demo.stages import DONE, DemoInterrupted, training_arguments
from mllm.demo.vision import pretrained_model_dir
from mllm.files import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from mllm.data.grounding import GroundingPrepStats

logger = logging.getLogger(__name__)

SFT_DATA_STAGE = "sft_data"
ALIGN_STAGE = "align"
QUESTIONS_STAGE = "questions"
SFT_STAGE = "sft"


def sft_data_path(config: DemoConfig) -> Path:
    return config.out / SFT_DATA_STAGE / "train_mixed.json"


def align_data_path(config: DemoConfig) -> Path:
    return config.out / SFT_DATA_STAGE / "align.json"


def questions_data_path(config: DemoConfig) -> Path:
    return config.out / SFT_DATA_STAGE / "questions.json"


def questions_first_data_path(config: DemoConfig) -> Path:
    return config.out / SFT_DATA_STAGE / "questions_first.json"


def sft_model_dir(config: DemoConfig) -> Path:
    """The model after the SFT stages: the mixed SFT's, or with `sft_steps=0` the last earlier stage's."""
    return config.out / SFT_STAGE / "model" if config.sft_steps > 0 else sft_start_model_dir(config)


def align_model_dir(config: DemoConfig) -> Path:
    return config.out / ALIGN_STAGE / "model"


def questions_model_dir(config: DemoConfig) -> Path:
    return config.out / QUESTIONS_STAGE / "model"


def questions_start_model_dir(config: DemoConfig) -> Path:
    """Where the `questions` stage starts: the aligned model, or (alignment off) the `vision` stage's model."""
    return align_model_dir(config) if config.align_steps > 0 else pretrained_model_dir(config)


def sft_start_model_dir(config: DemoConfig) -> Path:
    """Where the mixed SFT starts: the model of the last earlier stage that runs (`questions`, `align`, `vision`)."""
    return questions_model_dir(config) if config.questions_steps > 0 else questions_start_model_dir(config)


def write_sft_subset(
    config: DemoConfig, out: Path, chosen: Callable[[str], bool], description_times: int = 1
) -> int:
    """The items of the world's SFT file whose first question `chosen` accepts, image paths made absolute, each
    description `description_times` times (`with_description_repeats`), written to `out` (the data of a
    single-kind SFT stage); returns the count."""
    world = world_dir(config)
    items = [
        {**item, "image": str(world / item["image"])}
        for item in json.loads((world / "sft" / "train.json").read_text(encoding="utf-8"))
        if chosen(item["conversations"][0]["content"])
    ]
    items = with_description_repeats(items, description_times)
    write_json_atomic(out, items, indent=None)
    return len(items)


def with_description_repeats(items: list[dict[str, Any]], times: int) -> list[dict[str, Any]]:
    """`items` with each description `times` times in its place (0: dropped; the repeats get an `:d<k>` id
    suffix, so that every conversation id stays unique)."""
    from mllm.toy.world import DESCRIBE_QUESTION

    repeated = []
    for item in items:
        if not item["conversations"][0]["content"].endswith(DESCRIBE_QUESTION):
            repeated.append(item)
        else:
            repeated += [item if k == 0 else {**item, "id": f"{item['id']}:d{k}"} for k in range(times)]
    return repeated


def write_align_data(config: DemoConfig, out: Path) -> int:
    """The `align` stage's data: the items of the SFT file that `config.align_data` names (the descriptions, or the
    yes/no questions of one category), image paths made absolute; returns the count."""
    from mllm.toy.world import DESCRIBE_QUESTION, yes_no_category

    def chosen(question: str) -> bool:
        if config.align_data == "descriptions":
            return question.endswith(DESCRIBE_QUESTION)
        return yes_no_category(question) == config.align_data

    return write_sft_subset(config, out, chosen)


def write_questions_data(config: DemoConfig, out: Path) -> int:
    """The `questions` stage's data: the yes/no and short-answer questions of the SFT file, each description
    `questions_description_repeats` times (none by default), image paths made absolute, and with
    `questions_rec_repeats` the REC conversations of `write_rec_repeats` mixed in (`prepare_grounding`, as the
    mixed SFT file). Returns the count."""
    mixed = config.questions_rec_repeats > 0
    questions = out.with_name(out.stem + "_without_rec.json") if mixed else out
    n_questions = write_sft_subset(
        config, questions, lambda question: True, config.questions_description_repeats
    )
    if not mixed:
        return n_questions
    rec = out.with_name(out.stem + "_rec.jsonl")
    n_rec = write_rec_repeats(config, rec, config.questions_rec_repeats)
    stats = write_rec_conversations(config, out, rec, questions, n_questions / n_rec)
    return stats.items["rec"] + stats.items["sft"]


def questions_data_kinds(config: DemoConfig) -> str:
    """What the `questions` stage trains on, in words (the run's summary and the report's curve caption)."""
    kinds = ["the yes/no and short-answer questions"]
    if config.questions_rec_repeats:
        kinds.append("REC")
    if config.questions_description_repeats:
        kinds.append("descriptions")
    return ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else kinds[0]


def read_rec_train(config: DemoConfig) -> tuple[list[str], list[int], list[int]]:
    """The world's training REC records (jsonl lines) and the indices of those of one-object images and of the
    others (the world writes one record per object, so an image's record count is its object count)."""
    source = world_dir(config) / "grounding" / "rec_train.jsonl"
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    images = [json.loads(line)["img_path"] for line in lines]
    per_image = Counter(images)
    single = [k for k, image in enumerate(images) if per_image[image] == 1]
    others = [k for k, image in enumerate(images) if per_image[image] > 1]
    return lines, single, others


def write_rec_subset(config: DemoConfig, out: Path) -> int:
    """The REC records of the mixed SFT: those of one-object images `rec_single_repeats` times each, and a seeded
    random `rec_fraction` of the others (at least one record in all). Returns the count."""
    import numpy as np

    lines, single, others = read_rec_train(config)
    rng = np.random.default_rng([config.seed, 400])
    keep = sorted(rng.permutation(others)[: round(config.rec_fraction * len(others))].tolist())
    chosen = single * config.rec_single_repeats + keep or [0]
    write_text_atomic(out, "".join(lines[k] + "\n" for k in chosen))
    return len(chosen)


def write_rec_repeats(config: DemoConfig, out: Path, times: int) -> int:
    """Every REC training record `times` times, those of one-object images twice as often (the `questions`
    stage's REC records). Returns the count."""
    lines, single, _ = read_rec_train(config)
    chosen = list(range(len(lines))) * times + single * times
    write_text_atomic(out, "".join(lines[k] + "\n" for k in chosen))
    return len(chosen)


def write_rec_conversations(
    config: DemoConfig, out: Path, rec: Path, sft: Path, mix_ratio: float
) -> GroundingPrepStats:
    """`mllm prepare-grounding`: the REC records of `rec` as conversations (answers in `rec_box_bins` steps) mixed
    with `mix_ratio` items of the SFT file `sft` per record (image paths relative to the world or absolute)."""
    from mllm.data.grounding import GroundingPrepConfig, prepare_grounding

    world = world_dir(config)
    return prepare_grounding(
        GroundingPrepConfig(
            out=out,
            rec_files=[rec],
            rec_templates=world / "grounding" / "templates_rec.json",
            image_root=world,
            seed=config.seed,
            mix_sft=sft,
            mix_ratio=mix_ratio,
            mix_image_folder=world,
            box_bins=config.rec_box_bins,
            overwrite=True,
        )
    )


def write_repeated_descriptions(config: DemoConfig, out: Path) -> Path:
    """The world's SFT file with each description `description_repeats` times (`with_description_repeats`); image
    paths stay relative to the world folder. Returns `out`."""
    items = json.loads((world_dir(config) / "sft" / "train.json").read_text(encoding="utf-8"))
    write_json_atomic(out, with_description_repeats(items, config.description_repeats), indent=None)
    return out


def make_sft_data(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """REC -> conversations (the records of `write_rec_subset`), mixed with all SFT items (mix_ratio = SFT items per
    REC record) into one file; beside it the `align` and `questions` stages' files."""
    rec = folder / "rec_train.jsonl"
    sft = world_dir(config) / "sft" / "train.json"
    n_rec = write_rec_subset(config, rec)
    if config.description_repeats > 1:
        sft = write_repeated_descriptions(config, folder / "sft_train.json")
    n_sft = len(json.loads(sft.read_text(encoding="utf-8")))
    stats = write_rec_conversations(config, sft_data_path(config), rec, sft, n_sft / n_rec)
    total = stats.items["rec"] + stats.items["sft"]
    summary = f"{total} conversations: {stats.items['rec']} REC + {stats.items['sft']} SFT conversations"
    n_align = 0
    if config.align_steps > 0:
        n_align = write_align_data(config, align_data_path(config))
        summary += f"; {n_align} items ({config.align_data}) for the alignment stage"
    n_questions = 0
    if config.questions_steps > 0:
        n_questions = write_questions_data(config, questions_data_path(config))
        summary += f"; {n_questions} items ({questions_data_kinds(config)}) for the questions stage"
    if config.questions_first_steps > 0:
        n_first = write_sft_subset(config, questions_first_data_path(config), lambda question: True, 0)
        summary += f" ({n_first} questions alone for its first steps)"
    return {
        "rec_items": stats.items["rec"],
        "sft_items": stats.items["sft"],
        "total": total,
        "align_items": n_align,
        "questions_items": n_questions,
        "summary": summary,
    }


def interrupt_callback(after_step: int):
    """A TrainerCallback that stops training right after the checkpoint of `after_step` is written (the testing
    hook; `run_training` then raises DemoInterrupted without saving the model, as a kill would leave things)."""
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= after_step:
                control.should_training_stop = True
            return control

    return StopAfterSave()


def sft_training_arguments(
    config: DemoConfig,
    run_dir: Path,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
):
    steps = config.sft_steps if steps is None else steps
    return training_arguments(
        config,
        run_dir,
        steps,
        config.sft_batch_size if batch_size is None else batch_size,
        config.sft_lr if lr is None else lr,
        loss_reduction=config.sft_loss_reduction,
        train_sampling_strategy="group_by_length" if config.sft_group_by_length else "random",
        bf16=config.uses_bf16(),
        vision_learning_rate=config.sft_vision_lr,
        vision_cache_mb=0 if config.tunes_vision_in_sft() else config.vision_cache_mb,
        length_pieces=config.length_pieces,
    )


def train_align(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """The alignment stage: SFT on the items `align_data` names alone (the position questions by default), from the
    `vision` stage's model (or the random one)."""
    return run_training(
        config,
        folder,
        pretrained_model_dir(config),
        align_data_path(config),
        config.align_steps,
        align_model_dir(config),
        lr=config.align_lr,
        batch_size=config.align_batch_size,
    )


def train_questions(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """The questions stage: SFT on the yes/no and short-answer questions (with REC and descriptions where the config
    adds them), from the `align` stage's model; with `questions_first_steps`, first that many steps on the questions
    alone, in folder/first (its own `done.json`: a re-run after a kill in the second part does not redo it)."""
    start = questions_start_model_dir(config)
    first = None
    if config.questions_first_steps > 0:
        part = folder / "first"
        if (part / DONE).is_file():
            first = json.loads((part / DONE).read_text(encoding="utf-8"))
        else:
            first = run_training(
                config,
                part,
                start,
                questions_first_data_path(config),
                config.questions_first_steps,
                part / "model",
                batch_size=config.questions_batch_size,
            )
            write_json_atomic(part / DONE, first)
        start = part / "model"
    figures = run_training(
        config,
        folder,
        start,
        questions_data_path(config),
        config.questions_steps,
        questions_model_dir(config),
        batch_size=config.questions_batch_size,
    )
    if first is not None:
        figures["first"] = first
        figures["summary"] = f"questions alone: {first['summary']}; then {figures['summary']}"
    return figures


def train_sft(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """SFT on the mixed file (LLM and projector trained; the vision tower only without the `vision` stage, see
    `DemoConfig.sft_tune_vision`)."""
    return run_training(
        config,
        folder,
        sft_start_model_dir(config),
        sft_data_path(config),
        config.sft_steps,
        sft_model_dir(config),
        config.sft_interrupt_after,
    )


def run_training(
    config: DemoConfig,
    folder: Path,
    start: Path,
    data: Path,
    steps: int,
    model_out: Path,
    interrupt_after: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """`steps` optimizer steps (of `batch_size` samples, default `sft_batch_size`) from the model in `start` on
    `data` in the demo's training processes, resumable from the checkpoints in folder/run; the loss curve goes to
    folder/loss.png."""
    from mllm.train.curves import plot_curves
    from mllm.train.launch import run_in_processes

    figures = run_in_processes(
        fit,
        (config, folder / "run", start, data, steps, model_out, interrupt_after, lr, batch_size),
        config.training_processes(),
        config.threads_per_process(),
    )
    if figures.pop("interrupted"):
        raise DemoInterrupted(f"interrupted after the checkpoint of step {figures['steps']}")
    if figures.pop("logged"):
        plot_curves(folder / "run", ["loss"], folder / "loss.png")
    return figures


def fit(
    config: DemoConfig,
    run_dir: Path,
    start: Path,
    data: Path,
    steps: int,
    model_out: Path,
    interrupt_after: int | None,
    lr: float | None,
    batch_size: int | None,
) -> dict[str, Any]:
    """One training process of `run_training`: `mllm train sft`'s Trainer, resumed from the newest checkpoint."""
    from mllm.train.runner import resolve_resume
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    args = sft_training_arguments(config, run_dir, steps, lr, batch_size)
    trainer = build_sft_trainer(
        ModelArguments(
            model=str(start),
            tune_vision=config.tunes_vision_in_sft(),
            tune_llm=True,
            tune_resampler=True,
            tune_embeddings=config.sft_tune_embeddings,
            attn_implementation=config.attn_implementation,
            weights_dtype="float32",  # with `bf16`: mixed precision, float32 weights and optimizer
        ),
        DataArguments(data=str(data), max_length=512),
        args,
    )
    if interrupt_after is not None:
        trainer.add_callback(interrupt_callback(interrupt_after))
    resume = resolve_resume(args)  # the newest checkpoint in run_dir, if any
    if resume:
        logger.info("SFT resumes from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    interrupted = interrupt_after is not None and trainer.state.global_step < steps
    if not interrupted:
        trainer.save_model(str(model_out))
        trainer.save_state()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    return {
        "interrupted": interrupted,
        "logged": bool(losses),
        "steps": trainer.state.global_step,
        "resumed_from": Path(resume).name if resume else None,
        "first_loss": first,
        "final_loss": last,
        "train_runtime": result.metrics.get("train_runtime"),
        "loss_png": "loss.png",
        "summary": f"{trainer.state.global_step} steps, loss {first:.3f} -> {last:.3f}"
        + (f" (resumed from {Path(resume).name})" if resume else ""),
    }
