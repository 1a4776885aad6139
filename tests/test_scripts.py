"""Every shipped `scripts/finetune_*.sh` end to end at a tiny size, its DeepSpeed launch line included: two CPU processes
under `configs/ds_zero2.json` (the scripts' default), the fixture model and a toy world set through the scripts' own
environment variables (MODEL, DATA, NPROC, MAX_STEPS, ...), everything else the exercise's settings (LoRA r 64,
bf16, gradient checkpointing, cosine schedule with warm-up, TensorBoard, resume auto)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers.training import distributed_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllm.toy.world import make_toy_world

    root = tmp_path_factory.mktemp("scripts_world") / "world"
    make_toy_world(root, n_train=8, n_test=4, n_preference=8)
    return root


def run_script(name: str, **env: str) -> None:
    """Run scripts/NAME from the project root (its DeepSpeed config paths are relative to it)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / name)],
        cwd=ROOT,
        env=distributed_env(NPROC="2", MAX_STEPS=str(STEPS), **env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-6000:]


def trained_steps(out: Path) -> int:
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


def test_finetune_sft_script(tmp_path: Path, small_model_dir: Path, world: Path) -> None:
    from mllm.model.modeling import MLLMModel

    out = tmp_path / "sft"
    # the exercise's test set is yes/no questions (what `mllm eval-vqa` scores): the toy world's, descriptions left out
    items = json.loads((world / "sft" / "test.json").read_text())
    yes_no = [item for item in items if item["conversations"][-1]["content"] in ("Yes", "No")]
    (tmp_path / "test.json").write_text(json.dumps(yes_no))
    run_script(
        "finetune_sft.sh",
        MODEL=str(small_model_dir),
        DATA=str(world / "sft" / "train.json"),
        EVAL_DATA=str(tmp_path / "test.json"),
        IMAGE_FOLDER=str(world),
        OUT=str(out),
    )
    assert trained_steps(out) == STEPS and (out / "adapter_model.safetensors").is_file()
    MLLMModel.from_pretrained(out / "merged")  # strict
    predictions = (out / "test_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(yes_no) > 0


def test_finetune_grounding_script(tmp_path: Path, small_model_dir: Path, world: Path) -> None:
    from mllm.model.modeling import MLLMModel

    out = tmp_path / "grounding"
    run_script(
        "finetune_grounding.sh",
        MODEL=str(small_model_dir),
        SHIKRA=str(world / "grounding"),
        IMAGES=str(world),
        REC=str(world / "grounding" / "rec_train.jsonl"),
        REC_TEMPLATES=str(world / "grounding" / "templates_rec.json"),
        PREPARED=str(tmp_path / "grounding_train.json"),
        OUT=str(out),
        EVAL_SPLITS="rec_val",
    )
    assert trained_steps(out) == STEPS
    MLLMModel.from_pretrained(out / "merged")
    evaluated = list((out / "eval_grounding").glob("*.predictions.jsonl"))
    assert [p.name for p in evaluated] == ["rec_val.predictions.jsonl"]
    rec_val = (world / "grounding" / "rec_val.jsonl").read_text().splitlines()
    assert len(evaluated[0].read_text().splitlines()) >= len(rec_val)


def test_finetune_preference_script(tmp_path: Path, small_model_dir: Path, world: Path) -> None:
    from mllm.model.modeling import MLLMModel

    out = tmp_path / "preference"
    data = world / "preference" / "preference_train.json"
    run_script(
        "finetune_preference.sh",
        MODEL=str(small_model_dir),
        DATA=str(data),
        IMAGE_FOLDER=str(world),
        OUT=str(out),
    )
    assert trained_steps(out) == STEPS
    records = (out / "reference_logps.jsonl").read_text().splitlines()
    assert len(records) == 1 + len(
        json.loads(data.read_text())
    )  # header + one line per pair, both ranks' shares
    MLLMModel.from_pretrained(out / "merged")
