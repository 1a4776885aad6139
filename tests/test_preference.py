"""Preference alignment: RLAIF-V data -> pairs, concatenated forward, reference log-prob precompute (resume, shards,
refusal of mismatched files), trainer step 0, and a tiny model learning to prefer the right colour."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch
from helpers.data_files import QUESTION, make_preference_file, make_sft_files
from helpers.training import cpu_training_args

from mllm.data.preference import PreferenceDataset, preference_collator
from mllm.data.sft import IGNORE_INDEX, SupervisedDataset
from mllm.processing.processor import MLLMProcessor

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def processor(small_model_dir: Path) -> MLLMProcessor:
    return MLLMProcessor.from_pretrained(small_model_dir)


@pytest.fixture(scope="module")
def model(small_model_dir: Path):
    from mllm.model.modeling import MLLMModel

    return MLLMModel.from_pretrained(small_model_dir).eval()


def test_pairs_share_the_sft_prompt_and_label_only_the_response(tmp_path: Path, processor) -> None:
    data = PreferenceDataset(make_preference_file(tmp_path, 4), processor)
    tok = processor.tokenizer
    sample = data[1]  # an image_path item
    for name, text in (("chosen", "A green square."), ("rejected", "A blue square.")):
        ids, labels = sample[f"{name}_input_ids"], sample[f"{name}_labels"]
        assert ids[labels != IGNORE_INDEX].tolist() == tok.encode(text + "<|im_end|>")
    # Chosen and rejected share the prompt, which is exactly what SFT builds for the same conversation.
    sft_item = {
        "id": 1,
        "image": "images/1.png",
        "conversations": [
            {"role": "user", "content": f"<image>\n{QUESTION}"},
            {"role": "assistant", "content": "A green square."},
        ],
    }
    (tmp_path / "sft.json").write_text(json.dumps([sft_item]))
    sft = SupervisedDataset(tmp_path / "sft.json", processor)[0]
    assert torch.equal(sft["input_ids"], sample["chosen_input_ids"])
    assert torch.equal(sft["labels"], sample["chosen_labels"])
    prompt = int((sample["chosen_labels"] != IGNORE_INDEX).nonzero()[0])
    assert torch.equal(sample["chosen_input_ids"][:prompt], sample["rejected_input_ids"][:prompt])
    assert sample["tgt_sizes"].tolist() == [[4, 4]] and len(sample["pixel_values"]) == 1
    # The base64 item gives the same pixels as a file of the same image would.
    assert data[0]["pixel_values"][0].shape == sample["pixel_values"][0].shape

    batch = preference_collator([data[0], data[1], data[2]], pad_token_id=processor.pad_token_id)
    lengths = [len(data[i][f"{k}_input_ids"]) for k in ("chosen", "rejected") for i in range(3)]
    assert batch["input_ids"].shape == (6, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["image_index"].tolist() == [0, 1, 2, 0, 1, 2]
    assert len(batch["pixel_values"]) == 3 and len(batch["image_bound"]) == 6
    assert torch.equal(batch["input_ids"][4, : lengths[4]], data[1]["rejected_input_ids"])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert "ref_chosen_logps" not in batch


def test_bad_items_name_file_idx_and_field(tmp_path: Path, processor) -> None:
    good = json.loads(make_preference_file(tmp_path, 2).read_text())
    cases = [
        ({**good[1], "idx": 7, "rejected": ""}, r"bad\.json, idx 7: field 'rejected'"),
        ({k: v for k, v in good[1].items() if k != "image_path"} | {"idx": 8}, r"idx 8: field 'image'"),
        ({**good[1], "idx": 9, "image_path": "nope.png"}, r"idx 9: image file not found"),
        ({**good[1], "idx": 0}, r"idx 0: field 'idx' is duplicated"),
        ({**good[1], "idx": 5, "logps": [1, 2]}, r"idx 5: field 'logps'"),
    ]
    for item, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps([good[0], item]))
        with pytest.raises(ValueError, match=message):
            PreferenceDataset(tmp_path / "bad.json", processor)


def test_concatenated_forward_matches_separate_forwards_and_encodes_each_image_once(
    tmp_path: Path, processor, model
) -> None:
    from mllm.data.sft import data_collator
    from mllm.train.logps import concatenated_forward
    from mllm.train.losses import get_batch_logps

    data = PreferenceDataset(make_preference_file(tmp_path, 3), processor)
    batch = preference_collator([data[i] for i in range(3)], pad_token_id=processor.pad_token_id)
    assert (
        len(set(batch["attention_mask"].sum(1).tolist())) > 1
    )  # rows of several lengths: padding is exercised
    encoded = []
    hook = model.vpm.register_forward_hook(lambda module, args, out: encoded.append(out.shape[0]))
    try:
        with torch.no_grad():
            together = concatenated_forward(model, batch)
    finally:
        hook.remove()
    assert sum(encoded) == 3  # three images for six rows
    for i in range(3):
        for half, name in ((0, "chosen"), (1, "rejected")):
            sample = data[i]
            single = data_collator(
                [
                    {
                        "input_ids": sample[f"{name}_input_ids"],
                        "labels": sample[f"{name}_labels"],
                        "position_ids": torch.arange(len(sample[f"{name}_input_ids"])),
                        "image_bound": sample["image_bound"],
                        "pixel_values": sample["pixel_values"],
                        "tgt_sizes": sample["tgt_sizes"],
                    }
                ]
            )
            with torch.no_grad():
                logits = model({k: v for k, v in single.items() if k != "labels"}).logits
            _, total, average = get_batch_logps(logits, single["labels"], return_all=True)
            row = half * 3 + i
            assert together.sums[row].item() == pytest.approx(total.item(), abs=1e-4)
            assert together.averages[row].item() == pytest.approx(average.item(), abs=1e-5)


def _train_args(out: Path, **kw):
    return cpu_training_args(
        out, **{"per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 1, **kw}
    )


def test_trainer_step0_reproduces_precomputed_reference(tmp_path: Path, small_model_dir: Path, model) -> None:
    from mllm.train.logps import compute_reference_logps
    from mllm.train.preference import PreferenceArguments, build_preference_trainer
    from mllm.train.sft import ModelArguments

    data_path = make_preference_file(tmp_path, 6)
    processor = MLLMProcessor.from_pretrained(small_model_dir)
    logps = compute_reference_logps(
        model, PreferenceDataset(data_path, processor), tmp_path / "ref.jsonl", small_model_dir, batch_size=4
    )
    header = json.loads(logps.read_text().splitlines()[0])["header"]
    assert header["data"]["sha256"] and header["tokenizer"]["tokenizer.json"]
    assert header["model"]["weights"][0]["name"] == "model.safetensors"
    trainer = build_preference_trainer(
        ModelArguments(model=str(small_model_dir)),
        PreferenceArguments(data=str(data_path), logps=str(logps)),
        _train_args(tmp_path / "out", per_device_train_batch_size=3),
    )
    from mllm.train.guards import StopOnNonFinite

    assert any(isinstance(c, StopOnNonFinite) for c in trainer.callback_handler.callbacks)  # a NaN run stops
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss, metrics = trainer.preference_step(trainer.model, batch)
        from mllm.train.logps import concatenated_forward

        policy = concatenated_forward(trainer.model, batch).sums
    torch.testing.assert_close(policy[:3], batch["ref_chosen_logps"], rtol=0, atol=1e-4)
    torch.testing.assert_close(policy[3:], batch["ref_rejected_logps"], rtol=0, atol=1e-4)
    assert abs(metrics["rewards/chosen"].item()) < 1e-4 and abs(metrics["rewards/margins"].item()) < 1e-4
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-4)
    # DPO on average log-probs plus an SFT term: ln 2 + weight * token-mean cross-entropy of the chosen answers.
    trainer.preference_args = PreferenceArguments(
        data=str(data_path), logps=str(logps), loss_type="dpo", use_average_logp=True, sft_weight=0.5
    )
    with torch.no_grad():
        loss, metrics = trainer.preference_step(trainer.model, batch)
    n_tokens = (batch["labels"][:3, 1:] != IGNORE_INDEX).sum()
    cross_entropy = -batch["ref_chosen_logps"].sum() / n_tokens
    assert metrics["loss/sft"].item() == pytest.approx(cross_entropy.item(), abs=1e-4)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * cross_entropy.item(), abs=1e-4)
    assert metrics["logps/ref_chosen"].item() == pytest.approx(batch["ref_chosen_avg_logps"].mean().item())
    # The real training path (Trainer -> compute_loss, train mode): the first logged step has zero rewards.
    trainer.preference_args = PreferenceArguments(data=str(data_path), logps=str(logps))
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(2 * math.log(2), abs=1e-4)
    assert abs(first["rewards/margins"]) < 1e-4 and first["rewards/accuracies"] == 0.0


def test_lora_training_resumes_without_recomputing_the_reference(
    tmp_path: Path, small_model_dir: Path
) -> None:
    from mllm.train.curves import read_log_history
    from mllm.train.preference import main

    data_path = make_preference_file(tmp_path, 4)
    out = tmp_path / "out"
    argv = [
        "--model", str(small_model_dir), "--data", str(data_path), "--output-dir", str(out),
        "--use-lora", "true", "--lora-r", "4", "--tune-resampler", "false",
        "--per-device-train-batch-size", "2", "--logging-steps", "1", "--save-strategy", "steps",
        "--save-steps", "2", "--use-cpu", "true", "--report-to", "none", "--resume-from-checkpoint", "auto",
    ]  # fmt: skip
    assert main([*argv, "--max-steps", "2"]) == 0
    reference = out / "reference_logps.jsonl"
    stamp = reference.stat().st_mtime_ns
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert main([*argv, "--max-steps", "3"]) == 0
    assert reference.stat().st_mtime_ns == stamp
    steps = [row["step"] for row in read_log_history(out) if "rewards/margins" in row]
    assert steps == [1, 2, 3]


def test_replay_order_takes_each_item_once_per_pass_and_splits_it_between_processes() -> None:
    from mllm.train.preference import replay_indices

    n, size, world = 7, 2, 2
    walk = [
        i for call in range(7) for rank in range(world) for i in replay_indices(n, size, call, rank, world, 3)
    ]
    for start in range(0, 28, 7):  # 28 draws: four passes over the 7 items, each a permutation
        assert sorted(walk[start : start + 7]) == list(range(7))
    assert walk[:7] != walk[7:14]  # a new order each pass
    assert replay_indices(n, size, 5, 1, world, 3) == walk[(5 * world + 1) * size : (5 * world + 2) * size]
    assert replay_indices(n, 7, 0, 0, 1, 3) != replay_indices(n, 7, 0, 0, 1, 4)  # the seed decides the order
    with pytest.raises(ValueError, match="no items"):
        replay_indices(0, 2, 0, 0, 1, 0)


def test_replay_adds_the_cross_entropy_of_its_batch_and_a_resumed_run_draws_the_same_batches(
    tmp_path: Path, small_model_dir: Path
) -> None:
    """--replay-data: the training loss is the preference loss plus weight x the per-sample cross-entropy of the
    micro-batch's replayed conversations, drawn by `replay_indices`; a run resumed from step 2 logs at step 3 what
    the unbroken run logs (a replay order counted from the resume would draw other items)."""
    from mllm.data.sft import data_collator
    from mllm.train.curves import read_log_history
    from mllm.train.losses import sft_loss_per_sample
    from mllm.train.preference import PreferenceArguments, build_preference_trainer, main, replay_indices
    from mllm.train.sft import ModelArguments

    data_path = make_preference_file(tmp_path, 6)
    replay_path = make_sft_files(tmp_path / "sft", 5, long_no=True)
    args = PreferenceArguments(
        data=str(data_path), replay_data=str(replay_path), replay_weight=0.5, replay_batch_size=3
    )
    trainer = build_preference_trainer(
        ModelArguments(model=str(small_model_dir)),
        args,
        _train_args(tmp_path / "one", per_device_train_batch_size=2),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, batch)  # micro-batch 0 of step 0
        preference, _ = trainer.preference_step(trainer.model, batch)
        items = [trainer.replay_dataset[i] for i in replay_indices(5, 3, 0, 0, 1, 0)]
        replayed = data_collator(items, pad_token_id=trainer.processing_class.pad_token_id)
        logits = trainer.model({k: v for k, v in replayed.items() if k != "labels"}).logits
        cross_entropy = sft_loss_per_sample(logits, replayed["labels"])
    assert total.item() == pytest.approx(preference.item() + 0.5 * cross_entropy.item(), abs=1e-5)
    assert trainer._replay_at == (0, 0)
    with pytest.raises(ValueError, match="--replay-data: file not found"):
        PreferenceArguments(data=str(data_path), replay_data=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--replay-weight must be positive"):
        PreferenceArguments(data=str(data_path), replay_data=str(replay_path), replay_weight=0.0)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json"):  # refused by SupervisedDataset, naming the file
        build_preference_trainer(
            ModelArguments(model=str(small_model_dir)),
            PreferenceArguments(data=str(data_path), replay_data=str(empty)),
            _train_args(tmp_path / "empty"),
        )

    def run(out: Path, steps: int) -> None:
        argv = [
            "--model", str(small_model_dir), "--data", str(data_path), "--replay-data", str(replay_path),
            "--replay-batch-size", "2", "--output-dir", str(out), "--per-device-train-batch-size", "2",
            "--learning-rate", "1e-3", "--logging-steps", "1", "--save-strategy", "steps", "--save-steps", "2",
            "--use-cpu", "true", "--report-to", "none", "--resume-from-checkpoint", "auto",
            "--lr-scheduler-type", "constant", "--max-steps", str(steps),
        ]  # fmt: skip
        assert main(argv) == 0

    run(tmp_path / "unbroken", 3)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 3)
    unbroken, resumed = (
        {row["step"]: row for row in read_log_history(tmp_path / name) if "loss/replay" in row}
        for name in ("unbroken", "resumed")
    )
    assert sorted(unbroken) == sorted(resumed) == [1, 2, 3]
    for key in ("loss/replay", "loss/preference", "loss"):
        assert resumed[3][key] == pytest.approx(unbroken[3][key], abs=1e-5), key
    assert len({unbroken[step]["loss/replay"] for step in (1, 2, 3)}) == 3  # each step replays other items


def test_eval_data_is_scored_with_the_preference_loss(tmp_path: Path, small_model_dir: Path) -> None:
    """--eval-data: held-out pairs get their own reference file (computed once, with the initial model) and every
    evaluation logs eval_loss and eval_rewards/*; the eval reference is not recomputed on resume."""
    from mllm.train.curves import read_log_history
    from mllm.train.preference import EVAL_REFERENCE_FILE, PreferenceArguments, main

    data_path = make_preference_file(tmp_path, 4)
    eval_path = make_preference_file(tmp_path / "held_out", 3)
    out = tmp_path / "out"
    argv = [
        "--model", str(small_model_dir), "--data", str(data_path), "--eval-data", str(eval_path),
        "--output-dir", str(out), "--per-device-train-batch-size", "2", "--per-device-eval-batch-size", "2",
        "--eval-strategy", "steps", "--eval-steps", "1", "--logging-steps", "1", "--learning-rate", "1e-3",
        "--save-strategy", "steps", "--save-steps", "2", "--use-cpu", "true", "--report-to", "none",
        "--resume-from-checkpoint", "auto",
    ]  # fmt: skip
    assert main([*argv, "--max-steps", "2"]) == 0
    reference = out / EVAL_REFERENCE_FILE
    assert len(reference.read_text().splitlines()) == 1 + 3  # a header, then one line per held-out pair
    stamp = reference.stat().st_mtime_ns
    assert main([*argv, "--max-steps", "3"]) == 0
    assert reference.stat().st_mtime_ns == stamp
    evals = [row for row in read_log_history(out) if "eval_loss" in row]
    assert [row["step"] for row in evals] == [1, 2, 3]
    for row in evals:
        assert math.isfinite(row["eval_loss"]) and 0.0 <= row["eval_rewards/accuracies"] <= 1.0
        # the logged margin is the mean chosen reward minus the mean rejected reward of the same pairs
        assert row["eval_rewards/margins"] == pytest.approx(
            row["eval_rewards/chosen"] - row["eval_rewards/rejected"], abs=1e-5
        )
    assert evals[-1]["eval_rewards/margins"] != 0.0  # the policy has moved away from the reference
    with pytest.raises(ValueError, match="--eval-logps needs --eval-data"):
        PreferenceArguments(data=str(data_path), eval_logps=str(reference))
    with pytest.raises(ValueError, match="--eval-data: file not found"):
        PreferenceArguments(data=str(data_path), eval_data=str(tmp_path / "missing.json"))


def test_mismatched_logps_are_refused(tmp_path: Path, processor, model, small_model_dir: Path) -> None:
    from mllm.train.logps import compute_reference_logps, load_reference_logps

    data_path = make_preference_file(tmp_path, 4)
    logps = compute_reference_logps(
        model, PreferenceDataset(data_path, processor), tmp_path / "ref.jsonl", small_model_dir
    )
    other = make_preference_file(tmp_path / "other", 4, base64_every=0)
    with pytest.raises(ValueError, match=r"computed for data file 'pref\.json' .*recompute"):
        load_reference_logps(logps, PreferenceDataset(other, processor))
    # Same data file, other token counts (a shorter --max-length cuts the responses).
    prompt_len = int(
        (PreferenceDataset(data_path, processor)[0]["chosen_labels"] != IGNORE_INDEX).nonzero()[0]
    )
    short = PreferenceDataset(data_path, processor, max_length=prompt_len + 2)
    with pytest.raises(
        ValueError, match=r"idx 0: the reference log-probs cover \d+ chosen / \d+ rejected tokens"
    ):
        load_reference_logps(logps, short)
    # An existing result of other data is never overwritten.
    with pytest.raises(ValueError, match=r"exists and holds log-probs of another"):
        compute_reference_logps(model, PreferenceDataset(other, processor), logps, small_model_dir)
    loaded = load_reference_logps(logps, PreferenceDataset(data_path, processor))
    assert sorted(loaded) == [0, 1, 2, 3]
    # RLAIF-V items may carry the log-probs inline: (win, win_avg, win_per_token, rej, rej_avg, rej_per_token).
    records = [json.loads(line) for line in logps.read_text().splitlines()[1:]]
    items = json.loads(data_path.read_text())
    for item, r in zip(items, records):
        item["logps"] = [
            r[f"{k}_{f}"] for k in ("chosen", "rejected") for f in ("logp", "avg_logp", "per_token_logp")
        ]
    (tmp_path / "inline.json").write_text(json.dumps(items))
    inline = PreferenceDataset(tmp_path / "inline.json", processor)
    batch = preference_collator([inline[0], inline[1]])
    assert batch["ref_rejected_logps"].tolist() == pytest.approx(
        [records[0]["rejected_logp"], records[1]["rejected_logp"]]
    )
    items[2]["logps"][2] = items[2]["logps"][2][:-1]
    (tmp_path / "inline.json").write_text(json.dumps(items))
    with pytest.raises(
        ValueError, match=r"inline\.json: field 'logps': idx 2: the reference log-probs cover"
    ):
        PreferenceDataset(tmp_path / "inline.json", processor)


def test_logp_command_resumes_and_shards_without_duplicates(
    tmp_path: Path, small_model_dir: Path, processor, model, monkeypatch
) -> None:
    import mllm.train.logps as logps_module
    from mllm.cli import main

    data_path = make_preference_file(tmp_path, 10)
    out = tmp_path / "ref.jsonl"
    real_forward = logps_module.concatenated_forward
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(logps_module, "concatenated_forward", failing_forward)
    argv = ["logp", "--model", str(small_model_dir), "--data", str(data_path), "--out", str(out)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*argv, "--batch-size", "3", "--device", "cpu"])
    assert not out.exists()
    part_lines = (tmp_path / "ref.part0.jsonl").read_text().splitlines()
    assert len(part_lines) == 6  # two batches of three (the header is in ref.fingerprint.json meanwhile)
    with open(
        tmp_path / "ref.part0.jsonl", "a"
    ) as handle:  # a record torn by a kill in the middle of a write
        handle.write('{"idx": 6, "chosen_lo')
    calls.clear()
    monkeypatch.setattr(logps_module, "concatenated_forward", real_forward)
    assert main([*argv, "--batch-size", "3", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert [r["idx"] for r in records] == list(range(10))
    assert not list(tmp_path.glob("ref.part*")) and not (tmp_path / "ref.fingerprint.json").exists()
    for r in records:
        assert len(r["chosen_per_token_logp"]) == r["chosen_tokens"]
        assert r["chosen_logp"] == pytest.approx(sum(r["chosen_per_token_logp"]), abs=1e-4)

    # Two shards computed one after the other (rank 1 first: rank 0 merges) give the same numbers.
    dataset = PreferenceDataset(data_path, processor)
    sharded = tmp_path / "sharded.jsonl"
    for rank in (1, 0):
        logps_module.compute_reference_logps(
            model,
            dataset,
            sharded,
            small_model_dir,
            batch_size=2,
            rank=rank,
            world_size=2,
            barrier=lambda: None,
        )
    shard_records = [json.loads(line) for line in sharded.read_text().splitlines()[1:]]
    assert [r["idx"] for r in shard_records] == list(range(10))
    for a, b in zip(records, shard_records):
        assert a["rejected_logp"] == pytest.approx(b["rejected_logp"], abs=1e-4)


def test_tiny_model_learns_to_prefer_the_right_colour(tmp_path: Path, small_model_dir: Path) -> None:
    """16 pairs, batch 8, 24 steps, AdamW 2e-3, nca_pair with beta 0.1; the reference log-probs are computed by
    the command itself (no --logps). Budget: under 60 s on one CPU core."""
    from mllm.train.curves import read_log_history
    from mllm.train.preference import main

    data_path = make_preference_file(tmp_path, 16)
    out = tmp_path / "out"
    torch.manual_seed(0)
    start = time.perf_counter()
    argv = [
        "--model", str(small_model_dir), "--data", str(data_path), "--output-dir", str(out),
        "--per-device-train-batch-size", "8", "--learning-rate", "2e-3", "--max-steps", "24",
        "--logging-steps", "4", "--save-strategy", "no", "--use-cpu", "true", "--report-to", "tensorboard",
        "--lr-scheduler-type", "constant", "--weight-decay", "0", "--seed", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    seconds = time.perf_counter() - start
    history = [row for row in read_log_history(out) if "rewards/accuracies" in row]
    accuracies = [row["rewards/accuracies"] for row in history]
    margins = [row["rewards/margins"] for row in history]
    logger.info(
        "steps %s accuracies %s margins %s in %.1fs",
        [r["step"] for r in history],
        accuracies,
        margins,
        seconds,
    )
    assert (out / "reference_logps.jsonl").is_file()
    assert (out / "preference_curves.png").is_file()
    assert list(out.rglob("events.out.tfevents.*"))
    assert accuracies[-1] > 0.9
    assert margins[-1] > margins[0] and margins[-1] > 0.5
    assert history[-1]["loss"] < history[0]["loss"]
