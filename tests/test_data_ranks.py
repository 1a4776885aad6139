"""SFT data tokenized by the processes of a DDP run, each its share (`mllm.data.ranks.map_across_ranks`): the same
dataset as one process builds, and a bad record refused by every process, the first one in the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.data_files import make_sft_files

from mllm.data.ranks import map_across_ranks


def _items(data: str, model_dir: str, max_length: int) -> dict:
    from mllm.data.sft import SupervisedDataset
    from mllm.processing.processor import MLLMProcessor

    dataset = SupervisedDataset(data, MLLMProcessor.from_pretrained(model_dir), max_length=max_length)
    return {
        "ids": dataset.ids,
        "skipped": dataset.n_skipped,
        "items": [
            (e.input_ids.tolist(), e.labels.tolist(), e.image_bound.tolist(), [str(p) for p in e.image_paths])
            for e in dataset.items
        ],
    }


def items_in_group(data: str, model_dir: str, max_length: int) -> dict:
    """`_items` in a process of `run_in_processes` with the gloo group Trainer would open; a refused record comes
    back as its message (module-level so that spawned processes can import it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return _items(data, model_dir, max_length)
    except ValueError as exc:
        return {"error": str(exc)}


def _write(path: Path, items: list[dict]) -> str:
    path.write_text(json.dumps(items))
    return str(path)


def test_two_processes_build_the_dataset_of_one(tmp_path: Path, small_model_dir: Path) -> None:
    from mllm.train.launch import run_in_processes

    items = json.loads(make_sft_files(tmp_path, 4).read_text())
    items += [{**item, "id": f"again-{item['id']}"} for item in items[:3]]  # images met twice (read once)
    too_long = {"role": "user", "content": "word " * 400}
    items.insert(2, {"id": "long", "conversations": [too_long, {"role": "assistant", "content": "ok"}]})
    data = _write(tmp_path / "train.json", items)
    one = _items(data, str(small_model_dir), max_length=256)
    assert (
        one["skipped"] == 1 and "long" not in one["ids"] and len(one["ids"]) == 7
    )  # an odd count: unequal shares
    two = run_in_processes(items_in_group, (data, str(small_model_dir), 256), processes=2)
    assert two == one


def test_a_bad_record_stops_every_process_at_the_first_one(tmp_path: Path, small_model_dir: Path) -> None:
    from mllm.train.launch import run_in_processes

    items = json.loads(make_sft_files(tmp_path, 6).read_text())
    items[1]["image"] = "images/color/missing.png"  # rank 1's share (items 1, 3, 5)
    items[2]["conversations"] = items[2]["conversations"][:1]  # rank 0's share: no assistant turn
    data = _write(tmp_path / "bad.json", items)
    with pytest.raises(ValueError, match=r"bad\.json, item 1: image file not found"):
        _items(data, str(small_model_dir), 2048)
    # rank 0 stopped at item 2 and raises item 1's error, found by rank 1 (which raises its own)
    two = run_in_processes(items_in_group, (data, str(small_model_dir), 2048), processes=2)
    assert "bad.json, item 1: image file not found" in two["error"]


def test_without_a_process_group_it_is_a_plain_map() -> None:
    assert map_across_ranks(5, lambda i: i * i) == [0, 1, 4, 9, 16]
    with pytest.raises(KeyError):
        map_across_ranks(3, {0: "a"}.__getitem__)
