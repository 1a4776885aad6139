"""Scoring a grounding predictions file written here: per-split accuracy by hand, unparsable answers, pictures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from mllm.boxes import format_box
from mllm.cli import grounding as grounding_cli
from mllm.eval.grounding_score import (
    markdown_table,
    score_item,
    score_predictions,
    split_name_from_path,
    visualize,
)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("REC_refcoco_unc_val.jsonl", "refcoco_val"),
        ("data/REC_refcoco+_unc_testA.jsonl", "refcoco+_testA"),
        ("REC_refcoco_unc_testB.jsonl", "refcoco_testB"),
        ("REC_refcocog_umd_test.jsonl", "refcocog_test"),
        ("REC_refcocog_umd_val.jsonl", "refcocog_val"),
        ("my_shapes.jsonl", "my_shapes"),
    ],
)
def test_split_name_from_path(name: str, split: str):
    assert split_name_from_path(name) == split


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def predictions(tmp_path: Path) -> list[Path]:
    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.png")
    common = {"width": 100, "height": 100}
    mixed = _write(
        tmp_path / "preds.jsonl",
        [
            # refcoco_val: 1 of 3 (an exact hit, garbage, a pred_bbox with IoU 0.25)
            {"split": "refcoco_val", "expression": "red ball", "bbox": [20, 10, 120, 60], "width": 200,
             "height": 100, "answer": "[100, 100, 600, 600]", "img_path": "a.png"},
            {"split": "refcoco_val", "expression": "blue cup", "bbox": [0, 0, 10, 10], "answer": "I cannot tell",
             "img_path": "a.png", **common},
            {"split": "refcoco_val", "expression": "tree", "bbox": [0, 0, 100, 100], "pred_bbox": [0, 0, 50, 50],
             **common},
            # refcoco+ testA, named like a file: 2 of 2 (Qwen syntax /999, and IoU exactly 0.5 counts)
            {"split": "REC_refcoco+_unc_testA", "expression": "dog", "bbox": [0, 0, 100, 100],
             "answer": "<ref>dog</ref><box>(0,0),(999,999)</box>", **common},
            {"split": "REC_refcoco+_unc_testA", "expression": "cat", "bbox": [0, 0, 100, 100],
             "answer": "[0, 0, 500, 1000]", **common},
        ],
    )  # fmt: skip
    by_name = _write(
        tmp_path / "REC_refcocog_umd_test.jsonl",
        [
            {
                "expression": "small",
                "bbox": [0, 0, 10, 10],
                "answer": "[0, 0, 1000, 1000]",
                **common,
            },  # IoU .01
            {
                "expression": "big",
                "bbox": [10, 10, 90, 90],
                "answer": "[ 900, 900 , 100,100 ]",
                **common,
            },  # swapped
        ],
    )
    return [mixed, by_name]


def test_per_split_accuracy_by_hand(predictions: list[Path]):
    summary = score_predictions(predictions)
    assert list(summary["splits"]) == ["refcoco_val", "refcoco+_testA", "refcocog_test"]
    val = summary["splits"]["refcoco_val"]
    assert (val["n"], val["correct"], val["unparsable"]) == (3, 1, 1)
    assert val["acc"] == pytest.approx(1 / 3)
    assert summary["splits"]["refcoco+_testA"]["acc"] == 1.0
    assert summary["splits"]["refcocog_test"]["acc"] == 0.5
    assert summary["overall"] == {"n": 7, "correct": 4, "unparsable": 1, "acc": pytest.approx(4 / 7)}
    assert summary["unparsable"] == [
        {
            "source": f"{predictions[0]}, line 2",
            "split": "refcoco_val",
            "expression": "blue cup",
            "answer": "I cannot tell",
        }
    ]
    ious = [item["iou"] for item in summary["items"]]
    assert ious == pytest.approx([1.0, 0.0, 0.25, 1.0, 0.5, 0.01, 1.0])


def test_markdown_table(predictions: list[Path]):
    table = markdown_table(score_predictions(predictions)).splitlines()
    assert table[0] == "| split | n | correct | Acc@0.5 (%) | unparsable |"
    assert table[2] == "| refcoco_val | 3 | 1 | 33.33 | 1 |"
    assert table[-1] == "| overall | 7 | 4 | 57.14 | 1 |"


def test_split_override_and_missing_size(tmp_path: Path):
    path = _write(tmp_path / "p.jsonl", [{"expression": "x", "bbox": [0, 0, 1, 1], "answer": "[0, 0, 1, 1]"}])
    with pytest.raises(ValueError, match=r"p\.jsonl, line 1, field 'width'"):
        score_predictions(path)
    Image.new("RGB", (1000, 1000)).save(tmp_path / "img.png")
    _write(path, [{"expression": "x", "bbox": [0, 0, 1, 1], "answer": "[0, 0, 1, 1]", "img_path": "img.png"}])
    summary = score_predictions(path, split="mine", image_root=tmp_path)  # size read from the image header
    assert summary["splits"]["mine"]["acc"] == 1.0


def test_visualize_draws_green_gt_and_red_prediction(tmp_path: Path):
    out = visualize(Image.new("RGB", (200, 100), "white"), "the red ball", [10, 10, 60, 60], [100, 20, 180, 90],
                    0.0, tmp_path / "v.png")  # fmt: skip
    with Image.open(out) as img:
        assert img.size[0] == 200 and img.size[1] > 100  # caption strip below
        assert img.getpixel((10, 30)) == (0, 200, 0)
        assert img.getpixel((180, 60)) == (230, 0, 0)
        assert img.getpixel((150, 60)) == (255, 255, 255)


def test_cli_score_writes_summary_and_pictures(predictions: list[Path], tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    grounding_cli.register(parser.add_subparsers())
    out_dir = tmp_path / "eval"
    argv = ["score-grounding", "--out-dir", str(out_dir), "--vis", "3", "--image-root", str(tmp_path)]
    for path in predictions:
        argv += ["--predictions", str(path)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "| overall | 7 | 4 | 57.14 | 1 |" in capsys.readouterr().out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert "items" not in summary and summary["overall"]["correct"] == 4
    assert (out_dir / "summary.md").read_text().startswith("| split |")
    pngs = sorted(p.name for p in (out_dir / "vis").iterdir())
    assert pngs == ["0000_refcoco_val_ok.png", "0001_refcoco_val_wrong.png"]  # the third item has no image


def test_score_item_reads_qwen25vl_pixels_with_the_record_size() -> None:
    record = {"expression": "the cup", "bbox": [80, 60, 400, 300], "width": 800, "height": 600}
    record["answer"] = format_box(record["bbox"], 800, 600, "qwen25vl")  # pixels of the 812x588 frame
    scored = score_item(record, "preds.jsonl, line 1", "val", "qwen25vl")
    assert scored["correct"] and scored["iou"] > 0.99
    assert not score_item(record, "preds.jsonl, line 1", "val", "auto")["correct"]  # read as 0..1000: wrong
