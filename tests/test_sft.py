"""SFT data, collator and trainer: label masking, padding/truncation, gradient accumulation, overfitting, resume,
LoRA merge. The model is the fixture checkpoint with a small-image processor (`small_model_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.data_files import make_sft_files
from helpers.training import cpu_training_args
from PIL import Image

from mllm.data.sft import IGNORE_INDEX, SupervisedDataset, data_collator
from mllm.processing.processor import MLLMProcessor


@pytest.fixture(scope="module")
def processor(small_model_dir: Path) -> MLLMProcessor:
    return MLLMProcessor.from_pretrained(small_model_dir)


def test_labels_cover_exactly_the_assistant_tokens(tmp_path: Path, processor: MLLMProcessor) -> None:
    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "a.png")
    item = {
        "id": "two-turn",
        "image": "a.png",
        "conversations": [
            {"role": "user", "content": "<image>\nWhat colour is it?"},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": "Are you sure!"},
            {"role": "assistant", "content": "Yes, quite sure."},
        ],
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps([item]))
    sample = SupervisedDataset(path, processor)[0]
    tok = processor.tokenizer
    ids, labels = sample["input_ids"], sample["labels"]
    targets = ids[labels != IGNORE_INDEX].tolist()
    expected = tok.encode("It is red.<|im_end|>") + tok.encode("Yes, quite sure.<|im_end|>")
    assert targets == expected
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # The whole sequence is the chat template's rendering with the image placeholder expanded.
    text = tok.decode(ids)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image_id>0"
    )
    assert text.endswith("<|im_start|>assistant\nYes, quite sure.<|im_end|>\n")
    assert sample["image_bound"].tolist() == [
        [int(sample["image_bound"][0, 0]), int(sample["image_bound"][0, 0]) + 64]
    ]
    assert (ids[sample["image_bound"][0, 0] : sample["image_bound"][0, 1]] == processor.special_ids.unk).all()
    assert sample["tgt_sizes"].tolist() == [[4, 4]]
    assert sample["pixel_values"][0].shape == (3, 14, 16 * 14)


def test_broken_items_name_file_item_and_reason(tmp_path: Path, processor: MLLMProcessor) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": 5,
                    "image": "missing.png",
                    "conversations": [
                        {"role": "user", "content": "<image>\nhi"},
                        {"role": "assistant", "content": "x"},
                    ],
                }
            ]
        )
    )
    with pytest.raises(ValueError, match=r"bad\.json, item 5: image file not found"):
        SupervisedDataset(path, processor)
    path.write_text(json.dumps([{"id": 6, "conversations": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(ValueError, match=r"item 6: the conversation has no assistant turn"):
        SupervisedDataset(path, processor)


def test_multi_image_dict_and_long_item_truncation(tmp_path: Path, processor: MLLMProcessor) -> None:
    for name in ("a", "b"):
        Image.new("RGB", (56, 56), (0, 0, 255)).save(tmp_path / f"{name}.png")
    item = {
        "id": 1,
        "image": {"<image_00>": "a.png", "<image_01>": "b.png"},
        "conversations": [
            {"role": "user", "content": "Compare <image_00> and <image_01>."},
            {"role": "assistant", "content": "They are both blue. " * 20},
        ],
    }
    text_only = {
        "id": 3,
        "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps([item, {**item, "id": 2}, text_only]))
    full = SupervisedDataset(path, processor)
    sample = full[0]
    assert len(sample["image_bound"]) == 2 and len(sample["pixel_values"]) == 2
    assert "<image_id>1</image_id>" in processor.tokenizer.decode(sample["input_ids"])
    assert full[2]["pixel_values"] == [] and full[2]["image_bound"].shape == (0, 2)
    last_close = int(sample["image_bound"][-1, 1])
    # A cut inside the answer keeps the item, truncated.
    cut = SupervisedDataset(path, processor, max_length=last_close + 20)
    assert len(cut) == 3 and cut.n_skipped == 0 and len(cut[0]["input_ids"]) == last_close + 20
    # A cut inside the second image would leave nothing to learn: those items are skipped and counted.
    short = SupervisedDataset(path, processor, max_length=last_close - 10)
    assert len(short) == 1 and short.n_skipped == 2 and short.ids == [3]


def test_collator_pads_right_and_never_cuts_an_image(tmp_path: Path, processor: MLLMProcessor) -> None:
    data = SupervisedDataset(make_sft_files(tmp_path, 3), processor)
    samples = [data[0], data[1]]
    samples[1] = {
        **samples[1],
        "input_ids": samples[1]["input_ids"][:-3],
        "labels": samples[1]["labels"][:-3],
        "position_ids": samples[1]["position_ids"][:-3],
    }
    batch = data_collator(samples, pad_token_id=processor.pad_token_id)
    n0, n1 = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n0)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert (batch["input_ids"][1, n1:] == processor.pad_token_id).all()
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert batch["position_ids"][0].tolist() == list(range(n0))
    assert len(batch["pixel_values"]) == 2 and batch["tgt_sizes"][0].tolist() == [[4, 4]]
    # A max_length that falls inside the image run moves the cut before the image and drops its pixels.
    start = int(samples[0]["image_bound"][0, 0])
    cut = data_collator([samples[0]], pad_token_id=0, max_length=start + 10)
    assert cut["input_ids"].shape[1] == start - 1
    assert len(cut["image_bound"][0]) == 0 and cut["pixel_values"][0] == []
    assert (cut["labels"] == IGNORE_INDEX).all()


def _trainer(model_dir: Path, data: Path, out: Path, model_kw=None, **kw):
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    torch.manual_seed(0)
    return build_sft_trainer(
        ModelArguments(model=str(model_dir), **(model_kw or {})),
        DataArguments(data=str(data)),
        cpu_training_args(out, **kw),
    )


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p_a), (_, p_b) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=1e-4, atol=1e-6, msg=name)


def test_a_run_gone_non_finite_stops_with_an_error(tmp_path: Path, small_model_dir: Path) -> None:
    """A NaN weight (as a wrong compiled kernel or an overflow leaves) makes every loss NaN: Trainer alone would log
    0.0 and train on; the run must raise at the first logged step instead."""
    trainer = _trainer(small_model_dir, make_sft_files(tmp_path / "d", 4), tmp_path / "out", max_steps=3)
    with torch.no_grad():
        trainer.model.llm.get_output_embeddings().weight[0, 0] = float("nan")  # token 0's logit, everywhere
    with pytest.raises(FloatingPointError, match=r"step 1: the logged grad_norm is nan"):
        trainer.train()
    assert trainer.state.global_step == 1
    # Without clipping (--max-grad-norm 0) Trainer still computes and logs the gradient norm: the run stops too
    trainer = _trainer(
        small_model_dir, make_sft_files(tmp_path / "d2", 4), tmp_path / "out2", max_steps=3, max_grad_norm=0.0
    )
    with torch.no_grad():
        trainer.model.llm.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 1: the logged grad_norm is nan"):
        trainer.train()


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, small_model_dir: Path) -> None:
    data = make_sft_files(tmp_path / "d", 4)
    big = _trainer(
        small_model_dir, data, tmp_path / "a", per_device_train_batch_size=4, max_steps=1, optim="sgd"
    )
    acc = _trainer(
        small_model_dir,
        data,
        tmp_path / "b",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_steps=1,
        optim="sgd",
    )
    big.args.train_batch_size  # noqa: B018  (touch to make sure args resolve)
    big.train()
    acc.train()
    loss_big = big.state.log_history[0]["loss"]
    loss_acc = acc.state.log_history[0]["loss"]
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)
    assert_same_parameters(big.model, acc.model)


def test_per_sample_loss_with_gradient_accumulation_matches_one_big_batch(
    tmp_path: Path, small_model_dir: Path
) -> None:
    data = make_sft_files(tmp_path / "d", 4, long_no=True)
    kw = dict(max_steps=1, optim="sgd", loss_reduction="sample")
    big = _trainer(small_model_dir, data, tmp_path / "a", per_device_train_batch_size=4, **kw)
    acc = _trainer(
        small_model_dir,
        data,
        tmp_path / "b",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        **kw,
    )
    token = _trainer(
        small_model_dir, data, tmp_path / "c", per_device_train_batch_size=4, max_steps=1, optim="sgd"
    )
    for trainer in (big, acc, token):
        trainer.train()
    loss_big, loss_acc, loss_token = (t.state.log_history[0]["loss"] for t in (big, acc, token))
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)
    # answers of different lengths: the two reductions differ
    assert loss_token != pytest.approx(loss_big, rel=1e-3)
    assert_same_parameters(big.model, acc.model)


def test_vision_learning_rate_applies_to_the_tower_alone(tmp_path: Path, small_model_dir: Path) -> None:
    data = make_sft_files(tmp_path / "d", 4)
    kw = dict(per_device_train_batch_size=4, max_steps=1, optim="sgd", model_kw={"tune_vision": True})
    plain = _trainer(small_model_dir, data, tmp_path / "a", **kw)
    slow = _trainer(small_model_dir, data, tmp_path / "b", vision_learning_rate=0.0, **kw)
    before = {name: p.detach().clone() for name, p in slow.model.named_parameters()}
    plain.train()
    slow.train()
    assert {group["lr"] for group in slow.optimizer.param_groups} == {0.0, 2e-3}
    moved = {name for name, p in slow.model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and not any(name.startswith("vpm.") for name in moved)  # lr 0: the tower stays as it was
    assert any(
        not torch.equal(p, before[n]) for n, p in plain.model.named_parameters() if n.startswith("vpm.")
    )
    # the rest of the model takes the same step as without the flag
    for (name, a), (_, b) in zip(plain.model.named_parameters(), slow.model.named_parameters()):
        if not name.startswith("vpm."):
            torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="--vision-learning-rate"):
        cpu_training_args(tmp_path, vision_learning_rate=-1.0)


def test_frozen_embeddings_stay_while_the_llm_trains(tmp_path: Path, small_model_dir: Path) -> None:
    data = make_sft_files(tmp_path / "d", 4)
    trainer = _trainer(
        small_model_dir,
        data,
        tmp_path / "a",
        per_device_train_batch_size=4,
        max_steps=1,
        model_kw={"tune_embeddings": False},
    )
    llm = trainer.model.llm
    embeddings = llm.get_input_embeddings().weight.detach().clone()
    output = llm.get_output_embeddings().weight.detach().clone()
    layer = llm.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert torch.equal(llm.get_input_embeddings().weight, embeddings)
    assert torch.equal(llm.get_output_embeddings().weight, output)
    assert not torch.equal(llm.model.layers[0].mlp.up_proj.weight, layer)


def test_loss_reduction_flag_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--loss-reduction"):
        cpu_training_args(tmp_path, loss_reduction="mean")


@pytest.mark.slow
def test_tiny_model_overfits_eight_items(tmp_path: Path, small_model_dir: Path) -> None:
    data = make_sft_files(tmp_path / "d", 8)
    trainer = _trainer(small_model_dir, data, tmp_path / "out", max_steps=40, learning_rate=3e-3)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses[0] > 0.5
    assert losses[-1] < 0.05, losses


@pytest.mark.parametrize("sampling", ["random", "group_by_length"])
def test_resume_gives_the_same_losses(tmp_path: Path, small_model_dir: Path, sampling: str) -> None:
    data = make_sft_files(tmp_path / "d", 8, long_no=sampling == "group_by_length")
    kw = dict(
        per_device_train_batch_size=2,
        max_steps=6,  # 4 steps per epoch: the resumed part crosses into the second epoch (a new order)
        save_strategy="steps",
        save_steps=3,
        train_sampling_strategy=sampling,
    )
    full = _trainer(small_model_dir, data, tmp_path / "full", **kw)
    full.train()
    straight = [row["loss"] for row in full.state.log_history if "loss" in row]

    part = _trainer(small_model_dir, data, tmp_path / "part", **{**kw, "max_steps": 6})
    part.args.max_steps = 3  # stop early, as if interrupted after the checkpoint at step 3
    part.train()
    resumed = _trainer(small_model_dir, data, tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    after = [row["loss"] for row in resumed.state.log_history if "loss" in row and row["step"] > 3]
    assert after == pytest.approx(straight[3:], rel=1e-5)


def test_lora_saves_merges_and_matches(tmp_path: Path, small_model_dir: Path) -> None:
    from mllm.model.modeling import MLLMModel
    from mllm.train.lora import merge_lora

    data = make_sft_files(tmp_path / "d", 4)
    trainer = _trainer(
        small_model_dir,
        data,
        tmp_path / "lora",
        model_kw={"use_lora": True, "lora_r": 4},
        max_steps=3,
        learning_rate=1e-2,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora" / "preprocessor_config.json").is_file()
    peft_model = trainer.model.eval()
    batch = data_collator([trainer.train_dataset[0]], pad_token_id=0)
    with torch.no_grad():
        expected = peft_model(batch).logits
    merged_dir = merge_lora(small_model_dir, tmp_path / "lora", tmp_path / "merged")
    merged = MLLMModel.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The inference commands read the LoRA directory directly (base from the adapter config, merged in memory).
    from mllm.api import load

    direct, _ = load(tmp_path / "lora", "cpu", "float32")
    with torch.no_grad():
        torch.testing.assert_close(direct(batch).logits, expected, rtol=1e-4, atol=1e-4)
    base = MLLMModel.from_pretrained(small_model_dir).eval()
    with torch.no_grad():
        assert (base(batch).logits - expected).abs().max() > 1e-3  # the adapter changed something
    # The resampler was trained fully and travels with the adapter.
    assert not torch.equal(merged.resampler.query, base.resampler.query)


def test_length_grouped_batches_pad_less_without_loading_samples(
    tmp_path: Path, small_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    data = make_sft_files(tmp_path / "d", 32, long_no=True)  # "Yes" and "No, it is <colour>." answers

    def padding(trainer) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in trainer.get_train_dataloader())

    kw = dict(per_device_train_batch_size=2)
    grouped = _trainer(small_model_dir, data, tmp_path / "g", train_sampling_strategy="group_by_length", **kw)
    plain = _trainer(small_model_dir, data, tmp_path / "r", **kw)
    lengths = grouped.train_dataset.lengths
    assert len(set(lengths)) > 1
    with monkeypatch.context() as m:  # the sampler reads the stored lengths, it never loads a sample
        m.setattr(
            SupervisedDataset, "__getitem__", lambda self, i: pytest.fail("sample loaded to measure it")
        )
        sampler = grouped._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
    assert sorted(sampler) == list(range(32))
    # mega-batches of 4 batches (transformers' rule for 32 samples), each sorted by length
    assert padding(grouped) < padding(plain) / 2


def test_weights_dtype_follows_the_precision_flags(tmp_path: Path, small_model_dir: Path) -> None:
    import shutil

    from mllm.model.modeling import MLLMModel
    from mllm.train.sft import ModelArguments

    data = make_sft_files(tmp_path / "d", 2)

    def dtype(trainer) -> torch.dtype:
        return next(trainer.model.parameters()).dtype

    assert dtype(_trainer(small_model_dir, data, tmp_path / "a", bf16=True)) == torch.bfloat16
    mixed = _trainer(small_model_dir, data, tmp_path / "m", model_kw=dict(weights_dtype="float32"), bf16=True)
    assert dtype(mixed) == torch.float32 and mixed.args.bf16  # float32 weights under bf16 autocast
    # a bfloat16 checkpoint trained without --bf16 gets float32 weights (transformers 5 alone keeps the file's dtype)
    half = tmp_path / "bf16_model"
    shutil.copytree(small_model_dir, half)
    MLLMModel.from_pretrained(small_model_dir, torch_dtype=torch.bfloat16).save_pretrained(half)
    assert dtype(_trainer(half, data, tmp_path / "p")) == torch.float32
    with pytest.raises(ValueError, match="--weights-dtype"):
        ModelArguments(model=str(small_model_dir), weights_dtype="fp8")


def test_training_starts_the_same_whatever_the_random_state(tmp_path: Path, small_model_dir: Path) -> None:
    """LoRA adapters are made before Trainer seeds itself: `load_for_training` seeds with --seed first (a spawned
    training process starts from an unseeded generator)."""
    from mllm.train.sft import ModelArguments, load_for_training

    adapters = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        model, _ = load_for_training(
            ModelArguments(model=str(small_model_dir), use_lora=True, lora_r=4),
            cpu_training_args(tmp_path / "out", seed=3),
        )
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert adapters[0] and all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
