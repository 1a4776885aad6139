"""`mllm logp REF_MODEL --data preference_train.json --out FILE` (older spelling: `--model REF_MODEL`): reference
log-probs for preference training.

Resumable (rerun the same command after an interruption) and shardable: under
`torchrun --nproc_per_node N -m mllm logp ...` each process computes its share on its own GPU and rank 0 merges.
"""

from __future__ import annotations

import argparse
import logging
import os

from mllm.cli.common import (
    add_image_root_flag,
    add_model_argument,
    add_model_flags,
    add_overwrite_flag,
    load_from_args,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "logp",
        help="reference-model log-probs of preference pairs (for `mllm train preference --logps`)",
        description="Compute chosen/rejected log-probs of every pair under a reference model (resumable, "
        "shardable with torchrun).",
    )
    add_model_argument(
        parser, legacy_option="--model", help="reference model directory (usually the SFT model)"
    )
    parser.add_argument("--data", required=True, help="Preference data (RLAIF-V JSON).")
    parser.add_argument("--out", required=True, help="Output JSONL file (header + one record per pair).")
    add_image_root_flag(parser, "Folder image_path values are relative to.", legacy="--image-folder")
    parser.add_argument("--batch-size", type=int, default=4, help="Pairs per forward (default 4).")
    parser.add_argument(
        "--max-length", type=int, default=2048, help="Longest sequence; must match training's (2048)."
    )
    parser.add_argument("--max-slice-nums", type=int, default=None, help="Override the processor's slicing.")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images.")
    add_overwrite_flag(parser)
    add_model_flags(parser)
    parser.set_defaults(func=run)


def _init_distributed(device: str | None) -> tuple[str | None, bool]:
    """Under torchrun (WORLD_SIZE > 1): join the process group and pick this rank's GPU."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device, True


def run(args: argparse.Namespace) -> int:
    import torch

    from mllm.data.preference import PreferenceDataset
    from mllm.train.logps import compute_reference_logps

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    device, distributed = _init_distributed(args.device)
    try:
        model, processor = load_from_args(args, device)
        dataset = PreferenceDataset(
            args.data, processor, args.image_root, args.max_length, args.max_image_pixels
        )
        out = compute_reference_logps(
            model,
            dataset,
            args.out,
            args.model,
            batch_size=args.batch_size,
            pad_token_id=processor.pad_token_id,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
        )
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if not distributed or int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0
