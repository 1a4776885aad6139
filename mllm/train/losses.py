"""Pure loss functions shared by the SFT and preference trainers.

They take tensors and return tensors, with no model or trainer state, so they can be tested against hand
computations and reused by any training loop. Everything is computed in float32 whatever the logits' dtype, because
bf16 log-softmax over a 150k vocabulary loses most of the precision of a log-probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
PREFERENCE_LOSS_TYPES = ("nca_pair", "dpo", "ipo")
SFT_LOSS_REDUCTIONS = ("token", "sample")
"""`sft_loss` (every target token weighs the same) and `sft_loss_per_sample` (every sample does)."""


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at position t with the label at t+1 (causal next-token prediction)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T] with the same B and T; got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return logits[:, :-1, :], labels[:, 1:]  # [B, T-1, V], [B, T-1]


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy [B, T-1] in float32, 0 where masked; target mask [B, T-1])."""
    shift_logits, shift_labels = _shift(logits, labels)
    token_losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),  # [B*(T-1), V]
        shift_labels.reshape(-1),  # [B*(T-1)]
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)  # [B, T-1]
    return token_losses, shift_labels != IGNORE_INDEX


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy over target tokens (labels != -100).

    The sum of token losses is divided by `num_items_in_batch` when given: transformers passes the number of target
    tokens of the whole accumulated batch, so the loss of a batch does not depend on how it is split into
    gradient-accumulation micro-batches. Without it the sum is divided by this batch's own target-token count.
    """
    token_losses, mask = _token_losses(logits, labels)
    total = token_losses.sum()
    if num_items_in_batch is None:
        denominator = mask.sum().clamp(min=1)
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
    token_losses, mask = _token_losses(logits, labels)
    counts = mask.sum(-1)  # [B]
    per_sample = token_losses.sum(-1) / counts.clamp(min=1)  # [B]
    return per_sample.sum() / (counts > 0).sum().clamp(min=1)


def get_batch_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    return_per_token_logp: bool = False,
    return_all: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under the previous position's logits, masked where labels are -100.

    Returns by default the per-sequence sum [B]; with `return_per_token_logp` the per-token log-probs [B, T-1]
    (0 where masked); with `return_all` the tuple (per_token [B, T-1], sum [B], average over response tokens [B]).
    The log-probability is computed as gathered logit minus logsumexp, which avoids materialising a full
    [B, T, V] log-softmax in float32.
    """
    shift_logits, shift_labels = _shift(logits, labels)
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


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "nca_pair",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses and the (detached) implicit rewards r = beta * (log pi - log pi_ref).

    `nca_pair` (the exercise's loss): -log s(r_w) - 1/2 [log s(-r_w) + log s(-r_l)];
    `dpo`: -log s(r_w - r_l); `ipo`: ((lw - ll) - 1/(2 beta))^2 with the unscaled log-ratios
    lw = log pi(y_w) - log pi_ref(y_w) and ll likewise. All inputs are [B]; returns three [B] tensors.
    """
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; allowed values: {', '.join(PREFERENCE_LOSS_TYPES)}"
        )
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen_logratio = policy_chosen_logps.float() - reference_chosen_logps.float()  # [B]
    rejected_logratio = policy_rejected_logps.float() - reference_rejected_logps.float()  # [B]
    chosen_rewards = beta * chosen_logratio  # [B]
    rejected_rewards = beta * rejected_logratio  # [B]
    if loss_type == "nca_pair":
        losses = -F.logsigmoid(chosen_rewards) - 0.5 * (
            F.logsigmoid(-chosen_rewards) + F.logsigmoid(-rejected_rewards)
        )
    elif loss_type == "dpo":
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    else:  # ipo
        losses = (chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def token_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of per-token class logits [N, L, C] against labels [N, L] (IGNORE_INDEX = padding), in
    float32: the loss of the vision tower's box-label pretraining (`mllm train vision`)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, L, C] and labels [N, L]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def token_box_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between predicted and true box corners [N, L, 4] over the tokens where mask [N, L] is True
    (the tokens inside a box), in float32; 0 when no token is."""
    if predicted.shape != target.shape or predicted.shape[:2] != mask.shape:
        raise ValueError(
            f"predicted and target must be [N, L, 4] and mask [N, L]; got {tuple(predicted.shape)}, "
            f"{tuple(target.shape)} and {tuple(mask.shape)}"
        )
    if not bool(mask.any()):
        return predicted.sum() * 0.0
    return F.l1_loss(predicted[mask].float(), target[mask].float())
