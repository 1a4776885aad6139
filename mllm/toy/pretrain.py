"""Box-label pretraining of the vision tower (`mllm train vision`): teach `vpm` what is where before SFT.

    heads = TokenLabelHeads(model.vpm, dataset.num_categories, dataset.num_attributes)
    trainer = Trainer(model=heads, args=training_args, train_dataset=dataset, data_collator=box_label_collator)
    trainer.train()   # per vision token: CE(category) + CE(attribute) + L1(box corners, tokens inside a box)
    model.save_pretrained(out)        # the whole MLLM model directory, with the trained tower

Each token of the tower's output is labelled from COCO-format boxes (mllm/toy/box_labels.py): the category and
attribute of the box it lies in and that box's corners; linear heads read every token and only the tower and the
heads train. With `align_rows` the grid projector trains too: each image row it makes for the LLM is scored against
the LLM's (fixed) input embeddings of the category and attribute names present in its cell (`RowWordAlignment`), so
that the LLM meets rows that already point at the words it must say. Trainer does the optimizer, schedule,
checkpoints and resume; the heads are not kept (they are saved in the checkpoints, for resuming only).

Why it exists: the toy demo's tower, trained from scratch through the language model's loss alone, learned colours
but never the shapes (docs/LOG.md, 2026-11-27); read per token under this supervision, the same tower tells the
shapes apart within a few hundred steps, and SFT then starts from a tower that already sees them (with aligned
rows, the demo's descriptions went from greedy CHAIRi 58.6 to 2.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import HfArgumentParser, Trainer, set_seed

from mllm.boxes import iou
from mllm.model.modeling import MLLMModel, normalize_rows
from mllm.model.vision import VisionTransformer
from mllm.processing.processor import MLLMProcessor
from mllm.toy.box_labels import IGNORE_INDEX, BoxLabelDataset, box_label_collator
from mllm.toy.projectors import GridProjector
from mllm.train.curves import plot_curves_after_training
from mllm.train.guards import StopOnNonFinite
from mllm.train.losses import token_box_loss, token_label_loss
from mllm.train.runner import MLLMTrainingArguments, check_output_dir, resolve_resume
from mllm.train.sft import WEIGHTS_DTYPE_HELP, check_weights_dtype, resolve_weights_dtype

logger = logging.getLogger(__name__)


def region_presence(
    labels: torch.Tensor, tgt_sizes: torch.Tensor, num_classes: int, side: int
) -> torch.Tensor:
    """Per-token class labels [N, L] (IGNORE_INDEX = padding, num_classes = background) of slices with grids
    tgt_sizes [N, 2] -> [N, side*side, num_classes]: 1 where some token of the row's cell (the grid cut into
    side x side cells, row-major, as the grid projectors cut it) has the class."""
    out = []
    for row, (h, w) in zip(labels, tgt_sizes.tolist()):
        grid = row[: h * w].reshape(h, w)
        onehot = F.one_hot(grid.clamp(max=num_classes), num_classes + 1)[..., :num_classes]  # [h, w, K]
        pooled = F.adaptive_max_pool2d(onehot.permute(2, 0, 1).float()[None], side)[0]  # [K, s, s]
        out.append(pooled.flatten(1).T)  # [s*s, K]
    return torch.stack(out)


def thirds_labels(boxes: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token boxes [N, L, 4] (fractions of the image) and object masks [N, L] -> the vertical and horizontal
    third (0, 1, 2; 3 outside every object) of each token's box centre [N, L] twice, cut as the toy world cuts its
    position words (a centre below a third is the first, at or above two thirds the last)."""

    def third(centre: torch.Tensor) -> torch.Tensor:
        bucket = (centre >= 1 / 3).long() + (centre >= 2 / 3).long()
        return torch.where(inside, bucket, torch.full_like(bucket, 3))

    return third((boxes[..., 1] + boxes[..., 3]) / 2), third((boxes[..., 0] + boxes[..., 2]) / 2)


def region_boxes(
    boxes: torch.Tensor, inside: torch.Tensor, tgt_sizes: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token boxes [N, L, 4] and object masks [N, L] of slices with grids tgt_sizes [N, 2] -> the box of each
    row's cell (the grid cut into side x side cells as the grid projectors cut it: the box most of the cell's object
    tokens carry) [N, side*side, 4] and whether the cell holds any object token [N, side*side]."""
    targets = boxes.new_zeros(len(boxes), side * side, 4)
    present = torch.zeros(len(boxes), side * side, dtype=torch.bool, device=boxes.device)
    for n, (h, w) in enumerate(tgt_sizes.tolist()):
        grid, mask = boxes[n, : h * w].reshape(h, w, 4), inside[n, : h * w].reshape(h, w)
        for i in range(side):
            for j in range(side):
                rows = slice(i * h // side, -(-(i + 1) * h // side))
                cols = slice(j * w // side, -(-(j + 1) * w // side))
                cell = grid[rows, cols][mask[rows, cols]]  # [k, 4] boxes of the cell's object tokens
                if len(cell):
                    unique, counts = torch.unique(cell, dim=0, return_counts=True)
                    targets[n, i * side + j] = unique[counts.argmax()]
                    present[n, i * side + j] = True
    return targets, present


class RowWordAlignment(nn.Module):
    """Scores the projector's image rows against fixed word vectors (the LLM's input embeddings of the category and
    attribute names): logit = scale * <row, word / |word|> + bias, one per row and name. With `box_head`, a linear
    head on the same rows predicts the box of each row's cell (a sigmoid: fractions of the image)."""

    def __init__(
        self,
        projector: nn.Module,
        word_vectors: torch.Tensor,
        normalize: bool,
        box_head: bool = False,
        thirds: bool = False,
    ):
        super().__init__()
        self.projector = projector
        self.normalize = normalize
        # with `thirds`, the last six words name the vertical, then the horizontal thirds (`thirds_labels`)
        self.thirds = thirds
        self.register_buffer("words", F.normalize(word_vectors.float(), dim=-1), persistent=True)  # [K, D]
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.tensor(-2.0))
        self.box_head = nn.Linear(word_vectors.shape[1], 4) if box_head else None

    def forward(
        self, tokens: torch.Tensor, tgt_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(word logits [N, Q, K], row boxes [N, Q, 4] or None)."""
        rows = self.projector(tokens, tgt_sizes)  # [N, Q, D]
        if self.normalize:
            rows = normalize_rows(rows)
        logits = self.scale * rows.float() @ self.words.T + self.bias  # [N, Q, K]
        boxes = torch.sigmoid(self.box_head(rows)) if self.box_head is not None else None
        return logits, boxes


class TokenLabelHeads(nn.Module):
    """The vision tower with linear heads on every token: category, attribute (when there are attribute values) and
    the corners of the token's box (a sigmoid: fractions of the image)."""

    def __init__(
        self,
        vpm: VisionTransformer,
        num_categories: int,
        num_attributes: int,
        attn_implementation: str | None = "sdpa",
        row_words: RowWordAlignment | None = None,
    ):
        super().__init__()
        self.vpm = vpm
        self.row_words = row_words
        self.attn_implementation = attn_implementation
        dim = vpm.config.hidden_size
        self.category_head = nn.Linear(dim, num_categories)
        self.attribute_head = nn.Linear(dim, num_attributes) if num_attributes > 1 else None
        self.box_head = nn.Linear(dim, 4)

    def forward(
        self,
        pixel_values: list[torch.Tensor],
        tgt_sizes: torch.Tensor,
        category_labels: torch.Tensor | None = None,
        attribute_labels: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        tokens = self.vpm.encode_strips(pixel_values, tgt_sizes, self.attn_implementation)  # [N, L, D]
        out = {
            "category_logits": self.category_head(tokens),  # [N, L, C]
            "boxes": torch.sigmoid(self.box_head(tokens)),  # [N, L, 4]
        }
        if self.attribute_head is not None:
            out["attribute_logits"] = self.attribute_head(tokens)  # [N, L, A]
        if category_labels is not None:
            loss = token_label_loss(out["category_logits"], category_labels.to(tokens.device))
            if self.attribute_head is not None and attribute_labels is not None:
                loss = loss + token_label_loss(out["attribute_logits"], attribute_labels.to(tokens.device))
            if box_labels is not None:
                labels = category_labels.to(tokens.device)
                inside = (labels != IGNORE_INDEX) & (labels != self.category_head.out_features - 1)  # [N, L]
                loss = loss + token_box_loss(out["boxes"], box_labels.to(tokens.device), inside)
            if self.row_words is not None:
                loss = loss + self._row_word_loss(
                    tokens, tgt_sizes, category_labels, attribute_labels, box_labels
                )
            out["loss"] = loss
        return out

    def _row_word_loss(
        self, tokens, tgt_sizes, category_labels, attribute_labels, box_labels
    ) -> torch.Tensor:
        """BCE of every row against the names present in its cell (categories, then attribute values); with a row
        box head, + L1 of each row's box against its cell's."""
        tgt_sizes = tgt_sizes.to(tokens.device)
        categories = category_labels.to(tokens.device)
        side = self.row_words.projector.side
        background = self.category_head.out_features - 1
        presence = [region_presence(categories, tgt_sizes, background, side)]
        if self.attribute_head is not None and attribute_labels is not None:
            presence.append(
                region_presence(
                    attribute_labels.to(tokens.device),
                    tgt_sizes,
                    self.attribute_head.out_features - 1,
                    side,
                )
            )
        inside = (categories != IGNORE_INDEX) & (categories != background)  # [N, L]
        if self.row_words.thirds:
            for labels in thirds_labels(box_labels.to(tokens.device), inside):
                presence.append(region_presence(labels, tgt_sizes, 3, side))  # [N, Q, 3]
        target = torch.cat(presence, dim=-1)  # [N, Q, K]
        logits, boxes = self.row_words(tokens, tgt_sizes)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        if boxes is not None and box_labels is not None:
            cell_boxes, present = region_boxes(box_labels.to(tokens.device), inside, tgt_sizes, side)
            loss = loss + token_box_loss(boxes, cell_boxes, present)
        return loss


@torch.no_grad()
def object_token_accuracy(
    heads: TokenLabelHeads, dataset: BoxLabelDataset, limit: int | None = None, batch_size: int = 32
) -> dict[str, float]:
    """Share of the tokens inside some box whose category (and attribute) the heads predict right, and whose
    predicted box overlaps the true one with IoU >= 0.5, over the first `limit` images of `dataset` (background tokens
    are left out: they are most of an image and easy)."""
    was_training = heads.training
    heads.eval()
    correct = {"category": 0, "attribute": 0, "box": 0}
    total = 0
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        batch = box_label_collator([dataset[i] for i in range(start, min(start + batch_size, n))])
        out = heads(batch["pixel_values"], batch["tgt_sizes"])
        labels = batch["category_labels"].to(out["category_logits"].device)
        inside = (labels != IGNORE_INDEX) & (labels != dataset.num_categories - 1)  # [N, L]
        total += int(inside.sum())
        correct["category"] += int((out["category_logits"].argmax(-1) == labels)[inside].sum())
        if "attribute_logits" in out:
            attribute = batch["attribute_labels"].to(labels.device)
            correct["attribute"] += int((out["attribute_logits"].argmax(-1) == attribute)[inside].sum())
        pairs = zip(out["boxes"][inside].tolist(), batch["box_labels"].to(labels.device)[inside].tolist())
        correct["box"] += sum(iou(predicted, true) >= 0.5 for predicted, true in pairs)
    heads.train(was_training)
    result = {
        "object_tokens": float(total),
        "category_accuracy": correct["category"] / max(total, 1),
        "box_accuracy": correct["box"] / max(total, 1),
    }
    if heads.attribute_head is not None:
        result["attribute_accuracy"] = correct["attribute"] / max(total, 1)
    return result


@dataclass
class VisionPretrainArguments:
    """Which model's tower to train, on which boxes."""

    model: str = field(metadata={"help": "Model directory whose vision tower (vpm) is trained."})
    instances: str = field(metadata={"help": "COCO-format instances JSON (images, annotations with bbox)."})
    image_folder: str = field(metadata={"help": "Folder that the images' file_name paths are relative to."})
    attribute: str | None = field(
        default=None,
        metadata={"help": "Annotation key read by a second head (the toy world's 'color'); none by default."},
    )
    eval_instances: str | None = field(
        default=None, metadata={"help": "Held-out instances JSON: object-token accuracy at the end."}
    )
    eval_limit: int = field(default=300, metadata={"help": "Images of --eval-instances scored."})
    align_rows: bool = field(
        default=False,
        metadata={
            "help": "Also train the projector (a grid projector: merge or mlp) so that each image row points at the "
            "LLM's input embeddings of the category and attribute names present in its region."
        },
    )
    row_boxes: bool = field(
        default=False,
        metadata={
            "help": "With --align-rows, a linear head on each image row also predicts the box of the object "
            "covering most of its region, so that the rows the LLM reads carry where the objects are."
        },
    )
    region_words: str | None = field(
        default=None,
        metadata={
            "help": "With --align-rows, six comma-separated words naming the image's vertical thirds, then its "
            "horizontal thirds (the toy world's 'top,middle,bottom,left,center,right'): each row also points at "
            "the words of the thirds that the centres of its region's objects lie in."
        },
    )
    weights_dtype: str = field(default="auto", metadata={"help": WEIGHTS_DTYPE_HELP})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention of the tower: eager or sdpa."}
    )

    def __post_init__(self) -> None:
        for name in ("instances", "eval_instances"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')}: file not found: {path}")
        if not Path(self.image_folder).is_dir():
            raise ValueError(f"--image-root (--image-folder): not a folder: {self.image_folder}")
        if self.eval_limit < 1:
            raise ValueError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        check_weights_dtype(self.weights_dtype)
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"--attn-implementation must be eager or sdpa, got {self.attn_implementation!r}")
        if self.row_boxes and not self.align_rows:
            raise ValueError("--row-boxes needs --align-rows (the head reads the aligned rows)")
        if self.region_words is not None:
            if not self.align_rows:
                raise ValueError("--region-words needs --align-rows (the rows point at the words)")
            words = self.region_words.split(",")
            if len(words) != 6 or not all(w.strip() for w in words):
                raise ValueError(
                    f"--region-words must be six comma-separated words, got {self.region_words!r}"
                )


def word_vectors(model, tokenizer, names: list[str]) -> torch.Tensor:
    """[K, D]: the LLM's input embedding of each name as it appears inside a sentence (" name"; the mean over its
    tokens when it has several)."""
    table = model.get_input_embeddings().weight.detach()
    rows = []
    for name in names:
        ids = tokenizer.encode(" " + name, add_special_tokens=False)
        rows.append(table[torch.tensor(ids, device=table.device)].mean(0))
    return torch.stack(rows).cpu()


def train_vision(args: VisionPretrainArguments, training_args, resume: str | None = None) -> dict[str, Any]:
    """Train the tower of `args.model` on the boxes and save the whole model directory to training_args.output_dir;
    returns the Trainer's history figures and, with --eval-instances, the held-out object-token accuracy."""
    set_seed(training_args.seed)  # the heads are made before Trainer seeds itself: same seed, same run
    model = MLLMModel.from_pretrained(
        args.model,
        torch_dtype=resolve_weights_dtype(args.weights_dtype, training_args),
        attn_implementation=args.attn_implementation,
    )
    processor = MLLMProcessor.from_pretrained(args.model)
    dataset = BoxLabelDataset(args.instances, args.image_folder, processor.image_processor, args.attribute)
    row_words = None
    if args.align_rows:
        if not isinstance(model.resampler, GridProjector):
            raise ValueError(
                f"--align-rows needs a grid projector (merge or mlp), not {model.config.projector!r}"
            )
        names = dataset.category_names + dataset.attribute_values
        if args.region_words is not None:
            names += [w.strip() for w in args.region_words.split(",")]
        row_words = RowWordAlignment(
            model.resampler,
            word_vectors(model, processor.tokenizer, names),
            model.config.normalize_image_rows,
            box_head=args.row_boxes,
            thirds=args.region_words is not None,
        )
    heads = TokenLabelHeads(
        model.vpm,
        dataset.num_categories,
        dataset.num_attributes,
        model.config._attn_implementation,
        row_words,
    )
    training_args.remove_unused_columns = False
    trainer = Trainer(
        model=heads,
        args=training_args,
        train_dataset=dataset,
        data_collator=box_label_collator,
        callbacks=[StopOnNonFinite()],
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    out = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        model.save_pretrained(out)
        processor.save_pretrained(out)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    figures: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "train_runtime": result.metrics.get("train_runtime"),
    }
    if args.eval_instances:
        held_out = BoxLabelDataset(
            args.eval_instances, args.image_folder, processor.image_processor, args.attribute
        )
        figures.update(object_token_accuracy(heads, held_out, args.eval_limit))
    logger.info("vision pretraining done: %s", figures)
    return figures


def run_vision(argv: list[str]) -> int:
    """`mllm train vision ...`: parse, train, save, plot the loss curve."""
    parser = HfArgumentParser((VisionPretrainArguments, MLLMTrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_output_dir(training_args)
    figures = train_vision(args, training_args, resolve_resume(training_args))
    png = plot_curves_after_training(training_args.output_dir, ["loss"])
    print({**figures, "loss_png": str(png) if png else None})
    return 0
