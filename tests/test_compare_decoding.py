"""`mllm compare-decoding`: resumable answers per strategy, CHAIR with one evaluator, table/JSON/PNG."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from helpers.data_files import IMAGE_IDS, SYNONYMS, write_coco
from PIL import Image

from mllm.cli import main
from mllm.eval.chair import evaluate_chair, load_evaluator
from mllm.eval.compare_decoding import (
    ComparisonSettings,
    compare_decoding,
    markdown_table,
    validate_strategies,
)

# Captions of the fake model, per strategy and image: greedy hallucinates nothing, sampling a cat on image 11
# and a book on 33, beam mentions no object at all on 22.
CAPTIONS = {
    "greedy": {11: "A dog.", 22: "A cat sleeps.", 33: "A dog on a couch."},
    "sampling": {11: "A dog and a cat play.", 22: "A kitten.", 33: "A puppy reads a book on the sofa."},
    "beam": {11: "A dog.", 22: "Nothing here.", 33: "A dog."},
}


def write_questions(path: Path, image_dir: Path) -> Path:
    """objhal_bench format: base64 images of the fixture, a question, a COCO image id, an extra key."""
    files = ["img_90x60.png", "img_448x448.png", "img_90x60.png"]
    with path.open("w") as handle:
        for imid, name in zip(IMAGE_IDS, files):
            image = base64.b64encode((image_dir / name).read_bytes()).decode()
            record = {
                "image": image,
                "question": "Describe this image in detail.",
                "image_id": imid,
                "src": name,
            }
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture()
def setup(tmp_path: Path, tiny_model_dir: Path):
    coco = write_coco(tmp_path / "coco")
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text(SYNONYMS)
    questions = write_questions(tmp_path / "objhal.jsonl", tiny_model_dir / "images")
    return tmp_path, coco, synonyms, questions


class FakeModel:
    """Answer functions that return the CAPTIONS of a strategy and count their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.kwargs: dict[str, dict] = {}

    def factory(self, strategy: str, kwargs: dict):
        self.kwargs[strategy] = kwargs

        def answer(batch):
            self.calls.append((strategy, [item.idx for item in batch]))
            assert all(item.image is not None and item.image.size in ((90, 60), (448, 448)) for item in batch)
            return [CAPTIONS[strategy][item.image_id] for item in batch], 5 * len(batch)

        return answer


def test_comparison_numbers_resume_and_report(setup) -> None:
    tmp, coco, synonyms, questions = setup
    evaluator = load_evaluator(coco, tmp / "gt.json", synonyms, "builtin")
    out = tmp / "cmp"
    fake = FakeModel()
    settings = ComparisonSettings(model="fake", questions=str(questions), seed=3, max_new_tokens=16, limit=2)
    compare_decoding(questions, out, fake.factory, evaluator, settings)
    assert [s for s, _ in fake.calls] == ["greedy", "greedy", "sampling", "sampling", "beam", "beam"]
    assert fake.kwargs["beam"]["num_beams"] == 3 and fake.kwargs["sampling"]["do_sample"] is True
    assert all(k["max_new_tokens"] == 16 for k in fake.kwargs.values())

    # Resume with all three items: only item 2 is generated, nothing is duplicated.
    fake.calls.clear()
    settings.limit = None
    results = compare_decoding(questions, out, fake.factory, evaluator, settings)
    assert fake.calls == [("greedy", [2]), ("sampling", [2]), ("beam", [2])]
    for strategy in ("greedy", "sampling", "beam"):
        lines = [json.loads(x) for x in (out / f"answers_{strategy}.jsonl").read_text().splitlines()]
        assert sorted(r["idx"] for r in lines) == [0, 1, 2]
        assert lines[0]["metainfos"] == {"src": "img_90x60.png"}
        meta = json.loads((out / f"answers_{strategy}.meta.json").read_text())
        assert meta["new_tokens"] == 15 and meta["seconds"] >= 0

    by_name = {r.strategy: r for r in results}
    greedy, sampling, beam = by_name["greedy"], by_name["sampling"], by_name["beam"]
    assert greedy.chair_s == 0 and greedy.chair_i == 0 and greedy.recall == pytest.approx(4 / 4)
    # sampling: hallucinated captions 11 (cat) and 33 (book); mentions 2 + 1 + 3 = 6, of which 2 hallucinated
    assert sampling.chair_s == pytest.approx(2 / 3) and sampling.chair_i == pytest.approx(2 / 6)
    assert sampling.recall == pytest.approx(4 / 4)
    assert beam.chair_s == 0 and beam.recall == pytest.approx(2 / 4)
    assert greedy.mean_words == pytest.approx((2 + 3 + 5) / 3)
    assert beam.answers == 3 and beam.new_tokens == 15

    table = (out / "decoding_comparison.md").read_text()
    assert "| sampling | 3 | 66.7 | 33.3 | 100.0 |" in table
    assert markdown_table(results) in table and "`builtin` backend" in table
    report = json.loads((out / "decoding_comparison.json").read_text())
    assert [r["strategy"] for r in report["results"]] == ["greedy", "sampling", "beam"]
    assert report["results"][1]["chair_i"] == pytest.approx(2 / 6) and report["nlp_backend"] == "builtin"
    with Image.open(out / "decoding_comparison.png") as png:
        assert png.format == "PNG" and png.size[0] > 500
    details = json.loads((out / "chair_sampling.json").read_text())
    assert [s["mscoco_hallucinated_words"] for s in details["sentences"]][0] == [["cat", "cat"]]

    # A smaller --limit scores the same first items in every strategy.
    settings.limit = 1
    limited = compare_decoding(questions, out, fake.factory, evaluator, settings, ["beam"])
    assert limited[0].answers == 1 and limited[0].recall == 1.0


def test_refuses_to_mix_settings(setup) -> None:
    tmp, coco, synonyms, questions = setup
    evaluator = load_evaluator(coco, tmp / "gt.json", synonyms, "builtin")
    out = tmp / "cmp"
    fake = FakeModel()
    settings = ComparisonSettings(model="fake", questions=str(questions), seed=0, max_new_tokens=16)
    compare_decoding(questions, out, fake.factory, evaluator, settings, ["greedy", "sampling"])
    # greedy does not depend on the seed, so it resumes; sampling with another seed is refused
    settings.seed = 1
    compare_decoding(questions, out, fake.factory, evaluator, settings, ["greedy"])
    with pytest.raises(ValueError, match=r"answers_sampling.jsonl was made with other settings \(seed"):
        compare_decoding(questions, out, fake.factory, evaluator, settings, ["sampling"])
    settings.max_new_tokens = 8
    with pytest.raises(ValueError, match="generation_kwargs"):
        compare_decoding(questions, out, fake.factory, evaluator, settings, ["greedy"])
    (out / "answers_beam.jsonl").write_text('{"idx": 0}\n')
    with pytest.raises(ValueError, match="exists without answers_beam.meta.json"):
        compare_decoding(questions, out, fake.factory, evaluator, settings, ["beam"])
    with pytest.raises(ValueError, match="unknown"):
        validate_strategies(["greedy", "topk"])
    with pytest.raises(ValueError, match="twice"):
        validate_strategies(["beam", "beam"])


def test_cli_end_to_end_on_fixture_model(setup, small_model_dir: Path, capsys) -> None:
    tmp, coco, synonyms, questions = setup
    out = tmp / "cli"
    argv = [
        "compare-decoding", str(small_model_dir), "--questions", str(questions), "--coco-path", str(coco),
        "--cache", str(tmp / "gt.json"), "--synonyms", str(synonyms), "--nlp", "builtin", "--out-dir", str(out),
        "--batch-size", "2", "--max-new-tokens", "6", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "decoding_comparison.json").read_text())
    assert [r["strategy"] for r in report["results"]] == ["greedy", "sampling", "beam"]
    for row in report["results"]:
        answers = out / f"answers_{row['strategy']}.jsonl"
        assert len(answers.read_text().splitlines()) == 3 and row["answers"] == 3
        assert 0 < row["new_tokens"] <= 3 * 6 and row["seconds"] > 0
        direct = evaluate_chair(answers, cache=tmp / "gt.json", synonyms=synonyms, nlp="builtin")
        assert row["chair_s"] == direct["overall_metrics"]["CHAIRs"]
        assert row["len"] == direct["overall_metrics"]["Len"]
        assert f"| {row['strategy']} | 3 |" in printed
    before = {p.name: p.read_bytes() for p in out.glob("answers_*.jsonl")}
    assert main(argv) == 0  # resume: nothing to generate, answers untouched
    assert {p.name: p.read_bytes() for p in out.glob("answers_*.jsonl")} == before
    assert main([*argv[:-4], "--max-new-tokens", "3", "--device", "cpu"]) == 2  # other settings: refused
    assert "made with other settings" in capsys.readouterr().err
    assert main(["compare-decoding", str(small_model_dir), "--questions", str(questions)]) == 2
    assert "give --coco-path or --cache" in capsys.readouterr().err
