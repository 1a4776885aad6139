"""Reference log-probabilities of preference pairs: one concatenated forward, a resumable sharded precompute, and a
loader that refuses a file made for other data.

File layout (JSON lines): the first line is `{"header": {...}}` with the format name and the fingerprints of the
reference model (config + weight files), its tokenizer and the data file; every further line is one item:
    {"idx", "chosen_logp", "chosen_avg_logp", "chosen_per_token_logp": [...], "chosen_tokens",
     "rejected_logp", "rejected_avg_logp", "rejected_per_token_logp": [...], "rejected_tokens"}

While it runs, the work is a `mllm.io.ResumableJsonl` (fingerprinted by the header, locked, torn tails cut off):
each process (rank r of w, under torchrun) appends the items of its share (dataset positions i with i % w == r) to
`<OUT stem>.part<r>.jsonl`, flushed and synced after every batch; a rerun skips every idx found in any part file, so
an interrupted run resumes, even with another number of processes, and a run for another model, tokenizer, data or
--max-length is refused (`--overwrite` starts afresh). When all shares are done, rank 0 merges the parts into OUT
(written to a temporary name and renamed, so OUT is complete or absent) and removes them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from mllm.data.preference import PreferenceDataset, ReferenceLogps
from mllm.data.ranks import rank_and_world
from mllm.io import (
    ResumableJsonl,
    comparable,
    file_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
    write_text_atomic,
)
from mllm.model.losses import IGNORE_INDEX, get_batch_logps

logger = logging.getLogger(__name__)

FORMAT = "mllm-reference-logps-v1"


# -- the forward shared by precompute and training ----------------------------------------------------------------


@dataclass
class PairLogps:
    """Log-probs of a concatenated batch (B chosen rows, then B rejected rows)."""

    logits: torch.Tensor
    """[2B, T, V]."""
    per_token: torch.Tensor
    """[2B, T-1] float32, 0 where the label is IGNORE_INDEX."""
    sums: torch.Tensor
    """[2B] float32."""
    averages: torch.Tensor
    """[2B] float32."""


def concatenated_forward(model: Any, batch: dict[str, Any]) -> PairLogps:
    """Chosen and rejected rows in one forward; each pair's image goes through the vision tower once (the model
    maps the B encoded images to the 2B rows by `image_index`).

    Everything, vision included, runs inside the model's forward, so a DDP, DeepSpeed ZeRO-3 or FSDP wrapper
    gathers the parameters it needs around it."""
    if "inputs" in batch:  # another family's batch (mllm.data.conversations): its keywords, each row's images
        logits = model(**batch["inputs"], use_cache=False).logits  # [2B, T, V]
    else:
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


def data_fingerprint(path: str | Path) -> dict[str, Any]:
    return file_fingerprint(path)


def make_header(model_dir: str | Path, dataset: PreferenceDataset) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_fingerprint(model_dir),
        "tokenizer": tokenizer_fingerprint(model_dir),
        "data": data_fingerprint(dataset.data_path),
        "max_length": dataset.max_length,
        "max_slice_nums": getattr(dataset.processor, "max_slice_nums", None),  # MiniCPM-V's slicing only
        "n_items": len(dataset),
    }


def same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two headers describe the same computation (the model directory's path may differ, its content may not)."""

    def key(header: dict[str, Any]) -> Any:
        return comparable([header.get(k) for k in ("model", "tokenizer", "data", "max_length")])

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


def pair_records(batch: dict[str, Any], result: PairLogps) -> Iterator[dict[str, Any]]:
    """Per pair of the batch, the JSON record (per-token log-probs at response positions only)."""
    n = len(batch["idx"])
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # [2B, T-1]
    per_token = result.per_token.detach().float().cpu()
    for b, idx in enumerate(batch["idx"]):
        record: dict[str, Any] = {"idx": idx}
        for name, row in (("chosen", b), ("rejected", n + b)):
            record[f"{name}_logp"] = float(result.sums[row])
            record[f"{name}_avg_logp"] = float(result.averages[row])
            record[f"{name}_per_token_logp"] = per_token[row][mask[row]].tolist()
            record[f"{name}_tokens"] = int(mask[row].sum())
        yield record


def _default_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_existing_output(out_path: Path, header: dict[str, Any], overwrite: bool = False) -> bool:
    """True when OUT already holds this computation; a file from another model/data is refused (never overwritten
    without `overwrite`)."""
    if not out_path.exists() or out_path.stat().st_size == 0:  # emptied by an --overwrite that was cut short
        return False
    existing, _ = read_records(out_path)
    if existing is not None and same_source(existing, header):
        return True
    if overwrite:
        logger.warning("%s holds other log-probs; --overwrite: computing afresh", out_path)
        return False
    raise ValueError(
        f"{out_path} exists and holds log-probs of another model, tokenizer, data or --max-length; "
        "use --overwrite to compute afresh, or choose another --out"
    )


@torch.inference_mode()
def compute_reference_logps(
    model: Any,
    dataset: PreferenceDataset,
    out_path: str | Path,
    model_dir: str | Path,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: Callable[[], None] | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Compute this process's share of the reference log-probs, then (rank 0) merge all shares into `out_path`.

    The model is used in eval mode on whatever device it is on (restored to its previous mode afterwards);
    `model_dir` is the directory it was loaded from (its fingerprint goes into the header). Returns `out_path`.
    """
    out_path = Path(out_path)
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    default_rank, default_world = rank_and_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    barrier = barrier or _default_barrier
    header = make_header(model_dir, dataset)
    if check_existing_output(out_path, header, overwrite):
        logger.info("%s already holds these reference log-probs; nothing to do", out_path)
        return out_path
    output = ResumableJsonl(
        out_path,
        header,
        overwrite=overwrite,
        rank=rank,
        world_size=world_size,
        always_parts=True,
        barrier=barrier if world_size > 1 else None,
    )
    with output:
        todo = [i for i, idx in enumerate(dataset.ids) if i % world_size == rank and idx not in output.done]
        logger.info(
            "rank %d/%d: %d pairs to compute (%d already done)", rank, world_size, len(todo), len(output.done)
        )
        was_training = model.training
        model.eval()
        try:
            _write_share(model, dataset, output, todo, batch_size, pad_token_id, num_workers)
        finally:
            model.train(was_training)
        if rank != 0:
            output.close()  # this share is complete: rank 0 may merge it
        if world_size > 1:
            barrier()
        if rank == 0:
            merge_parts(output, dataset, header)
    if world_size > 1:
        barrier()
    return out_path


def _write_share(
    model: Any,
    dataset: PreferenceDataset,
    output: ResumableJsonl,
    todo: list[int],
    batch_size: int,
    pad_token_id: int | None,
    num_workers: int,
) -> None:
    """Append one record per pair of `todo` to this process's part, flushed and synced after each batch."""
    if not todo:
        return
    loader = DataLoader(
        Subset(dataset, todo),
        batch_size=batch_size,
        collate_fn=dataset.collator(pad_token_id),
        num_workers=num_workers,
    )
    for number, batch in enumerate(loader, 1):
        output.append(pair_records(batch, concatenated_forward(model, batch)))
        logger.info("%s: batch %d/%d written", output.write_path.name, number, len(loader))


def merge_parts(output: ResumableJsonl, dataset: PreferenceDataset, header: dict[str, Any]) -> None:
    """All part files -> OUT in dataset order (atomically, the header first), then the parts and the fingerprint
    side file are removed (OUT's header carries it).

    Raises ValueError naming the missing idx when some share is unfinished (rerun the command to finish it)."""
    by_idx = output.records()
    missing = [idx for idx in dataset.ids if idx not in by_idx]
    if missing:
        raise ValueError(
            f"{output.path}: {len(missing)} pairs have no log-probs yet (first idx: {missing[:5]}); rerun to finish"
        )
    lines = [json.dumps({"header": header}), *(json.dumps(by_idx[idx]) for idx in dataset.ids)]
    write_text_atomic(output.path, "\n".join(lines) + "\n")
    for part in output.part_files():
        part.unlink()
    output.fingerprint_path.unlink(missing_ok=True)
    logger.info("reference log-probs of %d pairs written to %s", len(dataset), output.path)


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
