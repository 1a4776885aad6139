"""`mllm eval grounding` and `mllm ground`: predictions files, resume after an interruption, scoring, table, pictures.

The fixture model is tiny and random, so its answers are garbage; what is checked is the machinery. Exact
accuracies are checked with a scripted answer function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mllm.boxes import format_box
from mllm.cli import main
from mllm.eval.answer import QuestionItem
from mllm.eval.grounding_run import GroundingEvalConfig, evaluate_grounding, prediction_path

SIZE = 56


def _write_split(root: Path, name: str, n: int, first_missing: bool = False) -> Path:
    """n one-square images and a REC file; box i is the square of image i (pixels)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        box = [4 + 2 * i, 6, 30 + 2 * i, 40]
        image = Image.new("RGB", (SIZE, SIZE), "white")
        image.paste((200, 30, 30), tuple(box))
        path = f"img/{name}_{i}.png"
        image.save(root / path)
        record = {"img_path": path, "expression": f"red square {i}", "bbox": box}
        if i % 2:
            record.update(width=SIZE, height=SIZE)  # the size comes from the image otherwise
        lines.append(record)
    if first_missing:
        lines[0] = {**lines[0], "img_path": "img/missing.png"}
    data = root / f"REC_refcoco_unc_{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return data


class ScriptedAnswers:
    """Answers with the true box for even expression numbers, a box far off for odd ones, no box for 3; can stop
    (raise) after a number of batches to imitate a killed run."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.batches = 0
        self.seen: list[str] = []

    def __call__(self, batch: list[QuestionItem]) -> tuple[list[str], int]:
        if self.stop_after is not None and self.batches == self.stop_after:
            raise KeyboardInterrupt
        self.batches += 1
        answers = []
        for item in batch:
            self.seen.append(item.question)
            number = int(item.metainfos["expression"].split()[-1])
            if number == 3:
                answers.append("I cannot tell.")
            elif number % 2 == 0:
                answers.append(format_box(item.metainfos["bbox"], SIZE, SIZE))
            else:
                answers.append("[900, 900, 1000, 1000]")
        return answers, 20 * len(batch)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_interrupted_run_resumes_without_duplicates_and_scores_exactly(tmp_path: Path) -> None:
    val = _write_split(tmp_path, "val", 6, first_missing=True)
    test_a = _write_split(tmp_path, "testA", 4)
    config = GroundingEvalConfig(data=[val, test_a], out_dir=tmp_path / "out", batch_size=2, vis=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate_grounding(config, ScriptedAnswers(stop_after=1), "m")
    val_out = prediction_path(config.out_dir, val)
    assert [r["idx"] for r in _lines(val_out)] == [1, 2]  # line 0 has no image: reported, not answered
    with val_out.open("a") as handle:  # a kill in the middle of writing a line
        handle.write('{"idx": 3, "split": "refcoco_va')

    rerun = ScriptedAnswers()
    result = evaluate_grounding(config, rerun, "m")
    assert len(rerun.seen) == 3 + 4  # val lines 3, 4, 5 and all of testA: nothing answered twice
    assert rerun.seen[0] == "Where is red square 3 in image? answer in [x0,y0,x1,y1] format."
    val_lines = _lines(val_out)
    assert [r["idx"] for r in val_lines] == [1, 2, 3, 4, 5]
    assert val_lines[0]["split"] == "refcoco_val" and val_lines[0]["model"] == "m"
    assert val_lines[0]["width"] == SIZE and val_lines[1]["bbox"] == [8.0, 6.0, 34.0, 40.0]
    errors = _lines(val_out.with_name("REC_refcoco_unc_val.predictions.errors.jsonl"))
    assert errors[0]["idx"] == 0 and "image not found" in errors[0]["error"]

    splits = result.summary["splits"]
    # val: expressions 1..5 -> 2 and 4 right, 3 unparsable; testA: 0..3 -> 0 and 2 right, 3 unparsable.
    assert splits["refcoco_val"] == {"n": 5, "correct": 2, "unparsable": 1, "acc": 0.4}
    assert splits["refcoco_testA"] == {"n": 4, "correct": 2, "unparsable": 1, "acc": 0.5}
    assert list(splits) == ["refcoco_val", "refcoco_testA"]
    assert result.summary["overall"]["correct"] == 4 and result.summary["failed_lines"] == 1
    assert [u["answer"] for u in result.summary["unparsable"]] == ["I cannot tell.", "I cannot tell."]
    table = (config.out_dir / "summary.md").read_text()
    assert "| refcoco_val | 5 | 2 | 40.00 | 1 |" in table
    assert "| overall | 9 | 4 | 44.44 | 2 |" in table
    assert json.loads((config.out_dir / "summary.json").read_text())["overall"]["n"] == 9
    pictures = sorted((config.out_dir / "vis").glob("*.png"))
    assert len(pictures) == 3 and len(result.pictures) == 3
    assert {p.name.split("_", 1)[1].rsplit("_", 1)[0] for p in pictures} == {"refcoco_val", "refcoco_testA"}
    with Image.open(pictures[0]) as picture:
        assert picture.size[0] == SIZE and picture.size[1] > SIZE  # the caption strip below the image

    again = ScriptedAnswers()
    evaluate_grounding(config, again, "m")
    assert again.seen == [] and len(_lines(val_out)) == 5
    with pytest.raises(ValueError, match=r"made with other inputs or settings \(differing: model_name"):
        evaluate_grounding(config, ScriptedAnswers(), "other")


def test_cli_eval_grounding_on_the_fixture_model(tmp_path: Path, small_model_dir: Path, capsys) -> None:
    data = _write_split(tmp_path, "testB", 3)
    out = tmp_path / "eval"
    argv = ["eval", "grounding", str(small_model_dir), "--data", str(data), "--out-dir", str(out)]
    argv += ["--batch-size", "2", "--max-new-tokens", "6", "--vis", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "answered 3, skipped 0" in printed and "| refcoco_testB | 3 |" in printed
    predictions = _lines(out / "REC_refcoco_unc_testB.predictions.jsonl")
    assert [r["idx"] for r in predictions] == [0, 1, 2]
    assert all(isinstance(r["answer"], str) for r in predictions)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["refcoco_testB"]["n"] == 3
    assert len(list((out / "vis").glob("*.png"))) == 2
    assert main(argv) == 0  # a rerun answers nothing again
    assert "answered 0, skipped 3" in capsys.readouterr().out
    assert len(_lines(out / "REC_refcoco_unc_testB.predictions.jsonl")) == 3

    # Scoring the predictions without a model.
    rescored = tmp_path / "rescored"
    pred = out / "REC_refcoco_unc_testB.predictions.jsonl"
    args = ["eval", "grounding", "--predictions", str(pred), "--image-root", str(tmp_path)]
    assert main([*args, "--out-dir", str(rescored)]) == 0
    assert json.loads((rescored / "summary.json").read_text())["overall"] == summary["overall"]


def test_cli_eval_grounding_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["eval", "grounding", "m", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "--data: file not found" in capsys.readouterr().err
    data = _write_split(tmp_path, "val", 1)
    assert main(["eval", "grounding", "m", "--data", str(data), "--prompt", "Where?"]) == 2
    assert "--prompt must contain {expr}" in capsys.readouterr().err
    assert main(["eval", "grounding", "--data", str(data)]) == 2
    assert "MODEL is needed" in capsys.readouterr().err


def test_cli_ground_prints_a_pixel_box_and_writes_a_png(
    tmp_path: Path, small_model_dir: Path, capsys
) -> None:
    image = tmp_path / "scene.png"
    Image.new("RGB", (SIZE, SIZE), "white").save(image)
    out = tmp_path / "found.png"
    argv = ["ground", str(small_model_dir), "the red square", "--image", str(image), "--out", str(out)]
    code = main([*argv, "--max-new-tokens", "24"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["expression"] == "the red square" and result["picture"] == str(out)
    assert code == (0 if result["box_pixels"] is not None else 1)
    with Image.open(out) as picture:
        assert picture.size[0] == SIZE and picture.size[1] > SIZE


def test_ground_one_converts_the_answer_to_pixels() -> None:
    from mllm.eval.grounding_run import ground_one

    def answer(batch: list[QuestionItem]) -> tuple[list[str], int]:
        assert batch[0].question == "Find the cat."
        return ["<box>(0,0),(999,499)</box>"], 10

    image = Image.new("RGB", (200, 100))
    text, box = ground_one(answer, image, "the cat", prompt="Find {expr}.")
    assert text.startswith("<box>") and box == pytest.approx((0.0, 0.0, 200.0, 499 / 999 * 100))
