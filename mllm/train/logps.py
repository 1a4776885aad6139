"""Reference log-probabilities of preference pairs: one concatenated forward, a resumable sharded precompute, and a
loader that refuses a file made for other data.

File layout (JSON lines): the first line is `{"header": {...}}` with the format name and the fingerprints of the
reference model (config + weight files), its tokenizer and the data file; every further line is one item:
    {"idx", "chosen_logp", "chosen_avg_logp", "chosen_per_token_logp": [...], "chosen_tokens",
     "rejected_logp", "rejected_avg_logp", "rejected_per_token_logp": [...], "rejected_tokens"}

While it runs, each process (rank r of w, under torchrun) appends the items of its share (dataset positions
i with i % w == r) to `OUT.part<r>`, flushed after every batch; a rerun skips every idx found in any part file, so
an interrupted run resumes, even with another number of processes. When all shares are done, rank 0 merges the parts
into OUT (written to a temporary name and renamed, so OUT is complete or absent) and removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mllm.data.preference import PreferenceDataset, ReferenceLogps, preference_collator
from mllm.files import write_text_atomic
from mllm.train.losses import get_batch_logps

logger = logging.getLogger(__name__)

FORMAT = "mllm-reference-logps-v1"
HEAD_BYTES = 1 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)
CONFIG_FILES = ("config.json", "adapter_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


# -- the forward shared by precompute and training ----------------------------------------------------------------


@dataclass
class PairLogps:
    """Log-probs of a concatenated batch (B chosen rows, then B rejected rows)."""

    logits: torch.Tensor
    """[2B, T, V]."""
    per_token: torch.Tensor
    """[2B, T-1] float32, 0 where the label is -100."""
    sums: torch.Tensor
    """[2B] float32."""
    averages: torch.Tensor
    """[2B] float32."""


def concatenated_forward(model: Any, batch: dict[str, Any]) -> PairLogps:
    """Chosen and rejected rows in one forward; each pair's image goes through the vision tower once (the model
    maps the B encoded images to the 2B rows by `image_index`).

    Everything, vision included, runs inside the model's forward, so a DDP, DeepSpeed ZeRO-3 or FSDP wrapper
    gathers the parameters it needs around it."""
    data = {
        "input_ids": batch["input_ids"],  # [2B, T]
        "attention_mask": batch["attention_mask"],
        "position_ids": batch["position_ids"],
        "image_bound": batch["image_bound"],
        "pixel_values": batch["pixel_values"],  # B images
        "tgt_sizes": batch["tgt_sizes"],
        "image_index": batch["image_index"],  # [2B]: row -> image
    }
    logits = model(data).logits  # [2B, T, V]
    labels = batch["labels"].to(logits.device)
    per_token, sums, averages = get_batch_logps(logits, labels, return_all=True)
    return PairLogps(logits, per_token, sums, averages)


# -- fingerprints ----------------------------------------------------------------------------------------------------


def sha256_file(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """Config hashes and, per weight file, its size and the sha256 of its first MB (the whole sha256 of a
    multi-GB checkpoint would take minutes; the safetensors header, with every tensor's offsets, is in that MB);
    a sharded checkpoint's index is hashed whole."""
    model_dir = Path(model_dir)
    configs = {name: sha256_file(model_dir / name) for name in CONFIG_FILES if (model_dir / name).is_file()}
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    index = model_dir / "model.safetensors.index.json"
    return {
        "dir": str(model_dir),
        "configs": configs,
        "index_sha256": sha256_file(index) if index.is_file() else None,
        "weights": [
            {"name": p.name, "size": p.stat().st_size, "sha256_first_mb": sha256_file(p, HEAD_BYTES)}
            for p in weights
        ],
    }


def tokenizer_fingerprint(model_dir: str | Path) -> dict[str, str]:
    model_dir = Path(model_dir)
    return {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}


def data_fingerprint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def make_header(model_dir: str | Path, dataset: PreferenceDataset) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_fingerprint(model_dir),
        "tokenizer": tokenizer_fingerprint(model_dir),
        "data": data_fingerprint(dataset.data_path),
        "max_length": dataset.max_length,
        "max_slice_nums": dataset.max_slice_nums,
        "n_items": len(dataset),
    }


def same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two headers describe the same computation (the model directory's path may differ, its content may not)."""

    def key(header: dict[str, Any]) -> Any:
        model = {k: v for k, v in header.get("model", {}).items() if k != "dir"}
        return (model, header.get("tokenizer"), header.get("data"), header.get("max_length"))

    return key(a) == key(b)


# -- reading and writing record files --------------------------------------------------------------------------------


def read_records(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, records) of a log-prob file or part; a torn last line (a killed run) is ignored."""
    header, records = None, []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logger.warning("%s: ignoring a torn last line (interrupted run)", path)
                break
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from exc
        if number == 1 and isinstance(row, dict) and "header" in row:
            header = row["header"]
        else:
            records.append(row)
    return header, records


def drop_torn_tail(path: Path) -> None:
    """Cut a part file back to its last complete line, so that appending does not glue onto a torn one."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def part_files(out_path: Path) -> list[Path]:
    return sorted(out_path.parent.glob(f"{out_path.name}.part*"))


def pair_records(batch: dict[str, Any], result: PairLogps) -> Iterator[dict[str, Any]]:
    """Per pair of the batch, the JSON record (per-token log-probs at response positions only)."""
    n = len(batch["idx"])
    mask = batch["labels"][:, 1:] != -100  # [2B, T-1]
    per_token = result.per_token.detach().float().cpu()
    for b, idx in enumerate(batch["idx"]):
        record: dict[str, Any] = {"idx": idx}
        for name, row in (("chosen", b), ("rejected", n + b)):
            record[f"{name}_logp"] = float(result.sums[row])
            record[f"{name}_avg_logp"] = float(result.averages[row])
            record[f"{name}_per_token_logp"] = per_token[row][mask[row]].tolist()
            record[f"{name}_tokens"] = int(mask[row].sum())
        yield record


def _distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _default_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_existing_output(out_path: Path, header: dict[str, Any]) -> bool:
    """True when OUT already holds this computation; a file from another model/data is never overwritten."""
    if not out_path.exists():
        return False
    existing, _ = read_records(out_path)
    if existing is None or not same_source(existing, header):
        raise ValueError(
            f"{out_path} exists and holds log-probs of another model, tokenizer, data or --max-length; "
            "remove it or choose another --out"
        )
    return True


@torch.inference_mode()
def compute_reference_logps(
    model: Any,
    dataset: PreferenceDataset,
    out_path: str | Path,
    model_dir: str | Path,
    batch_size: int = 8,
    pad_token_id: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    num_workers: int = 0,
) -> Path:
    """Compute this process's share of the reference log-probs, then (rank 0) merge all shares into `out_path`.

    The model is used in eval mode on whatever device it is on (restored to its previous mode afterwards);
    `model_dir` is the directory it was loaded from (its fingerprint goes into the header). Returns `out_path`.
    """
    out_path = Path(out_path)
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    default_rank, default_world = _distributed_rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    barrier = barrier or _default_barrier
    header = make_header(model_dir, dataset)
    if check_existing_output(out_path, header):
        logger.info("%s already holds these reference log-probs; nothing to do", out_path)
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(out_path, header)
    todo = [i for i, idx in enumerate(dataset.ids) if i % world_size == rank and idx not in done]
    logger.info("rank %d/%d: %d pairs to compute (%d already done)", rank, world_size, len(todo), len(done))
    was_training = model.training
    model.eval()
    try:
        _write_share(
            model,
            dataset,
            out_path.with_name(f"{out_path.name}.part{rank}"),
            header,
            todo,
            batch_size,
            pad_token_id,
            num_workers,
        )
    finally:
        model.train(was_training)
    if world_size > 1:
        barrier()
    if rank == 0:
        merge_parts(out_path, dataset, header)
    if world_size > 1:
        barrier()
    return out_path


def _done_ids(out_path: Path, header: dict[str, Any]) -> set[Any]:
    done: set[Any] = set()
    for part in part_files(out_path):
        part_header, records = read_records(part)
        if part_header is None and not records:  # just created by another process, nothing written yet
            continue
        if part_header is None or not same_source(part_header, header):
            raise ValueError(
                f"{part} is a partial result of another model, tokenizer, data or --max-length; remove it "
                f"(or finish that run) before computing into {out_path}"
            )
        done.update(r["idx"] for r in records)
    return done


def _write_share(
    model: Any,
    dataset: PreferenceDataset,
    part: Path,
    header: dict[str, Any],
    todo: list[int],
    batch_size: int,
    pad_token_id: int,
    num_workers: int,
) -> None:
    """Append one record per pair of `todo` to `part`, flushed and synced after each batch."""
    from torch.utils.data import DataLoader, Subset

    if not todo:
        return
    if part.exists():
        drop_torn_tail(part)
    loader = DataLoader(
        Subset(dataset, todo),
        batch_size=batch_size,
        collate_fn=partial(preference_collator, pad_token_id=pad_token_id),
        num_workers=num_workers,
    )
    new_file = not part.exists() or part.stat().st_size == 0
    with open(part, "a", encoding="utf-8") as handle:
        if new_file:
            handle.write(json.dumps({"header": header}) + "\n")
        for number, batch in enumerate(loader, 1):
            result = concatenated_forward(model, batch)
            handle.write("".join(json.dumps(r) + "\n" for r in pair_records(batch, result)))
            handle.flush()
            os.fsync(handle.fileno())
            logger.info("%s: batch %d/%d written", part.name, number, len(loader))


def merge_parts(out_path: Path, dataset: PreferenceDataset, header: dict[str, Any]) -> None:
    """All part files -> OUT in dataset order (atomically), then the parts are removed.

    Raises ValueError naming the missing idx when some share is unfinished (rerun the command to finish it)."""
    by_idx: dict[Any, dict[str, Any]] = {}
    parts = part_files(out_path)
    for part in parts:
        _, records = read_records(part)
        for record in records:
            by_idx.setdefault(record["idx"], record)
    missing = [idx for idx in dataset.ids if idx not in by_idx]
    if missing:
        raise ValueError(
            f"{out_path}: {len(missing)} pairs have no log-probs yet (first idx: {missing[:5]}); rerun to finish"
        )
    lines = [json.dumps({"header": header}), *(json.dumps(by_idx[idx]) for idx in dataset.ids)]
    write_text_atomic(out_path, "\n".join(lines) + "\n")
    for part in parts:
        part.unlink()
    logger.info("reference log-probs of %d pairs written to %s", len(dataset), out_path)


def load_reference_logps(
    path: str | Path, dataset: PreferenceDataset, tokenizer_dir: str | Path | None = None
) -> dict[Any, ReferenceLogps]:
    """Read a log-prob file and attach it to `dataset`; refuse it (ValueError) unless it was computed on this very
    data file (sha256) and covers every pair with the same number of response tokens. A tokenizer whose files
    differ from `tokenizer_dir`'s is reported as a warning."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--logps: file not found: {path}")
    header, records = read_records(path)
    if header is None or header.get("format") != FORMAT:
        raise ValueError(f"--logps {path}: not a reference log-prob file of this tool (no '{FORMAT}' header)")
    data = data_fingerprint(dataset.data_path)
    if header.get("data", {}).get("sha256") != data["sha256"]:
        raise ValueError(
            f"--logps {path}: computed for data file {header.get('data', {}).get('name')!r} "
            f"(sha256 {str(header.get('data', {}).get('sha256'))[:12]}), but the training data {dataset.data_path} "
            f"has sha256 {data['sha256'][:12]}; recompute with `mllm logp --data {dataset.data_path}`"
        )
    if tokenizer_dir is not None and header.get("tokenizer") != tokenizer_fingerprint(tokenizer_dir):
        # Not refused: the same vocabulary saved by another library version hashes differently. The token counts,
        # checked for every pair below, catch a tokenizer that really tokenizes differently.
        logger.warning("--logps %s: computed with tokenizer files that differ from %s", path, tokenizer_dir)
    loaded = {}
    for record in records:
        loaded[record["idx"]] = ReferenceLogps(
            chosen_logp=record["chosen_logp"],
            chosen_avg_logp=record["chosen_avg_logp"],
            chosen_tokens=record["chosen_tokens"],
            rejected_logp=record["rejected_logp"],
            rejected_avg_logp=record["rejected_avg_logp"],
            rejected_tokens=record["rejected_tokens"],
        )
    dataset.set_reference(loaded, f"--logps {path}")
    logger.info(
        "reference log-probs of %d pairs loaded from %s (model %s)",
        len(loaded),
        path,
        header.get("model", {}).get("dir"),
    )
    return loaded
