"""Pure loss functions of the trainers: the preference losses and the vision tower's box-label losses.

They take tensors and return tensors, with no model or trainer state, so they can be tested against hand
computations and reused by any training loop. Everything is computed in float32 whatever the logits' dtype. The
token-level pieces (`sft_loss`, `sft_loss_per_sample`, `get_batch_logps`, `IGNORE_INDEX`) live with the model in
`mllm.model.losses` and are importable from here as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm.model.losses import IGNORE_INDEX, get_batch_logps, sft_loss, sft_loss_per_sample

PREFERENCE_LOSS_TYPES = ("nca_pair", "dpo", "ipo")
__all__ = [
    "IGNORE_INDEX",
    "PREFERENCE_LOSS_TYPES",
    "SFT_LOSS_REDUCTIONS",
    "get_batch_logps",
    "preference_loss",
    "sft_loss",
    "sft_loss_per_sample",
    "token_box_loss",
    "token_label_loss",
]

SFT_LOSS_REDUCTIONS = ("token", "sample")
"""`sft_loss` (every target token weighs the same) and `sft_loss_per_sample` (every sample does)."""


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
