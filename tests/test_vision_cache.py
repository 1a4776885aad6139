"""The frozen tower's outputs reused per slice (`--vision-cache-mb`): the tower's own rows in a lookup; training whose
steps all miss (the first epoch) or all hit (the second) ends in the weights of training without it, to the bit
(steps that mix the two run the tower on fewer slices and may round differently: mllm.model.vision_cache); refused
where the tower trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data_files import make_sft_files
from helpers.training import cpu_training_args

from mllm.model.modeling import MLLMModel


def strips_of(
    model: MLLMModel, grids: list[tuple[int, int]], seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random slices [3, p, h*w*p] with the given patch grids, and their tgt_sizes [N, 2]."""
    p = model.config.vision.patch_size
    generator = torch.Generator().manual_seed(seed)
    strips = [torch.randn(3, p, h * w * p, generator=generator) for h, w in grids]
    return strips, torch.tensor(grids, dtype=torch.int32)


def test_the_cache_returns_the_towers_rows_and_keeps_what_fits(small_model_dir: Path) -> None:
    model = MLLMModel.from_pretrained(small_model_dir).eval()
    model.vpm.requires_grad_(False)
    strips, sizes = strips_of(model, [(2, 2), (2, 3), (1, 2), (2, 2)])
    with torch.no_grad():
        direct = model.vpm.encode_strips(strips, sizes, "sdpa", 2)  # [4, 6, D]
        cache = model.attach_vision_cache(10**9)
        first = cache.encode(model.vpm, strips, sizes, "sdpa", 2)
        # three of them again, in another order and beside a new one: looked up, the new one computed
        new, new_size = strips_of(model, [(1, 3)], seed=1)
        again = cache.encode(
            model.vpm,
            [strips[2], new[0], strips[0], strips[1]],
            torch.cat([sizes[[2]], new_size, sizes[[0, 1]]]),
            "sdpa",
            2,
        )
        new_direct = model.vpm.encode_strips(new, new_size, "sdpa", 2)
    lengths = [4, 6, 2, 4]
    for i, n in enumerate(lengths):
        assert torch.equal(first[i, :n], direct[i, :n]), i
        assert not first[i, n:].any()  # padding rows are zero
    for row, i in ((0, 2), (2, 0), (3, 1)):
        assert torch.equal(again[row, : lengths[i]], direct[i, : lengths[i]])
    assert torch.equal(again[1, :3], new_direct[0])
    assert (cache.misses, cache.hits, len(cache)) == (5, 3, 5)


def test_training_with_the_cache_is_the_training_without_it(tmp_path: Path, small_model_dir: Path) -> None:
    """Two epochs over four images, two per step, tower frozen: the first epoch computes every slice as without the
    cache, the second takes every slice from it; the same weights to the bit."""
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    data = make_sft_files(tmp_path / "d", 4)
    trainers = []
    for name, cache_mb in (("plain", 0), ("cached", 64)):
        torch.manual_seed(0)
        trainer = build_sft_trainer(
            ModelArguments(model=str(small_model_dir), tune_vision=False),
            DataArguments(data=str(data)),
            cpu_training_args(
                tmp_path / name, per_device_train_batch_size=2, num_train_epochs=2, vision_cache_mb=cache_mb
            ),
        )
        trainer.train()
        trainers.append(trainer)
    plain, cached = (t.model for t in trainers)
    assert plain.vision_cache is None
    assert (
        cached.vision_cache.hits >= 4 and cached.vision_cache.misses <= 5
    )  # 4 images (+ nothing else) computed once
    for (name, a), (_, b) in zip(plain.named_parameters(), cached.named_parameters()):
        assert torch.equal(a, b), name
    start = MLLMModel.from_pretrained(small_model_dir)
    changed = [not torch.equal(a, b) for a, b in zip(start.parameters(), cached.parameters())]
    assert any(changed)  # the run trained something


def test_the_cache_is_refused_where_the_tower_trains(tmp_path: Path, small_model_dir: Path) -> None:
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    data = make_sft_files(tmp_path / "d", 2)
    with pytest.raises(ValueError, match="--vision-cache-mb: a vision cache needs a frozen vision tower"):
        build_sft_trainer(
            ModelArguments(model=str(small_model_dir), tune_vision=True),
            DataArguments(data=str(data)),
            cpu_training_args(tmp_path / "a", vision_cache_mb=64),
        )
    with pytest.raises(ValueError, match="--vision-cache-mb must be >= 0"):
        cpu_training_args(tmp_path / "b", vision_cache_mb=-1)
    from mllm.train.sft import attach_vision_cache

    frozen = MLLMModel.from_pretrained(small_model_dir)
    frozen.vpm.requires_grad_(False)
    with pytest.raises(ValueError, match="not supported with --deepspeed"):
        attach_vision_cache(frozen, 64, deepspeed=True)
    with pytest.raises(ValueError, match="serves this framework's MiniCPM-V model, not Linear"):
        attach_vision_cache(torch.nn.Linear(2, 2), 64, deepspeed=False)
    attach_vision_cache(frozen, 64, deepspeed=False)
    assert frozen.vision_cache is not None and frozen.vision_cache.max_bytes == 64 * 2**20
    model = MLLMModel.from_pretrained(small_model_dir)
    with pytest.raises(ValueError, match="needs a frozen vision tower; trainable: "):
        model.attach_vision_cache(1)
    model.vpm.requires_grad_(False)
    cache = model.attach_vision_cache(
        1
    )  # nothing fits: every slice computed, none kept, the rows still right
    strips, sizes = strips_of(model, [(2, 2)])
    with torch.no_grad():
        out = cache.encode(model.vpm, strips, sizes, "sdpa", None)
        assert torch.equal(out, model.vpm.encode_strips(strips, sizes, "sdpa", None))
    assert (len(cache), cache.bytes) == (0, 0)
    model.vpm.requires_grad_(
        True
    )  # unfrozen after attaching: the lookup refuses rather than serve stale rows
    with pytest.raises(RuntimeError, match="frozen tower only"):
        cache.encode(model.vpm, strips, sizes, "sdpa", None)


def test_preference_training_with_the_cache_is_the_training_without_it(
    tmp_path: Path, small_model_dir: Path
) -> None:
    """`mllm train preference --vision-cache-mb` serves its policy forwards too: the same weights to the bit."""
    from helpers.data_files import make_preference_file

    from mllm.data.preference import PreferenceDataset
    from mllm.processing.processor import MLLMProcessor
    from mllm.train.logps import compute_reference_logps
    from mllm.train.preference import PreferenceArguments, build_preference_trainer
    from mllm.train.sft import ModelArguments

    data = make_preference_file(tmp_path, 4)
    processor = MLLMProcessor.from_pretrained(small_model_dir)
    logps = compute_reference_logps(
        MLLMModel.from_pretrained(small_model_dir).eval(),
        PreferenceDataset(data, processor),
        tmp_path / "ref.jsonl",
        small_model_dir,
        batch_size=4,
    )
    models = []
    for name, cache_mb in (("plain", 0), ("cached", 64)):
        torch.manual_seed(0)
        trainer = build_preference_trainer(
            ModelArguments(model=str(small_model_dir)),
            PreferenceArguments(data=str(data), logps=str(logps)),
            cpu_training_args(
                tmp_path / name, per_device_train_batch_size=2, num_train_epochs=2, vision_cache_mb=cache_mb
            ),
        )
        trainer.train()
        models.append(trainer.model)
    plain, cached = models
    assert cached.vision_cache.hits >= 4
    for (name, a), (_, b) in zip(plain.named_parameters(), cached.named_parameters()):
        assert torch.equal(a, b), name
