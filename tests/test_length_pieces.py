"""`--length-pieces`: a batch run as forwards on groups of samples of similar length, each padded only to its own
longest (`split_by_length`), gives the batch's logits at every real position and the same SFT loss and gradients
as one forward on the whole batch, up to rounding, for both loss reductions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data_files import make_sft_files
from helpers.training import cpu_training_args

from mllm.data.sft import data_collator, split_by_length
from mllm.model.losses import sample_loss_sum, sft_loss, sft_loss_per_sample, token_loss_sum


def random_batch(lengths: list[int], vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits [B, T, V] and right-padded labels [B, T] with the given real lengths (targets from position
    1 on, -100 elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    T = max(lengths)
    logits = torch.randn(len(lengths), T, vocab, generator=generator)
    labels = torch.full((len(lengths), T), -100)
    for b, n in enumerate(lengths):
        labels[b, 1:n] = torch.randint(0, vocab, (n - 1,), generator=generator)
    return logits, labels


def test_the_loss_sums_add_up_over_pieces() -> None:
    logits, labels = random_batch([3, 7, 5, 2, 6])
    pieces = [[0, 3], [2], [1, 4]]
    token_total = sum(token_loss_sum(logits[p], labels[p])[0] for p in pieces)
    token_count = sum(token_loss_sum(logits[p], labels[p])[1] for p in pieces)
    assert torch.allclose(token_total / token_count, sft_loss(logits, labels))
    sample_total = sum(sample_loss_sum(logits[p], labels[p])[0] for p in pieces)
    sample_count = sum(sample_loss_sum(logits[p], labels[p])[1] for p in pieces)
    assert sample_count == 5
    assert torch.allclose(sample_total / sample_count, sft_loss_per_sample(logits, labels))
    assert not torch.allclose(sft_loss(logits, labels), sft_loss_per_sample(logits, labels))


@pytest.fixture
def batch_and_model(tmp_path: Path, small_model_dir: Path):
    """A collated batch of 8 items of several lengths (the No answers name the colour) and the small model."""
    from mllm.data.sft import SupervisedDataset
    from mllm.model.modeling import MLLMModel
    from mllm.processing.processor import MLLMProcessor

    processor = MLLMProcessor.from_pretrained(small_model_dir)
    dataset = SupervisedDataset(make_sft_files(tmp_path, 8, long_no=True), processor)
    batch = data_collator([dataset[i] for i in range(len(dataset))], pad_token_id=processor.pad_token_id)
    return batch, MLLMModel.from_pretrained(small_model_dir, attn_implementation="eager").eval()


def test_the_pieces_hold_every_sample_trimmed_and_give_its_logits(batch_and_model) -> None:
    batch, model = batch_and_model
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1  # the test needs padding to skip
    pieces = split_by_length(batch, 3)
    assert [len(p["input_ids"]) for p in pieces] == [3, 3, 2]
    with torch.no_grad():
        whole = model(batch).logits  # [8, T, V]
        seen = []
        for piece in pieces:
            piece_lengths = piece["attention_mask"].sum(-1)
            assert piece["input_ids"].shape[1] == piece_lengths.max()  # trimmed to its longest
            logits = model(piece).logits  # [b, t, V]
            for row in range(len(piece["input_ids"])):
                # find the sample by its tokens: the pieces are sorted by length, not in batch order
                n = int(piece_lengths[row])
                match = [
                    b
                    for b in range(len(lengths))
                    if b not in seen
                    and lengths[b] == n
                    and torch.equal(batch["input_ids"][b, :n], piece["input_ids"][row, :n])
                    and batch["image_bound"][b].equal(piece["image_bound"][row])
                    and torch.equal(batch["pixel_values"][b][0], piece["pixel_values"][row][0])
                ][0]
                seen.append(match)
                assert torch.allclose(logits[row, :n], whole[match, :n], atol=1e-5)
    assert sorted(seen) == list(range(len(lengths)))
    assert [int(p["attention_mask"].sum(-1).min()) for p in pieces] == sorted(
        int(p["attention_mask"].sum(-1).min()) for p in pieces
    )


def test_split_by_length_refuses_what_it_cannot_split(batch_and_model) -> None:
    batch, _ = batch_and_model
    with pytest.raises(ValueError, match="pieces must be at least 1"):
        split_by_length(batch, 0)
    with pytest.raises(ValueError, match="unknown fields \\['extra'\\]"):
        split_by_length({**batch, "extra": 1}, 2)
    left = {**batch, "attention_mask": batch["attention_mask"].flip(-1)}
    with pytest.raises(ValueError, match="right-padded"):
        split_by_length(left, 2)
    assert len(split_by_length(batch, 50)) == len(batch["input_ids"])  # at most one piece per sample


@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_the_trainer_loss_and_gradients_are_those_of_the_whole_batch(
    tmp_path: Path, small_model_dir: Path, reduction: str
) -> None:
    """SFTTrainer.compute_loss with --length-pieces 3 against 1, on the same batch and weights (with the token
    reduction, also with Trainer's num_items_in_batch)."""
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    data = make_sft_files(tmp_path / "d", 8, long_no=True)
    results = {}
    for pieces in (1, 3):
        torch.manual_seed(0)
        trainer = build_sft_trainer(
            ModelArguments(model=str(small_model_dir), tune_vision=False),
            DataArguments(data=str(data)),
            cpu_training_args(tmp_path / str(pieces), loss_reduction=reduction, length_pieces=pieces),
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        forwards = []
        trainer.model.register_forward_pre_hook(lambda module, args, seen=forwards: seen.append(1))
        for items in (None, 13) if reduction == "token" else (None,):
            trainer.model.zero_grad()
            forwards.clear()
            loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
            loss.backward()
            assert len(forwards) == pieces
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            results[pieces, items] = loss.detach(), grads
    for (pieces, items), (loss, grads) in results.items():
        whole_loss, whole_grads = results[1, items]
        assert torch.allclose(loss, whole_loss, rtol=1e-6), (pieces, items)
        assert grads.keys() == whole_grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            # float32 summation order: differences at the scale of the tensor's largest entries times epsilon
            assert (grad - whole_grads[name]).norm() <= 1e-5 * whole_grads[name].norm(), name
    if reduction == "token":
        # num_items_in_batch is the divisor, as in sft_loss
        assert not torch.allclose(results[3, 13][0], results[3, None][0])


def test_length_pieces_is_validated(tmp_path: Path) -> None:
    from mllm.demo.config import demo_config

    with pytest.raises(ValueError, match="--length-pieces must be at least 1"):
        cpu_training_args(tmp_path, length_pieces=0)
    with pytest.raises(ValueError, match="demo length_pieces must be at least 1"):
        demo_config(tmp_path, length_pieces=0).validate()
    assert "length_pieces" not in demo_config(tmp_path, length_pieces=2).fingerprint()


def test_the_demo_passes_length_pieces_to_its_sft_stages(tmp_path: Path) -> None:
    from mllm.demo.config import demo_config
    from mllm.demo.sft import sft_training_arguments

    for pieces in (1, 2):
        config = demo_config(tmp_path, length_pieces=pieces, device="cpu")
        assert sft_training_arguments(config, tmp_path / "run").length_pieces == pieces


def test_the_readme_quotes_the_side_by_side_benchmark() -> None:
    """The README's step times are the committed benchmark files' (losses equal to 1e-6 in every piece count)."""
    import json

    root = Path(__file__).resolve().parents[1]
    readme = " ".join((root / "README.md").read_text().split())
    results = root / "docs" / "results" / "demo_probes" / "2026-12-06-epyc"
    for name, batch, quoted_pieces in (("questions", 32, ("2", "4")), ("mixed", 16, ("2",))):
        bench = json.loads((results / f"length_pieces_{name}.json").read_text())
        assert bench["losses_equal_to_1e-6"] and bench["batch"] == batch and bench["threads"] == 1
        assert not bench["bf16_autocast"]  # float32, as the README says of that CPU
        step = bench["s_per_step"]
        assert f"whole {step['1']:.3f} s" in readme, name
        for pieces in quoted_pieces:
            quoted = f"in {pieces} pieces {step[pieces]:.3f} s ({step['1'] / step[pieces]:.2f}x)"
            assert quoted in readme, quoted


def test_the_benchmark_runs_and_checks_the_losses(tmp_path: Path, small_model_dir: Path) -> None:
    """`benchmarks/length_pieces.py` on the small model (a smoke test of the script, not a measurement): it writes
    the step times of each piece count and the padded tokens, fewer in pieces than whole."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = make_sft_files(tmp_path / "d", 8, long_no=True)
    out = tmp_path / "bench.json"
    command = [sys.executable, str(root / "benchmarks" / "length_pieces.py"), str(small_model_dir), str(data)]
    command += ["--out", str(out), "--batch", "8", "--pieces", "1", "3", "--steps", "2", "--items", "8"]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["losses_equal_to_1e-6"] and set(result["s_per_step"]) == {"1", "3"}
    assert result["padded_tokens_per_step"]["3"] < result["padded_tokens_per_step"]["1"]
    assert result["real_tokens_per_step"] <= result["padded_tokens_per_step"]["3"]
    assert len(result["times"]["3"]) == 2


def test_the_flops_benchmark_counts_the_tower_apart(tmp_path: Path, small_model_dir: Path) -> None:
    """`benchmarks/sft_flops.py` on the small model (a smoke test, not a measurement): the matrix FLOPs of a step,
    the frozen tower's a part of them, the GEMM rates, and the floor they give."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = make_sft_files(tmp_path / "d", 8, long_no=True)
    out = tmp_path / "flops.json"
    command = [sys.executable, str(root / "benchmarks" / "sft_flops.py"), str(small_model_dir), str(data)]
    command += ["--out", str(out), "--batch", "4", "--pieces", "2", "--steps", "2", "--items", "8"]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert 0 < result["gflop_per_step_tower"] < result["gflop_per_step"]
    assert result["gflop_per_step_without_tower"] == pytest.approx(
        result["gflop_per_step"] - result["gflop_per_step_tower"]
    )
    assert result["real_tokens_per_step"] <= result["padded_tokens_per_step"]
    best = max(result["gemm_gflops_one_thread"].values())
    assert result["s_per_step_at_best_rate_without_tower"] == pytest.approx(
        result["gflop_per_step_without_tower"] / best
    )


def test_length_pieces_is_refused_where_it_would_do_nothing(tmp_path: Path, small_model_dir: Path) -> None:
    """Preference training and another family's batches run whole: asking for pieces there is an error, not a
    silent no-op."""
    from helpers.data_files import make_preference_file

    from mllm.train.preference import PreferenceArguments, build_preference_trainer
    from mllm.train.sft import ModelArguments

    data = make_preference_file(tmp_path / "p", 4)
    with pytest.raises(ValueError, match="--length-pieces serves `mllm train sft`"):
        build_preference_trainer(
            ModelArguments(model=str(small_model_dir)),
            PreferenceArguments(data=str(data)),
            cpu_training_args(tmp_path / "out", length_pieces=2),
        )
    from mllm.train.sft import DataArguments, build_sft_trainer

    trainer = build_sft_trainer(
        ModelArguments(model=str(small_model_dir), tune_vision=False),
        DataArguments(data=str(make_sft_files(tmp_path / "d", 2))),
        cpu_training_args(tmp_path / "sft", length_pieces=2),
    )
    another_family = {
        "inputs": {"input_ids": torch.zeros(1, 3, dtype=torch.long)},
        "labels": torch.zeros(1, 3),
    }
    with pytest.raises(ValueError, match="another family's batch runs whole"):
        trainer.compute_loss(trainer.model, another_family)
