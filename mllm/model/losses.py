"""Token-level loss pieces of a causal LM: next-token cross-entropy and log-probabilities of label tokens.

Pure functions of logits [B, T, V] and labels [B, T] (IGNORE_INDEX where a position is not a target), used by the
LLM's own `.loss`, the SFT and preference trainers (`mllm.train.losses` re-exports them) and the model-family
interface (`mllm.vlm`). Everything is computed in float32 whatever the logits' dtype: bf16 log-softmax over a 150k
vocabulary loses most of the precision of a log-probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a position that is not a target (prompt, image placeholders, padding): torch's cross-entropy default."""


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at position t with the label at t+1 (causal next-token prediction)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T] with the same B and T; got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return logits[:, :-1, :], labels[:, 1:].to(logits.device)  # [B, T-1, V], [B, T-1]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy [B, T-1] in float32, 0 where masked; target mask [B, T-1])."""
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),  # [B*(T-1), V]
        shift_labels.reshape(-1),  # [B*(T-1)]
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)  # [B, T-1]
    return losses, shift_labels != IGNORE_INDEX


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy over target tokens (labels != IGNORE_INDEX); 0, still in the graph, without any.

    The sum of token losses is divided by `num_items_in_batch` when given: transformers passes the number of target
    tokens of the whole accumulated batch, so the loss of a batch does not depend on how it is split into
    gradient-accumulation micro-batches. Without it the sum is divided by this batch's own target-token count.
    """
    total, targets = token_loss_sum(logits, labels)
    if num_items_in_batch is None:
        denominator = targets.clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=total.device)
        if denominator.item() <= 0:
            raise ValueError(f"num_items_in_batch must be positive, got {denominator.item()}")
    return total / denominator.to(total.dtype)


def sft_loss_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each sample's target tokens, then over the samples that have any.

    With the token mean of `sft_loss`, a 50-token description outweighs a one-word answer fifty times; here every
    conversation weighs the same, so short answers (yes/no, a count, a colour) are not drowned by long ones.
    """
    total, samples = sample_loss_sum(logits, labels)
    return total / samples.clamp(min=1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' cross-entropy, number of target tokens): the parts of `sft_loss`, which add up
    over the pieces of a batch split by length (`mllm.data.sft.split_by_length`)."""
    losses, mask = token_losses(logits, labels)
    return losses.sum(), mask.sum()


def sample_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over samples of each sample's mean target-token loss, number of samples with a target): the parts of
    `sft_loss_per_sample`, which add up over the pieces of a split batch."""
    losses, mask = token_losses(logits, labels)
    counts = mask.sum(-1)  # [B]
    per_sample = losses.sum(-1) / counts.clamp(min=1)  # [B]
    return per_sample.sum(), (counts > 0).sum()


def get_batch_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    return_per_token_logp: bool = False,
    return_all: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under the previous position's logits, masked where labels are
    IGNORE_INDEX.

    Returns by default the per-sequence sum [B]; with `return_per_token_logp` the per-token log-probs [B, T-1]
    (0 where masked); with `return_all` the tuple (per_token [B, T-1], sum [B], average over response tokens [B]).
    The log-probability is computed as gathered logit minus logsumexp, which avoids materialising a full
    [B, T, V] log-softmax in float32.
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    mask = shift_labels != IGNORE_INDEX  # [B, T-1]
    safe_labels = shift_labels.masked_fill(~mask, 0)  # [B, T-1]
    shift_logits = shift_logits.float()
    picked = shift_logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    per_token = (picked - torch.logsumexp(shift_logits, dim=-1)) * mask  # [B, T-1]
    if return_per_token_logp and not return_all:
        return per_token
    total = per_token.sum(-1)  # [B]
    if not return_all:
        return total
    average = total / mask.sum(-1).clamp(min=1)  # [B]
    return per_token, total, average
