"""The commands wired to `mllm.vlm` (chat, answer, compare-decoding, ground) on a tiny directory of each
transformers family: the same flags as for MiniCPM-V, the answers those of the interface (whose parity with
transformers' generate tests/test_vlm.py checks)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from helpers.data_files import IMAGE_IDS, SYNONYMS, write_coco
from helpers.vlm_tiny import FAMILIES, build_tiny
from PIL import Image

from mllm.api import load_vlm
from mllm.cli import main
from mllm.model.chat import decoding_kwargs

QUESTION = "What is in the image?"


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param.replace("-", "_")))


@pytest.fixture(scope="module")
def family_vlm(family_dir):
    return load_vlm(family_dir, device="cpu")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_vlm(qwen_dir, device="cpu")


def _image(color: tuple[int, int, int], size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((250, 250, 0), (4, 4, 20, 20))
    return image


def test_chat_answers_with_the_interface(family_dir, family_vlm, tmp_path, capsys) -> None:
    path = tmp_path / "red.png"
    _image((200, 10, 10)).save(path)
    argv = [
        "chat",
        str(family_dir),
        "--image",
        str(path),
        QUESTION,
        "--device",
        "cpu",
        "--max-new-tokens",
        "5",
    ]
    assert main(argv) == 0
    expected = family_vlm.answer(
        [[{"role": "user", "content": [_image((200, 10, 10)), QUESTION]}]],
        **decoding_kwargs("greedy", max_new_tokens=5),
    )[0]
    assert capsys.readouterr().out.strip() == expected
    assert main([*argv, "--fast-generate"]) == 2
    assert "--fast-generate is the MiniCPM-V decoding path" in capsys.readouterr().err


def test_chat_interactive_keeps_the_history(qwen_dir, qwen, tmp_path, capsys, monkeypatch) -> None:
    path = tmp_path / "red.png"
    _image((200, 10, 10)).save(path)
    replies = iter([QUESTION, "And the colour?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(replies))
    assert (
        main(["chat", str(qwen_dir), "--image", str(path), "--device", "cpu", "--max-new-tokens", "4"]) == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model> ")]
    kwargs = decoding_kwargs("greedy", max_new_tokens=4)
    history = [{"role": "user", "content": [_image((200, 10, 10)), QUESTION]}]
    first = qwen.answer([history], **kwargs)[0]
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the colour?"}]
    assert lines == [f"model> {first}", f"model> {qwen.answer([history], **kwargs)[0]}"]


def _questions(path: Path) -> Path:
    """objhal_bench format: base64 images of three colours, one COCO id each."""
    with path.open("w") as handle:
        for image_id, color in zip(IMAGE_IDS, [(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
            buffer = io.BytesIO()
            _image(color, (40 + image_id, 48)).save(buffer, format="PNG")
            encoded = base64.b64encode(buffer.getvalue()).decode() + " " * 1000  # > 1000 characters: base64
            record = {"image": encoded, "question": QUESTION, "image_id": image_id}
            handle.write(json.dumps(record) + "\n")
    return path


def test_answer_writes_each_item_once_and_resumes(family_dir, family_vlm, tmp_path, capsys) -> None:
    questions, out = _questions(tmp_path / "q.jsonl"), tmp_path / "answers.jsonl"
    argv = ["answer", str(family_dir), "--questions", str(questions), "--out", str(out)]
    argv += ["--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    records = {r["idx"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == [0, 1, 2]
    kwargs = decoding_kwargs("greedy", max_new_tokens=4)
    for idx, image_id, color in zip(range(3), IMAGE_IDS, [(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        conversation = [{"role": "user", "content": [_image(color, (40 + image_id, 48)), QUESTION]}]
        assert (
            records[idx]["answer"] == family_vlm.answer([conversation], **kwargs)[0]
        )  # batched = one by one
    assert main(argv) == 0
    assert "skipped 3" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3


def test_compare_decoding_runs_every_strategy(family_dir, tmp_path, capsys) -> None:
    coco = write_coco(tmp_path / "coco")
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text(SYNONYMS)
    out = tmp_path / "cmp"
    argv = [
        "compare-decoding", str(family_dir), "--questions", str(_questions(tmp_path / "q.jsonl")),
        "--coco-path", str(coco), "--cache", str(tmp_path / "gt.json"), "--synonyms", str(synonyms),
        "--nlp", "builtin", "--out-dir", str(out), "--batch-size", "3", "--max-new-tokens", "3", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "decoding_comparison.json").read_text())
    assert [r["strategy"] for r in report["results"]] == ["greedy", "sampling", "beam"]
    for row in report["results"]:
        assert row["answers"] == 3 and 0 < row["new_tokens"] <= 9


def test_ground_reads_the_familys_box_syntax(family_dir, family_vlm, tmp_path, capsys) -> None:
    path = tmp_path / "scene.png"
    _image((255, 255, 255), (56, 56)).save(path)
    out = tmp_path / "found.png"
    argv = ["ground", str(family_dir), "the yellow square", "--image", str(path), "--out", str(out)]
    code = main([*argv, "--box-format", family_vlm.box_format, "--max-new-tokens", "6", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["expression"] == "the yellow square" and out.is_file()
    assert code == (0 if result["box_pixels"] is not None else 1)
