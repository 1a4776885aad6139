"""The pure SFT and preference losses against direct per-token computations and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mllm.train.losses import get_batch_logps, preference_loss, sft_loss, sft_loss_per_sample


def _batch(seed: int = 0, b: int = 3, t: int = 7, v: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :2] = -100  # prompt
    labels[1, 4] = -100  # a hole in the middle of a response
    labels[2, 5:] = -100  # right padding
    return logits, labels


def _direct_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[list[tuple[int, float]]]:
    """(position, log p) of every target token, computed one by one."""
    out = []
    for i in range(labels.shape[0]):
        row = []
        for t in range(1, labels.shape[1]):
            label = int(labels[i, t])
            if label == -100:
                continue
            probs = torch.softmax(logits[i, t - 1].double(), dim=-1)
            row.append((t - 1, math.log(float(probs[label]))))
        out.append(row)
    return out


def test_sft_loss_matches_direct_mean():
    logits, labels = _batch()
    direct = [-lp for row in _direct_token_logps(logits, labels) for _, lp in row]
    assert sft_loss(logits, labels).item() == pytest.approx(sum(direct) / len(direct), rel=1e-5)


def test_sft_loss_is_float32_for_bf16_logits():
    logits, labels = _batch()
    assert sft_loss(logits.to(torch.bfloat16), labels).dtype == torch.float32


def test_gradient_accumulation_1x4_equals_4x1():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 5, generator=gen)
    labels = torch.randint(0, 5, (4, 6), generator=gen)
    labels[0, :4] = -100  # unequal target counts per item make plain per-micro-batch means differ
    labels[3, 1:] = -100
    labels[3, 3] = 2
    n_items = int((labels[:, 1:] != -100).sum())
    whole = sft_loss(logits, labels, num_items_in_batch=n_items)
    split = sum(sft_loss(logits[i : i + 1], labels[i : i + 1], num_items_in_batch=n_items) for i in range(4))
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    assert whole.item() == pytest.approx(sft_loss(logits, labels).item(), rel=1e-6)
    naive = sum(sft_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(4)) / 4
    assert naive.item() != pytest.approx(whole.item(), rel=1e-3)


def test_sft_loss_per_sample_averages_each_sample_then_the_samples():
    logits, labels = _batch()
    labels[1, 2:] = -100  # a sample without target tokens does not count
    per_sample = [[-lp for _, lp in row] for row in _direct_token_logps(logits, labels)]
    means = [sum(row) / len(row) for row in per_sample if row]
    assert len(means) == 2
    loss = sft_loss_per_sample(logits, labels)
    assert loss.item() == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert loss.dtype == torch.float32
    # the token mean weighs the longer sample more: the two reductions differ when the lengths do
    assert sft_loss(logits, labels).item() != pytest.approx(loss.item(), rel=1e-3)


def test_get_batch_logps_matches_loop():
    logits, labels = _batch(seed=2)
    per_token, total, average = get_batch_logps(logits, labels, return_all=True)
    assert per_token.shape == (3, 6)
    direct = _direct_token_logps(logits, labels)
    for i, row in enumerate(direct):
        expected = torch.zeros(6, dtype=torch.float64)
        for pos, lp in row:
            expected[pos] = lp
        assert torch.allclose(per_token[i].double(), expected, atol=1e-5)
        assert total[i].item() == pytest.approx(sum(lp for _, lp in row), rel=1e-5)
        assert average[i].item() == pytest.approx(sum(lp for _, lp in row) / len(row), rel=1e-5)
    assert per_token[1, 3].item() == 0.0  # the -100 in the middle
    assert per_token[2, 4:].abs().sum().item() == 0.0  # padding
    assert torch.equal(get_batch_logps(logits, labels), total)
    assert torch.equal(get_batch_logps(logits, labels, return_per_token_logp=True), per_token)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_preference_losses_against_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    beta = 0.5
    for i in range(2):
        lw, ll = float(pc[i] - rc[i]), float(pr[i] - rr[i])
        rw, rl = beta * lw, beta * ll
        nca = -_logsig(rw) - 0.5 * (_logsig(-rw) + _logsig(-rl))
        dpo = -_logsig(rw - rl)
        ipo = (lw - ll - 1 / (2 * beta)) ** 2
        for loss_type, expected in (("nca_pair", nca), ("dpo", dpo), ("ipo", ipo)):
            losses, cr, rj = preference_loss(pc, pr, rc, rr, beta, loss_type)
            assert losses[i].item() == pytest.approx(expected, rel=1e-6), loss_type
            assert cr[i].item() == pytest.approx(rw) and rj[i].item() == pytest.approx(rl)


def test_policy_equal_reference_values():
    logps = torch.tensor([-7.0, -1.5])
    nca, cr, rj = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1, loss_type="nca_pair")
    assert torch.allclose(nca, torch.full((2,), 2 * math.log(2)))
    assert torch.equal(cr, torch.zeros(2)) and torch.equal(rj, torch.zeros(2))
    dpo, _, _ = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1, loss_type="dpo")
    assert torch.allclose(dpo, torch.full((2,), math.log(2)))


@pytest.mark.parametrize("loss_type", ["nca_pair", "dpo", "ipo"])
def test_gradient_raises_chosen_relative_to_rejected(loss_type):
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-4.5, -5.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-4.2, -6.1]), torch.tensor([-4.4, -5.2])
    losses, cr, rj = preference_loss(chosen, rejected, ref_c, ref_r, beta=0.1, loss_type=loss_type)
    assert not cr.requires_grad and not rj.requires_grad
    losses.sum().backward()
    # a gradient-descent step moves chosen by -grad, rejected by -grad: the margin must grow
    assert torch.all(-chosen.grad > -rejected.grad)
    with torch.no_grad():
        new_c, new_r = chosen - 1.0 * chosen.grad, rejected - 1.0 * rejected.grad
    assert torch.all((new_c - new_r) > (chosen - rejected).detach())


def test_unknown_loss_type_names_allowed_values():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="nca_pair, dpo, ipo"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="kto")
