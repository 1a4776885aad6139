"""`mllm eval-vqa`: answer normalisation, accuracy per category, resumable predictions, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mllm.cli import main
from mllm.eval.vqa import (
    load_vqa_items,
    normalise_answer,
    predict,
    report_markdown,
    report_paths,
    score_predictions,
)
from mllm.processing.processor import IMAGE_MARKER


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("  NO!", "no"),
        ("**No**, it is not.", "no"),
        ("Yes, the circle is red.", "yes"),
        ('"yes"', "yes"),
        ("No\nbecause", "no"),
        ("", ""),
        ("   ", ""),
        ("Yes/No", "yes/no"),
        ("Maybe yes", "maybe"),
        ("yesterday", "yesterday"),
        ("Noah", "noah"),
    ],
)
def test_normalise_answer(text: str, expected: str) -> None:
    assert normalise_answer(text) == expected


def record(idx: int, category: str, reference: str, prediction: str) -> dict:
    norm = normalise_answer(prediction)
    return {
        "idx": idx,
        "id": idx,
        "category": category,
        "reference": reference,
        "prediction": prediction,
        "normalised": norm,
        "correct": norm == reference,
    }


def test_accuracy_per_category_and_invalid_answers() -> None:
    records = [
        record(0, "color", "yes", "Yes."),
        record(1, "color", "no", "No"),
        record(2, "color", "no", "yes"),
        record(3, "count", "yes", "I think so"),
        record(4, "count", "no", "no, there are two"),
        record(5, "artwork", "yes", ""),
    ]
    report = score_predictions(records)
    assert (report.overall.total, report.overall.correct, report.overall.invalid) == (6, 3, 2)
    assert report.overall.accuracy == pytest.approx(0.5)
    by_name = {c.category: c for c in report.categories}
    assert [c.category for c in report.categories] == ["artwork", "color", "count"]
    assert by_name["color"].accuracy == pytest.approx(2 / 3) and by_name["color"].invalid == 0
    assert by_name["count"].accuracy == pytest.approx(0.5) and by_name["count"].invalid == 1
    assert by_name["artwork"].accuracy == 0.0
    assert [entry["idx"] for entry in report.invalid] == [3, 5]
    table = report_markdown(report, "t")
    assert "| **overall** | 6 | 3 | 2 | 0.500 |" in table and "| color | 3 | 2 | 0 | 0.667 |" in table
    assert "item 3 (id 3, count): 'I think so'" in table
    assert report.to_json()["categories"][1]["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no predictions"):
        score_predictions([])
    assert report_paths(Path("out/preds.jsonl")) == (
        Path("out/preds.accuracy.md"),
        Path("out/preds.accuracy.json"),
    )


def write_dataset(root: Path) -> Path:
    """Six SFT items in two category folders; references alternate yes/no. Item 4 has no <image> mark (the image
    goes in front), item 5 has two turns (the reference is the first answer)."""
    colors = {"color": (200, 30, 30), "count": (30, 30, 200)}
    items = []
    for i in range(6):
        category = "color" if i % 2 == 0 else "count"
        path = root / "images" / category / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 8 * i, 56), colors[category]).save(path)
        answer = "Yes" if i % 3 else "No"
        question = f"Is this item {i} {category}? Please answer yes or no."
        content = question if i == 4 else f"<image>\n{question}"
        turns = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        if i == 5:
            turns += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
        items.append({"id": 100 + i, "image": f"images/{category}/{i:03d}.png", "conversations": turns})
    data = root / "test.json"
    data.write_text(json.dumps(items))
    return data


def test_items_and_bad_data(tmp_path: Path) -> None:
    data = write_dataset(tmp_path)
    items = load_vqa_items(data)
    assert [item.reference for item in items] == ["no", "yes", "yes", "no", "yes", "yes"]
    assert [item.category for item in items] == ["color", "count"] * 3
    assert all(item.question.startswith(IMAGE_MARKER + "\n") for item in items)
    assert items[5].question.endswith("Please answer yes or no.") and len(items[5].image_paths) == 1
    assert len(load_vqa_items(data, tmp_path, limit=2)) == 2
    raw = json.loads(data.read_text())
    raw[2]["conversations"][1]["content"] = "Red"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"bad.json, item 2 \(id 102\): the reference answer 'Red' is not yes or no"
    ):
        load_vqa_items(tmp_path / "bad.json")
    raw[2]["conversations"][1]["content"] = "No"
    raw[3]["image"] = "images/count/missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"item 3 \(id 103\): image file not found"):
        load_vqa_items(tmp_path / "bad.json")


def test_predict_resumes_and_refuses_other_runs(tmp_path: Path) -> None:
    items = load_vqa_items(write_dataset(tmp_path))
    out = tmp_path / "preds.jsonl"
    seen: list[list[int]] = []

    def answer_fn(batch):
        seen.append([item.idx for item in batch])
        return ["Yes." if item.idx % 2 else "no" for item in batch]

    predict(items[:3], out, answer_fn, "m", batch_size=2)
    with out.open("a") as handle:  # a run killed mid-line
        handle.write('{"idx": 3, "id"')
    records = predict(items, out, answer_fn, "m", batch_size=2)
    assert seen == [[0, 1], [2], [3, 4], [5]]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["idx"] for r in lines] == [0, 1, 2, 3, 4, 5]
    assert [r["correct"] for r in records] == [True, True, False, False, False, True]
    assert predict(items, out, answer_fn, "m") == records and len(seen) == 4
    with pytest.raises(ValueError, match="made with other inputs or settings \\(differing: model"):
        predict(items, out, answer_fn, "other")
    items[1].item_id = 999
    with pytest.raises(ValueError, match="written for another data file"):
        predict(items, out, answer_fn, "m")


def test_eval_vqa_end_to_end(tmp_path: Path, small_model_dir: Path, capsys) -> None:
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "preds.jsonl"
    argv = ["eval-vqa", str(small_model_dir), "--data", str(data), "--device", "cpu", "--max-new-tokens", "4"]
    assert main([*argv, "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["idx"] for r in records] == list(range(6))
    md_path, json_path = report_paths(out)
    report = json.loads(json_path.read_text())
    assert report["overall"]["total"] == 6
    assert report["overall"]["correct"] == sum(r["correct"] for r in records)
    assert {c["category"]: c["total"] for c in report["categories"]} == {"color": 3, "count": 3}
    assert report["overall"]["invalid"] == sum(r["normalised"] not in ("yes", "no") for r in records)
    assert "| **overall** | 6 |" in md_path.read_text() and "| **overall** | 6 |" in printed
    # Batched greedy answers equal one-at-a-time answers.
    single = tmp_path / "single.jsonl"
    assert main([*argv, "--batch-size", "1", "--out", str(single), "--limit", "3"]) == 0
    assert [json.loads(line)["prediction"] for line in single.read_text().splitlines()] == [
        r["prediction"] for r in records[:3]
    ]
    before = out.read_bytes()
    assert main([*argv, "--out", str(out)]) == 0  # resume: nothing left to answer
    assert out.read_bytes() == before
    capsys.readouterr()
    assert main(["eval-vqa", str(small_model_dir), "--data", str(tmp_path / "nope.json")]) == 2
    assert "--data: file not found" in capsys.readouterr().err
