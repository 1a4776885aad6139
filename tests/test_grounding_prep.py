"""`prepare-grounding` on small Shikra-format samples written here: expected conversations and boxes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from mllm.cli import grounding as grounding_cli
from mllm.data.grounding import GroundingPrepConfig, build_grounding_items, prepare_grounding


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 100), "white").save(images / "a.png")
    Image.new("RGB", (400, 400), "white").save(images / "b.png")
    Image.new("RGB", (200, 100), "white").save(images / "img1.jpg")
    _write_jsonl(
        tmp_path / "rec.jsonl",
        [
            {
                "img_path": "a.png",
                "expression": "the red ball",
                "bbox": [20, 10, 120, 60],
                "width": 200,
                "height": 100,
            },
            {
                "img_path": "b.png",
                "expression": "left cup",
                "bbox": [-10, 40, 200, 440],
            },  # size from header, clamped
            {"img_path": "a.png", "expression": "a line", "bbox": [50, 50, 50, 80]},  # empty: dropped
            {"img_path": "missing.png", "expression": "ghost", "bbox": [0, 0, 10, 10]},
        ],
    )
    _write_jsonl(
        tmp_path / "gc.jsonl", [{"img_path": "a.png", "expression": "a dog", "bbox": [0, 0, 100, 50]}]
    )
    _write_jsonl(
        tmp_path / "flickr.jsonl",
        [
            {
                "image_id": "img1",
                "sentence": "<ph_st>A man<ph_ed> rides <ph_st>two horses<ph_ed> near <ph_st>a tree<ph_ed>.",
                "boxes": [[0, 0, 100, 50], [100, 50, 200, 100], [0, 50, 50, 100], [300, 0, 400, 10]],
                "boxes_seq": [[0], [1, 2], [3]],  # box 3 lies outside the 200-px-wide image: clamped to empty
            }
        ],
    )
    (tmp_path / "rec_t.json").write_text(json.dumps(["In the image <image>, where is <expr>?"]))
    (tmp_path / "gc_t.json").write_text(json.dumps(["What is in region <objs> of the image <image>?"]))
    (tmp_path / "fl_t.json").write_text(json.dumps(["<image> Describe the image with boxes."]))
    return tmp_path


def _config(d: Path, **kwargs) -> GroundingPrepConfig:
    base = dict(
        out=d / "out.json",
        rec_files=[d / "rec.jsonl"],
        gc_files=[d / "gc.jsonl"],
        flickr_files=[d / "flickr.jsonl"],
        rec_templates=d / "rec_t.json",
        gc_templates=d / "gc_t.json",
        flickr_templates=d / "fl_t.json",
        image_root=d / "images",
    )
    base.update(kwargs)
    return GroundingPrepConfig(**base)


def test_expected_conversations_and_counts(data: Path):
    items, stats = build_grounding_items(_config(data))
    by_id = {item["id"]: item for item in items}
    assert sorted(by_id) == ["flickr:flickr:1", "gc:gc:1", "rec:rec:1", "rec:rec:2"]
    rec = by_id["rec:rec:1"]
    assert rec["image"] == str((data / "images" / "a.png").resolve())
    assert rec["conversations"] == [
        {"role": "user", "content": "<image>\nIn the image, where is the red ball?"},
        {"role": "assistant", "content": "[100, 100, 600, 600]"},  # 20/200, 10/100, 120/200, 60/100
    ]
    # 400x400 from the header; x0 -10 -> 0 and y1 440 -> 400 (clamped)
    assert by_id["rec:rec:2"]["conversations"][1]["content"] == "[0, 100, 500, 1000]"
    gc = by_id["gc:gc:1"]["conversations"]
    assert gc[0]["content"] == "<image>\nWhat is in region [0, 0, 500, 500] of the image?"
    assert gc[1]["content"] == "a dog"
    flickr = by_id["flickr:flickr:1"]["conversations"]
    assert flickr[0]["content"] == "<image>\nDescribe the image with boxes."
    assert flickr[1]["content"] == (
        "A man [0, 0, 500, 500] rides two horses [500, 500, 1000, 1000], [0, 500, 250, 1000] near a tree."
    )
    assert stats.items == {"rec": 2, "gc": 1, "flickr": 1, "sft": 0}
    assert stats.clamped_boxes == 2  # rec line 2 and the flickr box outside the image
    assert stats.empty_boxes == 2  # rec line 3 and that flickr box
    assert stats.missing_images == [str((data / "images" / "missing.png").resolve())]
    assert stats.skipped_records == 2


def test_ref_tags_and_other_box_syntax(data: Path):
    items, _ = build_grounding_items(
        _config(data, ref_tags=True, box_format="shikra", gc_files=[], flickr_files=[])
    )
    assert (
        items[0]["conversations"][0]["content"] == "<image>\nIn the image, where is <ref>the red ball</ref>?"
    )
    assert items[0]["conversations"][1]["content"] == "[0.100,0.100,0.600,0.600]"


def test_box_bins_snap_every_box_written(data: Path):
    """8 bins: steps of 125 on the 0..1000 grid; REC answers, GC prompts and Flickr captions alike."""
    items, _ = build_grounding_items(_config(data, box_bins=8))
    by_id = {item["id"]: item["conversations"] for item in items}
    # 20/200 = 0.1 -> step 1 of 8, 120/200 = 0.6 -> step 5 (0.8 and 4.8 rounded)
    assert by_id["rec:rec:1"][1]["content"] == "[125, 125, 625, 625]"
    assert by_id["gc:gc:1"][0]["content"] == "<image>\nWhat is in region [0, 0, 500, 500] of the image?"
    assert by_id["flickr:flickr:1"][1]["content"].startswith("A man [0, 0, 500, 500] rides two horses")
    with pytest.raises(ValueError, match="--box-bins must be >= 0"):
        build_grounding_items(_config(data, box_bins=-1))


@pytest.mark.parametrize(
    "box_format, prompt, answer",
    [
        (
            "qwen2vl",
            "<|object_ref_start|>the red ball<|object_ref_end|>",
            "<|box_start|>(100,100),(600,600)<|box_end|>",
        ),
        ("llava", "<ref>the red ball</ref>", "[0.10, 0.10, 0.60, 0.60]"),
    ],
)
def test_training_data_in_a_target_familys_syntax(data: Path, box_format: str, prompt: str, answer: str):
    items, _ = build_grounding_items(
        _config(data, ref_tags=True, box_format=box_format, gc_files=[], flickr_files=[])
    )
    assert items[0]["conversations"][0]["content"] == f"<image>\nIn the image, where is {prompt}?"
    assert items[0]["conversations"][1]["content"] == answer


def test_default_template_is_the_eval_prompt(data: Path):
    items, _ = build_grounding_items(_config(data, rec_templates=None, gc_files=[], flickr_files=[]))
    assert items[0]["conversations"][0]["content"] == (
        "<image>\nWhere is the red ball in image? answer in [x0,y0,x1,y1] format."
    )


def test_deterministic_for_a_seed(data: Path):
    templates = [f"<image> Template {i}: where is <expr>?" for i in range(5)]
    (data / "many_t.json").write_text(json.dumps(templates))
    records = [{"img_path": "a.png", "expression": f"thing {i}", "bbox": [0, 0, 10, 10]} for i in range(30)]
    _write_jsonl(data / "many.jsonl", records)
    kwargs = dict(
        rec_files=[data / "many.jsonl"], rec_templates=data / "many_t.json", gc_files=[], flickr_files=[]
    )
    first, _ = build_grounding_items(_config(data, seed=3, **kwargs))
    second, _ = build_grounding_items(_config(data, seed=3, **kwargs))
    other, _ = build_grounding_items(_config(data, seed=4, **kwargs))
    assert first == second
    assert first != other
    assert len({item["conversations"][0]["content"].split(":")[0] for item in first}) > 1  # templates vary


def test_write_refuses_overwrite_and_is_valid_json(data: Path):
    config = _config(data)
    prepare_grounding(config)
    written = json.loads(config.out.read_text())
    assert len(written) == 4
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_grounding(config)
    prepare_grounding(_config(data, overwrite=True))
    assert [p.name for p in data.iterdir() if p.name.startswith(".out.json")] == []  # no temp file left


def test_all_images_missing_is_fatal(data: Path):
    _write_jsonl(data / "ghost.jsonl", [{"img_path": "nope.png", "expression": "x", "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="all 1 images are missing"):
        build_grounding_items(_config(data, rec_files=[data / "ghost.jsonl"], gc_files=[], flickr_files=[]))


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"img_path": "a.png", "expression": "x", "bbox": [0, 0, 1]}, "bbox"),
        ({"img_path": "a.png", "bbox": [0, 0, 1, 1]}, "expression"),
        ({"img_path": "a.png", "expression": "x", "bbox": [0, 0, 1, 1], "width": -3, "height": 5}, "width"),
    ],
)
def test_bad_line_names_file_line_and_field(data: Path, record: dict, field: str):
    good = {"img_path": "a.png", "expression": "ok", "bbox": [0, 0, 5, 5]}
    _write_jsonl(data / "bad.jsonl", [good, record])
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 2, field '{field}'"):
        build_grounding_items(_config(data, rec_files=[data / "bad.jsonl"], gc_files=[], flickr_files=[]))


def test_flickr_phrase_count_mismatch(data: Path):
    record = {
        "image_id": "img1",
        "sentence": "<ph_st>A man<ph_ed>.",
        "boxes": [[0, 0, 1, 1]],
        "boxes_seq": [[0], [0]],
    }
    _write_jsonl(data / "fbad.jsonl", [record])
    with pytest.raises(ValueError, match="line 1, field 'sentence'"):
        build_grounding_items(_config(data, flickr_files=[data / "fbad.jsonl"], rec_files=[], gc_files=[]))


def test_bad_template_is_rejected(data: Path):
    (data / "bad_t.json").write_text(json.dumps(["<image> describe this"]))
    with pytest.raises(ValueError, match=r"entry 0: a rec template needs <expr>"):
        build_grounding_items(_config(data, rec_templates=data / "bad_t.json"))


def test_mixing_with_sft(data: Path):
    sft = [
        {"id": i, "image": f"pics/{i}.jpg", "conversations": [{"role": "user", "content": "<image>\nq"}]}
        for i in range(3)
    ]
    (data / "sft.json").write_text(json.dumps(sft))
    config = _config(data, mix_sft=data / "sft.json", mix_ratio=0.5)  # 4 grounding items -> 2 SFT items
    items, stats = build_grounding_items(config)
    mixed = [item for item in items if item["id"].startswith("sft:")]
    assert stats.items["sft"] == 2 and len(mixed) == 2
    assert all(item["image"].startswith(str(data.resolve())) for item in mixed)
    assert build_grounding_items(config)[0] == items
    many, _ = build_grounding_items(
        _config(data, mix_sft=data / "sft.json", mix_ratio=2.0)
    )  # 8 > 3: repeated
    ids = [item["id"] for item in many if item["id"].startswith("sft:")]
    assert len(ids) == 8 and len(set(ids)) == 8


def test_cli_prepare(data: Path, capsys):
    parser = argparse.ArgumentParser()
    grounding_cli.register(parser.add_subparsers())
    out = data / "cli.json"
    args = parser.parse_args(
        [
            "prepare-grounding",
            "--rec",
            str(data / "rec.jsonl"),
            "--image-root",
            str(data / "images"),
            "--out",
            str(out),
            "--box-format",
            "qwen25vl",
        ]
    )
    assert args.func(args) == 0
    items = json.loads(out.read_text())
    assert len(items) == 2
    # a.png is 200x100: Qwen2.5-VL sees it as 196x112 (smart_resize), and the box [20, 10, 120, 60] there
    assert items[0]["conversations"][1]["content"] == "<|box_start|>(20,11),(118,67)<|box_end|>"
    assert json.loads(capsys.readouterr().out)["empty_boxes"] == 1
