"""`mllm chat` and `mllm answer` end to end on the fixture checkpoint (greedy answers pinned by the reference)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from mllm.cli import main

# expected/expected.json["generate"]: the reference's greedy text for "What is this?" on img_448x448.png.
REFERENCE_TEXT_448 = "phone\ufffd otherooBe\ufffd otheroogherAfter then"
GREEDY_12 = ["--strategy", "greedy", "--max-new-tokens", "12"]


def test_chat_one_question_matches_the_reference(tiny_model_dir: Path, capsys) -> None:
    image = tiny_model_dir / "images" / "img_448x448.png"
    assert main(["chat", str(tiny_model_dir), "--image", str(image), "What is this?", *GREEDY_12]) == 0
    assert capsys.readouterr().out.strip() == REFERENCE_TEXT_448


def test_chat_interactive_streams_and_keeps_history(tiny_model_dir: Path, capsys, monkeypatch) -> None:
    from mllm.model import chat as chat_module

    seen: list[list[dict]] = []
    real_chat = chat_module.chat

    def spy(model, image, msgs, *args, **kwargs):
        seen.append([dict(m) for m in msgs])
        return real_chat(model, image, msgs, *args, **kwargs)

    monkeypatch.setattr(chat_module, "chat", spy)
    answers = iter(["What is this?", "And now?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    image = tiny_model_dir / "images" / "img_448x448.png"
    assert main(["chat", str(tiny_model_dir), "--image", str(image), *GREEDY_12]) == 0
    out = capsys.readouterr().out
    assert REFERENCE_TEXT_448.replace("\ufffd", "") in out.replace("\ufffd", "")
    assert len(seen) == 2
    second = seen[1]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"].replace("\ufffd", "") == REFERENCE_TEXT_448.replace("\ufffd", "")


def test_chat_reports_an_unreadable_image(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit, match="cannot read the image"):
        main(["chat", str(tiny_model_dir), "--image", str(bad), "What is this?"])


def _questions(tiny_model_dir: Path, path: Path) -> None:
    encoded = base64.b64encode((tiny_model_dir / "images" / "img_448x448.png").read_bytes()).decode()
    lines = [
        {"image": encoded, "question": "What is this?", "image_id": 11, "source": "fixture"},
        {
            "image": str(tiny_model_dir / "images" / "img_90x60.png"),
            "question": "Describe it.",
            "image_id": 12,
        },
        {"image": "A" * 2000, "question": "broken base64", "image_id": 13},
        {"image": encoded, "image_id": 14},
        {"question": "No image at all, just text.", "image_id": 15},
        {"image": encoded, "question": "What is this?", "image_id": 16},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answer_writes_resumes_and_reports_bad_lines(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    questions, out = tmp_path / "objhal.jsonl", tmp_path / "answers.jsonl"
    _questions(tiny_model_dir, questions)
    base = ["answer", str(tiny_model_dir), "--questions", str(questions), "--out", str(out), *GREEDY_12]
    # A first run that stops early (as if killed after two items) ...
    assert main([*base, "--limit", "2", "--batch-size", "2"]) == 0
    assert sorted(r["idx"] for r in _read(out)) == [0, 1]
    # ... plus a torn line left by a kill in the middle of a write.
    with out.open("a") as handle:
        handle.write('{"idx": 5, "question": "What is th')
    assert main([*base, "--batch-size", "3"]) == 0
    summary = capsys.readouterr().out
    assert "skipped 2" in summary and "failed 3" in summary
    records = _read(out)
    assert sorted(r["idx"] for r in records) == [0, 1, 4, 5]  # every usable line once, none twice
    by_idx = {r["idx"]: r for r in records}
    assert by_idx[0]["answer"] == REFERENCE_TEXT_448 == by_idx[5]["answer"]  # batched = alone
    assert set(by_idx[0]) == {"idx", "question", "answer", "model", "metainfos", "image_id"}
    assert by_idx[0]["metainfos"] == {"source": "fixture"} and by_idx[0]["image_id"] == 11
    errors = _read(tmp_path / "answers.errors.jsonl")
    assert sorted(e["line"] for e in errors) == [3, 4, 7]
    assert any("base64" in e["error"] or "image" in e["error"] for e in errors if e["line"] == 3)
    assert any("question" in e["error"] for e in errors if e["line"] == 4)


def test_answer_decode_engines_give_the_same_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--fast-generate` (our static-cache decoder) and `--static-cache` (transformers' engine) answer as the default
    path does, beam search with its repetition penalty included; the two flags exclude each other."""
    questions = tmp_path / "q.jsonl"
    image = str(tiny_model_dir / "images" / "img_90x60.png")
    lines = [{"image": image, "question": "Describe it."}, {"question": "Just text, no image, a longer one."}]
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = {}
    for engine in ([], ["--fast-generate"], ["--static-cache"]):
        out = tmp_path / f"answers{len(answers)}.jsonl"
        args = ["--strategy", "beam", "--max-new-tokens", "10", "--batch-size", "2", *engine]
        assert (
            main(["answer", str(tiny_model_dir), "--questions", str(questions), "--out", str(out), *args])
            == 0
        )
        answers[" ".join(engine)] = [r["answer"] for r in sorted(_read(out), key=lambda r: r["idx"])]
    assert answers["--fast-generate"] == answers[""] == answers["--static-cache"]
    assert all(answers[""])
    with pytest.raises(SystemExit):
        main(
            [
                "answer",
                str(tiny_model_dir),
                "--questions",
                str(questions),
                "--out",
                "x",
                "--fast-generate",
                "--static-cache",
            ]
        )
