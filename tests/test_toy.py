"""The toy world generator, its tokenizer and the tiny preset: determinism, the real file formats, and parity of the
tokenizer's layout and chat template with the MiniCPM-V fixture tokenizer."""

from __future__ import annotations

import argparse
import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm.toy.tokenizer import SPECIAL_TOKENS, build_toy_tokenizer, toy_corpus, write_toy_preset
from mllm.toy.world import COLORS, DESCRIBE_QUESTION, QUESTION_TYPES, SHAPES, YES_NO_SUFFIX, make_toy_world

SMALL = {"n_train": 200, "n_test": 24, "n_preference": 60}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "world"
    make_toy_world(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, dict]:
    """Ground truth by image path."""
    return {s["image"]: s for s in json.loads((world / "scenes.json").read_text())["scenes"]}


@pytest.fixture(scope="module")
def toy_tok_dir(world, tmp_path_factory) -> Path:
    return build_toy_tokenizer(toy_corpus(world), tmp_path_factory.mktemp("tok"), vocab_size=600)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shapes_in(text: str) -> set[str]:
    words = {w.strip(".,").lower() for w in text.split()}
    return {s for s in SHAPES if s in words}


# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    make_toy_world(again, seed=0, **SMALL)
    first, second = tree_bytes(world), tree_bytes(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other"
    make_toy_world(other, seed=1, **SMALL)
    third = tree_bytes(other)
    assert third["sft/train.json"] != first["sft/train.json"]
    assert third["images/existence/train_00000.png"] != first["images/existence/train_00000.png"]


def test_refuses_non_empty_folder_unless_overwrite(world, tmp_path):
    with pytest.raises(ValueError, match="not empty"):
        make_toy_world(world, seed=0, **SMALL)
    target = tmp_path / "w"
    make_toy_world(target, seed=0, n_train=8, n_test=4, n_preference=2)
    counts = make_toy_world(target, seed=0, n_train=4, n_test=4, n_preference=2, overwrite=True)
    assert counts["train_images"] == 4
    assert len(list((target / "images").rglob("train_*.png"))) == 4  # stale images of the first run are gone
    with pytest.raises(ValueError, match="unknown toy world option"):
        make_toy_world(tmp_path / "x", n_trains=3)
    with pytest.raises(ValueError, match="noise_rate"):
        make_toy_world(tmp_path / "y", noise_rate=1.5)


OPEN_QUESTIONS = (
    "What colours are in the image?",
    "How many objects are in the image?",
    "What colour is the ",
)


def turns(item: dict) -> list[tuple[str, str]]:
    """(question without the image tag, answer) per turn."""
    conversation = item["conversations"]
    return [
        (user["content"].removeprefix("<image>\n"), assistant["content"])
        for user, assistant in zip(conversation[::2], conversation[1::2])
    ]


def test_sft_format_images_and_yes_no_balance(world, scenes):
    for split, n_images in (("train", SMALL["n_train"]), ("test", SMALL["n_test"])):
        items = json.loads((world / "sft" / f"{split}.json").read_text())
        # Held-out images: one yes/no pair and a description (MME). Training images: two pairs (existence and count
        # fit every scene), the description and 2-3 short-answer questions.
        per_image = Counter(item["image"] for item in items)
        assert len(per_image) == n_images and set(per_image.values()) == ({3} if split == "test" else {7, 8})
        assert sorted(item["id"] for item in items) == list(range(len(items)))
        answers = Counter()
        for item in items:
            assert set(item) == {"id", "image", "conversations"}
            category = item["image"].split("/")[1]
            assert item["image"].startswith("images/") and category in QUESTION_TYPES
            user, assistant = item["conversations"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].startswith("<image>\n")
            ((question, answer),) = turns(item)
            if question == DESCRIBE_QUESTION:
                assert answer.startswith("There ")
            elif question.startswith(OPEN_QUESTIONS):
                assert split == "train" and answer.endswith(".")
            else:
                assert question.endswith(YES_NO_SUFFIX) and answer in ("Yes", "No")
                answers[answer] += 1
            assert item["image"] in scenes
        assert answers["Yes"] == answers["No"] == n_images * (1 if split == "test" else 2)
    for path in list(scenes)[:: max(1, len(scenes) // 20)]:
        with Image.open(world / path) as image:
            assert image.format == "PNG" and image.size == (112, 112) and image.mode == "RGB"


def test_yes_no_answers_are_true_for_the_scene(world, scenes):
    """Existence and count answers checked against the ground truth, independently of the generator's logic."""
    checked = Counter()
    for split in ("train", "test"):
        for item in json.loads((world / "sft" / f"{split}.json").read_text()):
            objects = scenes[item["image"]]["objects"]
            for question, answer in turns(item):
                words = question.rstrip("?.").split()
                if words[:3] == ["Is", "there", "a"] and words[3] in SHAPES:
                    assert (answer == "Yes") == any(o["shape"] == words[3] for o in objects)
                    checked["shape"] += 1
                elif words[:2] == ["Is", "there"] and words[3] in COLORS and words[4] == "object":
                    assert (answer == "Yes") == any(o["color"] == words[3] for o in objects)
                    checked["colour"] += 1
                elif "Are there exactly" in question or "Is there exactly" in question:
                    n = int(next(w for w in words if w.isdigit()))
                    assert (answer == "Yes") == (n == len(objects))
                    checked["count"] += 1
    assert min(checked.values()) > 50 and len(checked) == 3


def test_yes_no_category_reads_the_category_back_from_the_question():
    from mllm.toy.world import ToyWorldConfig, sample_objects, yes_no_category, yes_no_pair

    rng = np.random.default_rng(0)
    cfg = ToyWorldConfig(seed=0)
    seen = Counter()
    while min(seen.get(c, 0) for c in QUESTION_TYPES) < 20:
        objects = sample_objects(rng, cfg)
        for category in QUESTION_TYPES:
            pair = yes_no_pair(category, objects, cfg.image_size, rng) if objects else None
            for question, _ in pair or []:  # None: the scene cannot support the category
                assert yes_no_category("<image>\n" + question + YES_NO_SUFFIX) == category
                assert yes_no_category(question + YES_NO_SUFFIX) == category
                seen[category] += 1
    assert yes_no_category(DESCRIBE_QUESTION) is None
    assert yes_no_category("What colour is the star?") is None


def test_short_answers_are_true_for_the_scene(world, scenes):
    seen = Counter()
    for item in json.loads((world / "sft" / "train.json").read_text()):
        objects = scenes[item["image"]]["objects"]
        for question, answer in turns(item):
            if question == "What colours are in the image?":
                assert set(answer.rstrip(".").split(", ")) == {o["color"] for o in objects}
            elif question == "How many objects are in the image?":
                assert answer == f"{len(objects)}."
            elif question.startswith("What colour is the "):
                shape = question.removeprefix("What colour is the ").rstrip("?")
                (obj,) = [o for o in objects if o["shape"] == shape]
                assert answer == f"{obj['color']}."
            else:
                continue
            seen[question.split()[1]] += 1
    assert seen["colours"] == seen["many"] == SMALL["n_train"] and seen["colour"] > SMALL["n_train"] // 2


def test_noise_rate_close_to_requested(tmp_path):
    out = tmp_path / "noisy"
    counts = make_toy_world(out, seed=3, n_train=200, n_test=10, n_preference=0, noise_rate=0.15)
    assert counts["noisy_train_descriptions"] == 30
    truth = {s["image"]: s for s in json.loads((out / "scenes.json").read_text())["scenes"]}
    for split, expected in (("train", 30), ("test", 0)):
        noisy = 0
        for item in json.loads((out / "sft" / f"{split}.json").read_text()):
            if item["conversations"][0]["content"].endswith(DESCRIBE_QUESTION):
                present = {o["shape"] for o in truth[item["image"]]["objects"]}
                mentioned = shapes_in(item["conversations"][1]["content"])
                assert present <= mentioned  # every real object is described
                noisy += bool(mentioned - present)
        assert noisy == expected


def test_objhal_and_coco_annotations(world, scenes):
    lines = [json.loads(line) for line in (world / "objhal_bench.jsonl").read_text().splitlines()]
    assert len(lines) == SMALL["n_test"]
    val = json.loads((world / "coco" / "annotations" / "instances_val2014.json").read_text())
    captions = json.loads((world / "coco" / "annotations" / "captions_val2014.json").read_text())
    val_ids = {image["id"] for image in val["images"]}
    for line in lines:
        assert set(line) == {"image", "question", "image_id"} and line["question"] == DESCRIBE_QUESTION
        assert isinstance(line["image_id"], int) and line["image_id"] in val_ids
        assert len(line["image"]) > 1000  # the exercise's rule for telling base64 from a path
        with Image.open(io.BytesIO(base64.b64decode(line["image"]))) as image:
            assert image.format == "PNG" and image.size == (112, 112)
    for data in (val, captions):
        assert {"info", "licenses", "images", "annotations"} <= set(data)
        assert all({"id", "file_name", "height", "width"} <= set(image) for image in data["images"])
    assert [c["name"] for c in val["categories"]] == list(SHAPES)
    by_id = {s["image_id"]: s for s in scenes.values()}
    names = {c["id"]: c["name"] for c in val["categories"]}
    for annotation in val["annotations"]:
        objects = by_id[annotation["image_id"]]["objects"]
        assert names[annotation["category_id"]] in {o["shape"] for o in objects}
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and x + w <= 112 and y + h <= 112
    assert {c["image_id"] for c in captions["annotations"]} == val_ids
    for name in ("instances_train2014.json", "captions_train2014.json"):
        assert json.loads((world / "coco" / "annotations" / name).read_text())["images"]
    lines = (world / "coco" / "synonyms.txt").read_text().splitlines()
    assert [line.split(", ")[0] for line in lines] == list(SHAPES)
    assert "circles" in lines[0].split(", ")


def nearest_color(pixel) -> str:
    return min(COLORS, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(pixel, COLORS[name])))


def test_rec_boxes_match_drawn_objects(world, scenes):
    templates = json.loads((world / "grounding" / "templates_rec.json").read_text())
    assert templates and all(t.count("<image>") == 1 and t.count("<expr>") == 1 for t in templates)
    for name, n_images in (("rec_train.jsonl", SMALL["n_train"]), ("rec_val.jsonl", SMALL["n_test"])):
        records = [json.loads(line) for line in (world / "grounding" / name).read_text().splitlines()]
        assert len({r["img_path"] for r in records}) == n_images
        per_image: dict[str, list[str]] = {}
        for record in records:
            assert set(record) == {"img_path", "expression", "bbox", "height", "width"}
            x1, y1, x2, y2 = record["bbox"]
            assert 0 <= x1 < x2 < record["width"] and 0 <= y1 < y2 < record["height"]
            pixels = np.asarray(Image.open(world / record["img_path"]).convert("RGB"))
            color = nearest_color(pixels[round((y1 + y2) / 2), round((x1 + x2) / 2)])
            words = set(record["expression"].split())
            matches = [
                o
                for o in scenes[record["img_path"]]["objects"]
                if (o["shape"] in words or "object" in words)
                and (o["color"] in words or not words & set(COLORS))
            ]
            assert len(matches) == 1 or any(w in words for w in ("left", "right", "top", "bottom", "center"))
            target = next(o for o in scenes[record["img_path"]]["objects"] if o["bbox"] == record["bbox"])
            assert target in matches and color == target["color"]
            per_image.setdefault(record["img_path"], []).append(record["expression"])
        assert all(len(set(e)) == len(e) for e in per_image.values())


def test_preference_pairs(world, scenes, tmp_path):
    items = json.loads((world / "preference" / "preference_train.json").read_text())
    assert len(items) == SMALL["n_preference"] and [i["idx"] for i in items] == list(range(len(items)))
    for item in items:
        assert set(item) == {"idx", "question", "chosen", "rejected", "image_path"}
        assert item["question"] == DESCRIBE_QUESTION and item["chosen"] != item["rejected"]
        present = {o["shape"] for o in scenes[item["image_path"]]["objects"]}
        assert shapes_in(item["chosen"]) == present
        assert shapes_in(item["rejected"]) - present
        assert (world / item["image_path"]).is_file()
    out = tmp_path / "b64"
    make_toy_world(out, n_train=6, n_test=2, n_preference=3, preference_image="base64")
    b64_items = json.loads((out / "preference" / "preference_train.json").read_text())
    assert "image_path" not in b64_items[0] and len(b64_items[0]["image"]) > 1000
    assert base64.b64decode(b64_items[0]["image"]) == (out / "images/existence/train_00000.png").read_bytes()


def test_chair_scores_toy_hallucinations(world, tmp_path):
    """End to end with `mllm chair`: correct descriptions score 0, preference `rejected` answers do not."""
    from mllm.eval.chair import evaluate_chair

    scenes_by_id = {s["image_id"]: s for s in json.loads((world / "scenes.json").read_text())["scenes"]}
    lines = [json.loads(line) for line in (world / "objhal_bench.jsonl").read_text().splitlines()]
    good = [{"image_id": x["image_id"], "answer": scenes_by_id[x["image_id"]]["description"]} for x in lines]
    bad = [
        {"image_id": x["image_id"], "answer": g["answer"] + " A red star on the left."}
        for x, g in zip(lines, good)
    ]
    results = {}
    for name, answers in (("good", good), ("bad", bad)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(a) + "\n" for a in answers))
        results[name] = evaluate_chair(
            path,
            coco_path=world / "coco",
            cache=tmp_path / "cache.json",
            synonyms=world / "coco" / "synonyms.txt",
            nlp="builtin",
        )["overall_metrics"]
    assert results["good"]["CHAIRi"] == 0.0 and results["good"]["Recall"] == 1.0
    has_star = sum("star" in {o["shape"] for o in scenes_by_id[x["image_id"]]["objects"]} for x in lines)
    assert results["bad"]["CHAIRs"] == pytest.approx((len(lines) - has_star) / len(lines))


# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_layout_and_round_trip(toy_tok_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_tok_dir)
    ref = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(tok) is type(ref)
    n = len(tok)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(n - len(SPECIAL_TOKENS), n))
    for token in SPECIAL_TOKENS:
        assert tok.encode(token) == [tok.convert_tokens_to_ids(token)]
    assert tok.convert_ids_to_tokens(list(range(5))) == ref.convert_ids_to_tokens(
        list(range(5))
    )  # id 0 is "!"
    assert tok.convert_ids_to_tokens(255) == ref.convert_ids_to_tokens(255)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        ref.bos_token,
        ref.eos_token,
        ref.pad_token,
        ref.unk_token,
    )
    assert tok.encode("\n") == [198] and all(len(tok.encode(w)) == 1 for w in ("user", "assistant", "system"))
    for text in (
        "There are 3 objects. A red circle at the top left.",
        "[0.125,0.500,0.750,0.999] café ✓",
        "x\n\ny",
    ):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("123") == [tok.convert_tokens_to_ids(d) for d in "123"]  # digits one at a time
    assert len(tok.encode("Describe this image in detail.")) <= 8  # the toy corpus was learned


def test_chat_template_matches_fixture(toy_tok_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_tok_dir)
    ref = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = [
        [{"role": "user", "content": "(<image>./</image>)\nDescribe this image in detail."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nIs there a star? Please answer yes or no."},
            {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "Where is the red circle?"},
        ],
    ]
    for messages in conversations:
        for generation in (True, False):
            ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert ours == theirs
    rendered = tok.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert tok.decode(tok.encode(rendered)) == rendered


def test_tokenizer_files_mirror_fixture_and_are_deterministic(world, toy_tok_dir, tiny_model_dir, tmp_path):
    again = build_toy_tokenizer(toy_corpus(world), tmp_path / "tok2", vocab_size=600)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (toy_tok_dir / name).read_bytes()
        ours, theirs = (
            json.loads((toy_tok_dir / name).read_text()),
            json.loads((tiny_model_dir / name).read_text()),
        )
        assert set(ours) == set(theirs)
    ours, theirs = (json.loads((d / "tokenizer.json").read_text()) for d in (toy_tok_dir, tiny_model_dir))
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == theirs[key]
    assert {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")} == {
        k: v for k, v in theirs["model"].items() if k not in ("vocab", "merges")
    }
    assert all(isinstance(m, str) for m in ours["model"]["merges"])
    config, ref_config = (
        json.loads((d / "tokenizer_config.json").read_text()) for d in (toy_tok_dir, tiny_model_dir)
    )
    assert config["chat_template"] == ref_config["chat_template"]
    with pytest.raises(ValueError, match="vocab_size"):
        build_toy_tokenizer(["a b"], tmp_path / "tiny", vocab_size=100)


def test_preset_directory(toy_tok_dir, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = write_toy_preset(tmp_path / "preset", toy_tok_dir)
    config = json.loads((out / "config.json").read_text())
    ref = json.loads((tiny_model_dir / "config.json").read_text())
    assert set(ref) - set(config) == {"transformers_version"}
    assert set(config["vision_config"]) == set(ref["vision_config"])
    assert config["model_type"] == "mllm" and config["slice_config"]["max_slice_nums"] == 1
    assert (config["num_hidden_layers"], config["hidden_size"]) == (4, 256)
    assert (config["vision_config"]["num_hidden_layers"], config["vision_config"]["hidden_size"]) == (4, 128)
    tok = AutoTokenizer.from_pretrained(out)
    assert config["vocab_size"] == len(tok)
    assert config["bos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    pre = json.loads((out / "preprocessor_config.json").read_text())
    ref_pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert list(pre) == list(ref_pre)
    assert (pre["max_slice_nums"], pre["scale_resolution"], pre["image_feature_size"]) == (
        1,
        112,
        config["query_num"],
    )
    extra = write_toy_preset(tmp_path / "extra", toy_tok_dir, vision_stem="conv")
    assert json.loads((extra / "config.json").read_text())["vision_stem"] == "conv"
    with pytest.raises(ValueError, match="tokenizer.json"):
        write_toy_preset(tmp_path / "bad", tmp_path)


def test_cli_make_and_tokenizer(tmp_path, capsys):
    from mllm.cli import toy as toy_cli

    parser = argparse.ArgumentParser(prog="mllm")
    toy_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli_world"
    args = parser.parse_args(["toy", "make", str(out), "--seed", "2", "--n-train", "8", "--n-test", "4"])
    assert args.func(args) == 0
    assert json.loads((out / "scenes.json").read_text())["config"]["seed"] == 2
    assert args.func(args) == 2  # non-empty folder without --overwrite
    assert "not empty" in capsys.readouterr().err
    args = parser.parse_args(
        ["toy", "make", str(out), "--n-train", "6", "--n-test", "4", "--overwrite", "--no-open-questions"]
        + ["--train-yes-no-pairs", "1"]
    )
    assert args.func(args) == 0
    # one pair and one description per image, as in the held-out split
    assert len(json.loads((out / "sft" / "train.json").read_text())) == 3 * 6
    bad = parser.parse_args(["toy", "make", str(tmp_path / "bad"), "--train-yes-no-pairs", "5"])
    assert bad.func(bad) == 2 and "train_yes_no_pairs" in capsys.readouterr().err
    tok_dir = tmp_path / "cli_tok"
    args = parser.parse_args(["toy", "tokenizer", str(tok_dir), "--world", str(out), "--preset"])
    assert args.func(args) == 0
    assert {p.name for p in tok_dir.iterdir()} >= {
        "tokenizer.json",
        "config.json",
        "preprocessor_config.json",
    }


def test_lookup_questions_answer_from_the_scene():
    """The opt-in lookups (`ToyWorldConfig.lookup_questions`): shapes present, the shape of a uniquely coloured
    object, and the column and row of an object, in the words the position questions use."""
    from mllm.toy.world import ToyObject, lookup_questions

    objects = [
        ToyObject("circle", "red", [4, 4, 24, 24], [4, 4, 21]),  # centre (14, 14): top left
        ToyObject("square", "blue", [80, 44, 100, 64], [80, 44, 21]),  # centre (90, 54): middle right
        ToyObject("star", "blue", [44, 84, 64, 104], [44, 84, 21]),  # centre (54, 94): bottom center
    ]
    places = {("red", "circle"): ("left", "top"), ("blue", "square"): ("right", "middle")}
    places[("blue", "star")] = ("center", "bottom")
    for seed in range(8):
        qa = dict(lookup_questions(objects, 112, np.random.default_rng(seed)))
        assert qa.pop("What shapes are in the image?") == "circle, square, star."
        assert qa.pop("What shape is the red object?") == "circle."  # blue is not unique
        (column_q, column), (row_q, row) = qa.items()
        color, shape = column_q.removeprefix("Which column is the ").removesuffix(" in?").split()
        assert row_q == f"Which row is the {color} {shape} in?"
        assert (column, row) == tuple(word + "." for word in places[(color, shape)])


def test_preset_options_without_system_message_image_id_or_long_rope(toy_tok_dir, tmp_path, world):
    from transformers import AutoTokenizer

    from mllm.toy.tokenizer import ToyPresetConfig

    tok_dir = build_toy_tokenizer(toy_corpus(world), tmp_path / "tok", vocab_size=600, default_system=False)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    user = [{"role": "user", "content": "<image>\nIs there a star? Please answer yes or no."}]
    rendered = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    with_system = AutoTokenizer.from_pretrained(toy_tok_dir).apply_chat_template(
        user, tokenize=False, add_generation_prompt=True
    )
    assert with_system == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + rendered
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert tok.apply_chat_template(system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )
    out = write_toy_preset(tmp_path / "preset", tok_dir, ToyPresetConfig(rope_theta=1e4, use_image_id=False))
    config = json.loads((out / "config.json").read_text())
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (config["rope_theta"], config["use_image_id"], pre["use_image_id"]) == (1e4, False, False)
