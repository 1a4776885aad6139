"""CHAIR: equality with the reference's output on the golden fixture, safe pickle loading, input errors, backends."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nltk
import pytest

from mllm.cli import main
from mllm.eval.chair import (
    CHAIREvaluator,
    evaluate_chair,
    format_metrics,
    load_evaluator,
    load_vocabulary,
    parse_image_id,
)
from mllm.eval.chair_nlp import BuiltinLemmatizer, MissingNLTKResourceError, make_lemmatizer


@pytest.fixture
def nltk_data(monkeypatch, nltk_data_dir):
    """NLTK finds the shared offline resources first (as NLTK_DATA would arrange)."""
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data_dir)] + list(nltk.data.path))
    return nltk_data_dir


def _expected(chair_fixture_dir: Path, name: str) -> dict:
    return json.loads((chair_fixture_dir / name).read_text())


def assert_same_as_reference(result: dict, expected: dict) -> None:
    """Overall metrics and every per-caption field equal; ground-truth words compared as sets (a set upstream)."""
    assert result["overall_metrics"] == expected["overall_metrics"]
    assert len(result["sentences"]) == len(expected["sentences"])
    for ours, theirs in zip(result["sentences"], expected["sentences"]):
        assert set(ours) >= set(theirs)
        for key, value in theirs.items():
            if key == "mscoco_gt_words":
                assert set(ours[key]) == set(value), key
            else:
                assert ours[key] == value, (ours["caption"], key)


@pytest.mark.parametrize(
    "answers, expected",
    [("answers.jsonl", "expected_chair.json"), ("answers_str_ids.jsonl", "expected_chair_str_ids.json")],
)
def test_matches_reference_from_annotations(nltk_data, chair_fixture_dir, tmp_path, answers, expected):
    cache = tmp_path / "gt.json"
    result = evaluate_chair(
        chair_fixture_dir / answers, coco_path=chair_fixture_dir / "annotations", cache=cache
    )
    assert_same_as_reference(result, _expected(chair_fixture_dir, expected))
    assert result["nlp_backend"] == "nltk"
    assert result["ground_truth"]["kind"] == "coco annotations"
    assert json.loads(cache.read_text())["imid_to_objects"]["300"] == ["bottle", "toilet"]
    # The second run reads the cache, not the annotations, and gives the same numbers.
    again = evaluate_chair(chair_fixture_dir / answers, coco_path=chair_fixture_dir, cache=cache)
    assert again["ground_truth"]["kind"] == "cache"
    assert_same_as_reference(again, _expected(chair_fixture_dir, expected))


@pytest.mark.parametrize(
    "answers, expected",
    [("answers.jsonl", "expected_chair.json"), ("answers_str_ids.jsonl", "expected_chair_str_ids.json")],
)
def test_matches_reference_from_pickle(nltk_data, chair_fixture_dir, answers, expected):
    result = evaluate_chair(chair_fixture_dir / answers, cache=chair_fixture_dir / "chair_tiny.pkl")
    assert_same_as_reference(result, _expected(chair_fixture_dir, expected))
    assert result["ground_truth"]["kind"] == "reference pickle"


def test_default_cache_goes_to_user_cache_folder(nltk_data, chair_fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = load_evaluator(coco_path=chair_fixture_dir)
    cached = list((tmp_path / "mllm" / "chair").glob("ground_truth_*.json"))
    assert len(cached) == 1
    second = load_evaluator(coco_path=chair_fixture_dir)
    assert second.ground_truth_info["kind"] == "cache"
    assert second.imid_to_objects == first.imid_to_objects
    with pytest.raises(ValueError, match="built with --nlp nltk"):
        load_evaluator(coco_path=chair_fixture_dir, cache=cached[0], nlp="builtin")


def test_synonyms_file_equals_reference_lists(chair_fixture_dir):
    """The packaged COCO list and double words equal the reference evaluator's (pickled) tables."""
    from mllm.eval.chair import _ReferenceCHAIRState, _RestrictedUnpickler

    with (chair_fixture_dir / "chair_tiny.pkl").open("rb") as handle:
        state = _RestrictedUnpickler(handle).load()
    assert isinstance(state, _ReferenceCHAIRState)
    vocabulary = load_vocabulary()
    reference_inverse = {k: v for k, v in state.state["inverse_synonym_dict"].items() if k}
    assert vocabulary.inverse_synonyms == reference_inverse
    assert vocabulary.double_words == state.state["double_word_dict"]
    assert len(vocabulary.node_words) == 80
    assert vocabulary.object_words == set(state.state["mscoco_objects"]) - {""}


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(chair_fixture_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "chair_300.pkl"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        evil.write_bytes(pickle.dumps(_RunsCode(marker), protocol=protocol))
        with pytest.raises(ValueError, match=r"refusing to load (posix|os|nt)\.system"):
            load_evaluator(cache=evil, nlp="builtin")
        assert not marker.exists()
    # A pickle naming an allowed class but calling something else through it is refused too.
    evil.write_bytes(pickle.dumps({"x": eval}))
    with pytest.raises(ValueError, match=r"refusing to load builtins\.eval"):
        load_evaluator(cache=evil, nlp="builtin")


def test_pickle_with_other_synonyms_is_refused(chair_fixture_dir, tmp_path):
    synonyms = tmp_path / "toy.txt"
    synonyms.write_text("cube, block\nsphere, ball\n")
    with pytest.raises(ValueError, match="synonyms differ"):
        load_evaluator(cache=chair_fixture_dir / "chair_tiny.pkl", synonyms=synonyms, nlp="builtin")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"answers\.jsonl:2: invalid JSON"),
        ('{"image_id": 100, "text": "a dog"}', r"answers\.jsonl:2: no 'answer' key \(--caption-key\)"),
        ('{"answer": "a dog"}', r"answers\.jsonl:2: no 'image_id' key"),
        (
            '{"image_id": 123456, "answer": "a dog"}',
            r"answers\.jsonl:2: image id 123456 is not in the CHAIR ground",
        ),
        (
            '{"image_id": "cat.jpg", "answer": "a dog"}',
            r"answers\.jsonl:2: image_id='cat\.jpg' is not a COCO image id",
        ),
    ],
)
def test_bad_answer_lines_name_the_line(chair_fixture_dir, tmp_path, line, message):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"image_id": 100, "answer": "a dog on a couch"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        evaluate_chair(answers, cache=chair_fixture_dir / "chair_tiny.pkl", nlp="builtin")


def test_image_id_in_metainfos_and_custom_keys(chair_fixture_dir, tmp_path):
    answers = tmp_path / "answers.jsonl"
    rows = [
        {"text": "A dog and a cat on a sofa.", "metainfos": {"img": "COCO_val2014_000000000100.jpg"}},
        {"text": "A teddy bear on a chair.", "img": 500},
    ]
    answers.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = evaluate_chair(
        answers,
        cache=chair_fixture_dir / "chair_tiny.pkl",
        nlp="builtin",
        image_id_key="img",
        caption_key="text",
    )
    assert [s["image_id"] for s in result["sentences"]] == [100, 500]
    assert result["sentences"][0]["mscoco_hallucinated_words"] == [["cat", "cat"]]
    assert result["sentences"][1]["mscoco_generated_words"] == ["teddy bear", "chair"]
    assert result["nlp_backend"] == "builtin"


def test_parse_image_id_forms():
    assert parse_image_id(42, "x", "image_id") == 42
    assert parse_image_id("42", "x", "image_id") == 42
    assert parse_image_id("COCO_val2014_000000000042.jpg", "x", "image_id") == 42
    assert parse_image_id("val2014/COCO_train2014_000000000900.jpg", "x", "image_id") == 900
    with pytest.raises(ValueError, match="x: image_id=True"):
        parse_image_id(True, "x", "image_id")


SIMPLE_CAPTIONS = [
    "A dog is lying on a couch next to a cat.",
    "Two women are sitting at a dining table with cups and bottles.",
    "A baby bird sits on a bench near some buses.",
    "The children play with kites and a frisbee in the park.",
    "A man holds a cell phone while hot dogs grill on the oven.",
    "Knives, forks and wine glasses are on the table.",
    "Three ponies and a sheep stand by the fire hydrant.",
    "The toilet seat is up and there is a sink beside the bathtub.",
    "A teddy bear and some books lie on the bed.",
    "A passenger train passes a traffic light.",
]

# Where the builtin backend differs from NLTK (so its numbers are not the reference's):
DIFFERENCES = {
    # NLTK's WordNet lemmatizer keeps "men" (itself a WordNet noun), so the reference does not see a person here.
    "Some men stand on the street.": (["person"], []),
    # NLTK lemmatizes verbs: "biking" -> "bike" -> bicycle; the builtin backend only singularizes nouns.
    "A girl is biking down the street.": (["person"], ["person", "bicycle"]),
}


def test_builtin_agrees_with_nltk_on_simple_captions(nltk_data):
    vocabulary = load_vocabulary()
    ground_truth = {1: {"dog"}}
    with_nltk = CHAIREvaluator(ground_truth, vocabulary, make_lemmatizer("nltk", vocabulary.single_words()))
    with_builtin = CHAIREvaluator(
        ground_truth, vocabulary, make_lemmatizer("builtin", vocabulary.single_words())
    )
    for caption in SIMPLE_CAPTIONS:
        ours, reference = with_builtin.caption_to_words(caption), with_nltk.caption_to_words(caption)
        assert ours.node_words == reference.node_words, caption
        assert ours.words == reference.words, caption
        assert ours.idxs == reference.idxs, caption
    for caption, (builtin_nodes, nltk_nodes) in DIFFERENCES.items():
        assert with_builtin.caption_to_words(caption).node_words == builtin_nodes
        assert with_nltk.caption_to_words(caption).node_words == nltk_nodes
    # Tokens differ too: NLTK keeps "mr." and lemmatizes verbs ("is" -> "be"); so Len differs slightly.
    assert with_nltk.caption_to_words("Mr. Smith is here.").tokens == ["mr.", "smith", "be", "here", "."]
    assert with_builtin.caption_to_words("Mr. Smith is here.").tokens == [
        "mr",
        ".",
        "smith",
        "is",
        "here",
        ".",
    ]


def test_builtin_singularizes_only_to_vocabulary_words():
    lemmatizer = BuiltinLemmatizer({"bus", "glass", "knife", "pony", "bench", "man", "dog"})
    assert lemmatizer.lemmatize("buses glasses knives ponies benches men dogs") == [
        "bus", "glass", "knife", "pony", "bench", "man", "dog",
    ]  # fmt: skip
    assert lemmatizer.lemmatize("bus is this glass") == ["bus", "is", "this", "glass"]


def test_toilet_seat_rule(nltk_data):
    """A toilet seat is no chair. As in the reference, dropping "seat" shifts the indices of later mentions."""
    vocabulary = load_vocabulary()
    evaluator = CHAIREvaluator(
        {1: {"toilet"}}, vocabulary, make_lemmatizer("nltk", vocabulary.single_words())
    )
    found = evaluator.caption_to_words("a toilet with a seat and a dog")
    assert found.node_words == ["toilet", "dog"]
    assert found.idxs == [1, 6]  # "dog" is token 7; the reference reports 6
    assert evaluator.caption_to_words("a seat and a dog").node_words == ["chair", "dog"]


def test_custom_synonyms_vocabulary(tmp_path):
    synonyms = tmp_path / "toy_synonyms.txt"
    synonyms.write_text(
        "# toy world objects\nred cube, red block, cube\nball, sphere, orb\ntree, pine tree\n"
    )
    vocabulary = load_vocabulary(synonyms)
    assert vocabulary.source == str(synonyms)
    assert vocabulary.double_words == {
        "red block": "red block",
        "red cube": "red cube",
        "pine tree": "pine tree",
    }
    assert not vocabulary.coco_rules
    lemmatizer = make_lemmatizer("builtin", vocabulary.single_words())
    evaluator = CHAIREvaluator({7: {"red cube", "tree"}, 8: set()}, vocabulary, lemmatizer)
    result = evaluator.compute(
        [(7, "Two red blocks sit under pine trees next to an orb."), (8, "Nothing here.")]
    )
    first = result["sentences"][0]
    assert first["mscoco_generated_words"] == ["red cube", "tree", "ball"]
    assert first["mscoco_hallucinated_words"] == [["orb", "ball"]]
    assert first["hallucination_idxs"] == [10]  # index of "orb" among the lemmas before merging
    assert result["overall_metrics"]["CHAIRs"] == 0.5
    assert result["overall_metrics"]["CHAIRi"] == pytest.approx(1 / 3)
    assert result["overall_metrics"]["Recall"] == 1.0
    # COCO words mean nothing in this vocabulary.
    assert evaluator.caption_to_words("a dog on a couch").words == []


def test_bad_synonyms_file_names_line(tmp_path):
    synonyms = tmp_path / "bad.txt"
    synonyms.write_text("cube, block\nball, , orb\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: empty synonym"):
        load_vocabulary(synonyms)
    with pytest.raises(ValueError, match="--synonyms: file not found"):
        load_vocabulary(tmp_path / "missing.txt")


def test_missing_nltk_resources_message(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MissingNLTKResourceError) as info:
        make_lemmatizer("nltk", [])
    message = str(info.value)
    assert "punkt_tab, averaged_perceptron_tagger_eng, wordnet" in message
    assert "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet" in message
    assert "NLTK_DATA=" in message
    assert "--nlp builtin" in message
    assert str(tmp_path) in message
    with pytest.raises(ValueError, match="--nlp: unknown CHAIR backend 'spacy'"):
        make_lemmatizer("spacy", [])


def test_format_metrics_like_reference():
    text = format_metrics({"CHAIRs": 0.857142857, "CHAIRi": 0.28125, "Recall": 0.7826, "Len": 0.2342857})
    assert text.splitlines() == [
        "CHAIRs    : 85.7",
        "CHAIRi    : 28.1",
        "Recall    : 78.3",
        "Len       : 23.4",
    ]


def test_cli_end_to_end(nltk_data, chair_fixture_dir, tmp_path, capsys):
    out = tmp_path / "chair.json"
    argv = [
        "chair",
        "--answers",
        str(chair_fixture_dir / "answers.jsonl"),
        "--coco-path",
        str(chair_fixture_dir),
    ]
    argv += ["--cache", str(tmp_path / "gt.json"), "--save-path", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for line in ("CHAIRs    : 85.7", "CHAIRi    : 28.1", "Recall    : 78.3", "Len       : 23.4"):
        assert line in printed
    saved = json.loads(out.read_text())
    assert saved["nlp_backend"] == "nltk"
    assert_same_as_reference(saved, _expected(chair_fixture_dir, "expected_chair.json"))
    # An existing --save-path is never replaced silently.
    out.write_text("keep me")
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(argv + ["--overwrite", "--nlp", "builtin", "--cache", str(tmp_path / "gt_builtin.json")]) == 0
    assert json.loads(out.read_text())["nlp_backend"] == "builtin"
    # Input errors come back as a message and exit status 2, not a traceback.
    assert main(["chair", "--answers", str(tmp_path / "nope.jsonl"), "--nlp", "builtin"]) == 2
    assert "--answers: file not found" in capsys.readouterr().err


def test_bad_ground_truth_inputs(chair_fixture_dir, tmp_path):
    with pytest.raises(ValueError, match="--coco-path .*instances_val2014.json"):
        load_evaluator(coco_path=tmp_path, nlp="builtin")
    with pytest.raises(ValueError, match="does not exist and no --coco-path"):
        load_evaluator(cache=tmp_path / "missing.pkl", nlp="builtin")
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(pickle.dumps({"imid_to_objects": {}})[:-5])
    with pytest.raises(ValueError, match="not a loadable CHAIR evaluator pickle"):
        load_evaluator(cache=broken, nlp="builtin")
    # Ground truth made for another vocabulary: the COCO category "couch" is unknown to it.
    synonyms = tmp_path / "toy.txt"
    synonyms.write_text("person, man\ndog, puppy\n")
    with pytest.raises(ValueError, match=r"instances_val2014\.json: category '.*' is not in the vocabulary"):
        load_evaluator(
            coco_path=chair_fixture_dir, cache=tmp_path / "gt.json", synonyms=synonyms, nlp="builtin"
        )
