"""`mllm train vision`: per-token labels from COCO boxes, the dataset's checks, and a tower that learns from them.

The learning test trains the toy preset's tower on a 60-image toy world for 60 steps (about 20 s on 2 cores): the
loss falls, the held-out colour of object tokens is read far above chance, only the tower changes, and a run
interrupted after its checkpoint resumes from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.training import cpu_training_args

from mllm.toy.box_labels import (
    IGNORE_INDEX,
    BoxLabelDataset,
    LabelledBox,
    box_label_collator,
    token_box_labels,
)
from mllm.train.losses import token_box_loss, token_label_loss


def test_token_labels_follow_the_box_centres_and_the_smaller_box_wins() -> None:
    # 4 x 4 grid over an 8 x 8 image: token centres at 1, 3, 5, 7 in each direction.
    big = LabelledBox((0.0, 0.0, 6.0, 4.0), category=1, attribute=0)  # centres x in {1, 3, 5}, y in {1, 3}
    small = LabelledBox((2.0, 2.0, 2.0, 2.0), category=2, attribute=None)  # only the centre (3, 3)
    category, attribute, corners = token_box_labels([small, big], (4, 4), (8, 8), background=(5, 7))
    expected = torch.tensor([[1, 1, 1, 5], [1, 2, 1, 5], [5, 5, 5, 5], [5, 5, 5, 5]])
    assert torch.equal(category, expected.flatten())
    expected_attribute = torch.tensor([[0, 0, 0, 7], [0, 7, 0, 7], [7, 7, 7, 7], [7, 7, 7, 7]])
    assert torch.equal(attribute, expected_attribute.flatten())
    assert corners[0].tolist() == [0.0, 0.0, 0.75, 0.5]  # the big box, as fractions of the image
    assert corners[5].tolist() == [0.25, 0.25, 0.5, 0.5]  # the small one
    assert corners[3].tolist() == [0.0, 0.0, 0.0, 0.0]  # background
    # A non-square grid over a wide image: the box's columns scale with the width.
    category, _, _ = token_box_labels([LabelledBox((8.0, 0.0, 8.0, 4.0), 0, None)], (1, 4), (16, 4), (3, 1))
    assert category.tolist() == [3, 3, 0, 0]


def test_token_box_loss_is_the_l1_distance_inside_boxes_only() -> None:
    predicted, target = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    target[0, 0] = torch.tensor([0.4, 0.0, 0.0, 0.0])  # inside: |error| 0.4 over 4 corners
    target[0, 2] = torch.tensor([9.0, 9.0, 9.0, 9.0])  # background: ignored
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(token_box_loss(predicted, target, mask), torch.tensor(0.4 / 8))
    assert token_box_loss(predicted, target, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_region_presence_marks_the_classes_of_each_cell() -> None:
    from mllm.toy.pretrain import region_presence

    # one 4 x 4 grid (classes 0..2, 3 = background) and one 2 x 2 grid padded to 16 tokens
    first = torch.tensor([[0, 3, 3, 3], [3, 3, 3, 1], [3, 3, 3, 3], [2, 2, 3, 1]]).flatten()
    second = torch.tensor([1, 3, 3, 3] + [IGNORE_INDEX] * 12)
    presence = region_presence(torch.stack([first, second]), torch.tensor([[4, 4], [2, 2]]), 3, side=2)
    assert presence.shape == (2, 4, 3)
    assert presence[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]]  # cells row-major
    assert presence[1].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_region_boxes_take_the_box_most_of_a_cell_carries() -> None:
    from mllm.toy.pretrain import region_boxes

    a, b = torch.tensor([0.1, 0.1, 0.3, 0.3]), torch.tensor([0.5, 0.5, 0.9, 0.9])
    boxes = torch.zeros(1, 16, 4)
    inside = torch.zeros(1, 16, dtype=torch.bool)
    # 4 x 4 token grid, 2 x 2 cells: cell 0 has one token of a and two of b; cell 3 has one of b; cells 1, 2 none
    for token, box in ((0, a), (1, b), (4, b), (15, b)):
        boxes[0, token], inside[0, token] = box, True
    boxes[0, 5] = a  # background token: its box is ignored
    targets, present = region_boxes(boxes, inside, torch.tensor([[4, 4]]), side=2)
    assert present.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(targets[0, 0], b)
    torch.testing.assert_close(targets[0, 3], b)


def test_thirds_labels_cut_the_box_centres_as_the_world_cuts_its_position_words() -> None:
    from mllm.toy.pretrain import thirds_labels
    from mllm.toy.world import ToyObject, region

    # boxes in 112-px pixels, then as fractions; the centres straddle the thirds' edges (37.33 and 74.67 px)
    pixel_boxes = [[0, 0, 20, 20], [30, 60, 44, 90], [70, 30, 80, 44], [100, 100, 111, 111], [5, 5, 9, 9]]
    boxes = torch.tensor([pixel_boxes], dtype=torch.float64) / 112
    inside = torch.tensor([[True, True, True, True, False]])
    vertical, horizontal = thirds_labels(boxes, inside)
    words = ("top", "middle", "bottom"), ("left", "center", "right")
    for k, box in enumerate(pixel_boxes[:4]):
        expected = region(ToyObject(shape="circle", color="red", bbox=box, footprint=[0, 0, 1]), 112)
        assert (words[0][vertical[0, k]], words[1][horizontal[0, k]]) == expected
    assert vertical[0, 4] == horizontal[0, 4] == 3  # outside every object


def test_region_words_add_the_thirds_to_the_row_targets(toy_world_and_model, tmp_path: Path) -> None:
    from mllm.toy.pretrain import train_vision

    world, model_dir = toy_world_and_model
    with pytest.raises(ValueError, match="--region-words needs --align-rows"):
        vision_arguments(world, model_dir, region_words="top,middle,bottom,left,center,right")
    with pytest.raises(ValueError, match="six comma-separated words"):
        vision_arguments(world, model_dir, align_rows=True, region_words="top,bottom,left,right")
    plain, thirds = tmp_path / "plain", tmp_path / "thirds"
    for out, words in ((plain, None), (thirds, "top,middle,bottom,left,center,right")):
        args = vision_arguments(world, model_dir, align_rows=True, region_words=words)
        figures = train_vision(args, cpu_training_args(out, max_steps=2, per_device_train_batch_size=4))
    # six more targets per row (same data, same seed): the first loss differs, the saved model is the MLLM alone
    first_plain = json.loads((plain / "trainer_state.json").read_text())["log_history"][0]["loss"]
    assert figures["first_loss"] != pytest.approx(first_plain, rel=1e-3)
    assert changed_parts(thirds, model_dir) == {"vpm", "resampler"}


def test_token_label_loss_ignores_padding() -> None:
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[0, 1, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])
    picked = torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]])
    expected = torch.nn.functional.cross_entropy(picked, torch.tensor([0, 1, 3]))
    torch.testing.assert_close(token_label_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="logits must be"):
        token_label_loss(logits, labels[:, :2])


@pytest.fixture(scope="module")
def toy_world_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mllm.demo.build import init_model_dir, world_dir
    from mllm.demo.config import demo_config
    from mllm.demo.pipeline import run_demo

    config = demo_config(
        tmp_path_factory.mktemp("vision") / "demo", fast=True, n_train=60, n_test=20, n_preference=4
    )
    run_demo(config, until="model", echo=lambda line: None)
    return world_dir(config), init_model_dir(config)


def coco_file(world: Path, split: str = "train") -> Path:
    return world / "coco" / "annotations" / f"instances_{split}2014.json"


def test_dataset_labels_every_token_and_collates_with_padding(toy_world_and_model: tuple[Path, Path]) -> None:
    from mllm.processing.processor import MLLMProcessor

    world, model_dir = toy_world_and_model
    processor = MLLMProcessor.from_pretrained(model_dir)
    dataset = BoxLabelDataset(coco_file(world), world, processor.image_processor, attribute="color")
    assert len(dataset) == 60 and dataset.num_categories == len(dataset.category_names) + 1
    item = dataset[0]
    h, w = item["tgt_sizes"]
    assert item["category_labels"].shape == (h * w,)
    objects = item["category_labels"] != dataset.num_categories - 1
    assert objects.any() and not objects.all()  # a few objects on a background
    assert (
        item["attribute_labels"][objects] < dataset.num_attributes - 1
    ).all()  # every object token has a colour
    short = {key: value[:5] if key.endswith("labels") else value for key, value in item.items()}
    batch = box_label_collator([item, short])
    assert batch["category_labels"].shape == (2, h * w) and batch["box_labels"].shape == (2, h * w, 4)
    inside = item["box_labels"][objects]
    assert (inside[:, 2:] > inside[:, :2]).all() and (inside <= 1).all()  # proper boxes, as fractions
    assert (batch["box_labels"][1, 5:] == 0).all()
    assert (batch["category_labels"][1, 5:] == IGNORE_INDEX).all()


def test_bad_records_name_the_file_the_record_and_the_field(toy_world_and_model, tmp_path: Path) -> None:
    from mllm.processing.processor import MLLMProcessor

    world, model_dir = toy_world_and_model
    processor = MLLMProcessor.from_pretrained(model_dir).image_processor
    data = json.loads(coco_file(world).read_text())
    for field, value, message in (
        ("bbox", [1, 2, 0, 4], r"annotations\[3\] field 'bbox'"),
        ("image_id", 10**9, r"annotations\[3\] field 'image_id': no image"),
        ("category_id", "circle", r"annotations\[3\] field 'category_id' must be an integer"),
    ):
        broken = json.loads(json.dumps(data))
        broken["annotations"][3][field] = value
        path = tmp_path / f"broken_{field}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"broken_{field}.json: {message}"):
            BoxLabelDataset(path, world, processor)
    with pytest.raises(ValueError, match="no annotation has the attribute field 'colour'"):
        BoxLabelDataset(coco_file(world), world, processor, attribute="colour")
    missing = BoxLabelDataset(coco_file(world), tmp_path, processor)
    with pytest.raises(ValueError, match=r"images\[0\] field 'file_name': cannot open"):
        missing[0]


def vision_arguments(world: Path, model_dir: Path, **overrides):
    from mllm.toy.pretrain import VisionPretrainArguments

    return VisionPretrainArguments(
        model=str(model_dir),
        instances=str(coco_file(world)),
        image_folder=str(world),
        attribute="color",
        **overrides,
    )


def changed_parts(trained_dir: Path, model_dir: Path) -> set[str]:
    """Top-level modules (vpm, resampler, llm) whose saved weights differ between the two model directories."""
    from safetensors.torch import load_file

    trained, initial = (
        load_file(trained_dir / "model.safetensors"),
        load_file(model_dir / "model.safetensors"),
    )
    return {name.split(".")[0] for name in initial if not torch.equal(trained[name], initial[name])}


def test_the_tower_learns_the_boxes_alone_and_an_interrupted_run_resumes(
    toy_world_and_model, tmp_path: Path
) -> None:
    from mllm.toy.pretrain import train_vision

    world, model_dir = toy_world_and_model
    args = vision_arguments(world, model_dir, eval_instances=str(coco_file(world, "val")))
    out = tmp_path / "vision"
    settings = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=30)
    first = train_vision(args, cpu_training_args(out, max_steps=30, **settings))
    assert (out / "checkpoint-30").is_dir() and first["steps"] == 30
    figures = train_vision(
        args, cpu_training_args(out, max_steps=60, **settings), resume=str(out / "checkpoint-30")
    )
    assert figures["steps"] == 60
    state = json.loads((out / "trainer_state.json").read_text())
    assert [row["step"] for row in state["log_history"] if "loss" in row] == list(range(1, 61))  # one history
    assert figures["final_loss"] < 0.5 * figures["first_loss"]
    # Colour is one of 6 (chance 1/6); the shapes need a few hundred steps (docs/LOG.md).
    assert figures["attribute_accuracy"] > 0.6, figures
    assert changed_parts(out, model_dir) == {"vpm"}


def test_the_same_seed_trains_the_same_tower(toy_world_and_model, tmp_path: Path) -> None:
    """The heads are made before Trainer seeds itself: `train_vision` seeds first, so a run does not depend on the
    random state it starts in (a spawned training process starts unseeded)."""
    from safetensors.torch import load_file

    from mllm.toy.pretrain import train_vision

    world, model_dir = toy_world_and_model
    for run, noise in (("a", 1), ("b", 2)):
        torch.manual_seed(noise)
        train_vision(
            vision_arguments(world, model_dir),
            cpu_training_args(tmp_path / run, max_steps=2, per_device_train_batch_size=4),
        )
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_align_rows_trains_the_projector_too(toy_world_and_model, tmp_path: Path) -> None:
    from mllm.toy.pretrain import train_vision

    world, model_dir = toy_world_and_model
    args = vision_arguments(world, model_dir, align_rows=True)
    out = tmp_path / "rows"
    figures = train_vision(args, cpu_training_args(out, max_steps=3, per_device_train_batch_size=4))
    assert figures["steps"] == 3
    assert changed_parts(out, model_dir) == {"vpm", "resampler"}


def test_row_boxes_train_a_box_head_on_the_rows(toy_world_and_model, tmp_path: Path) -> None:
    from mllm.toy.pretrain import train_vision

    world, model_dir = toy_world_and_model
    with pytest.raises(ValueError, match="--row-boxes needs --align-rows"):
        vision_arguments(world, model_dir, row_boxes=True)
    plain, boxed = tmp_path / "plain", tmp_path / "boxed"
    for out, row_boxes in ((plain, False), (boxed, True)):
        args = vision_arguments(world, model_dir, align_rows=True, row_boxes=row_boxes)
        figures = train_vision(args, cpu_training_args(out, max_steps=2, per_device_train_batch_size=4))
        assert figures["steps"] == 2
    # the box term adds to the loss (same data, same seed), and the saved model is the MLLM model alone
    assert (
        figures["first_loss"]
        > json.loads((plain / "trainer_state.json").read_text())["log_history"][0]["loss"]
    )
    assert changed_parts(boxed, model_dir) == {"vpm", "resampler"}


def test_weights_load_in_float32_unless_a_half_precision_is_asked(
    toy_world_and_model, tmp_path: Path, monkeypatch
) -> None:
    """The rule of `train sft`: a bfloat16 checkpoint trains in float32 without --bf16 (transformers 5 alone keeps
    the file's dtype), and --weights-dtype float32 keeps float32 weights under --bf16 autocast."""
    from mllm.model.modeling import MLLMModel
    from mllm.toy import pretrain as vision

    world, model_dir = toy_world_and_model
    half = tmp_path / "bf16_model"
    shutil.copytree(model_dir, half)
    MLLMModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).save_pretrained(half)
    seen = []

    class Stop(Exception):
        pass

    def record(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        raise Stop

    monkeypatch.setattr(vision, "TokenLabelHeads", record)
    for model, weights_dtype, bf16 in (
        (half, "auto", False),
        (model_dir, "auto", True),
        (half, "float32", True),
    ):
        args = vision_arguments(world, model, weights_dtype=weights_dtype)
        with pytest.raises(Stop):
            vision.train_vision(args, cpu_training_args(tmp_path / "out", max_steps=1, bf16=bf16))
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="--weights-dtype"):
        vision_arguments(world, model_dir, weights_dtype="fp8")


def test_align_rows_needs_a_grid_projector(toy_world_and_model, tmp_path: Path) -> None:
    from mllm.demo.build import init_model_dir
    from mllm.demo.config import demo_config
    from mllm.demo.pipeline import run_demo
    from mllm.toy.pretrain import train_vision

    world, _ = toy_world_and_model
    config = demo_config(
        tmp_path / "demo", fast=True, n_train=4, n_test=2, n_preference=1, projector="resampler"
    )
    run_demo(config, until="model", echo=lambda line: None)
    args = vision_arguments(world, init_model_dir(config), align_rows=True)
    with pytest.raises(ValueError, match="--align-rows needs a grid projector"):
        train_vision(args, cpu_training_args(tmp_path / "out", max_steps=1))


def test_the_command_line_trains_and_saves_a_model_directory(
    toy_world_and_model, tmp_path: Path, capsys
) -> None:
    from mllm.cli import main
    from mllm.model.modeling import MLLMModel

    world, model_dir = toy_world_and_model
    out = tmp_path / "cli"
    argv = ["train", "vision", "--model", str(model_dir), "--instances", str(coco_file(world))]
    argv += [
        "--image-folder",
        str(world),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--report-to",
        "none",
    ]
    assert main(argv + ["--use-cpu", "--logging-steps", "1", "--per-device-train-batch-size", "2"]) == 0
    assert MLLMModel.from_pretrained(out).config.query_num > 0
    assert (out / "loss_curves.png").is_file()
    bad = ["train", "vision", "--model", str(model_dir), "--instances", str(coco_file(world))]
    assert main(bad + ["--image-folder", str(tmp_path / "nowhere"), "--output-dir", str(out)]) != 0
    assert "--image-root (--image-folder): not a folder" in capsys.readouterr().err
