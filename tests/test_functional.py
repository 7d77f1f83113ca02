import math

import pytest
import torch

from lore_pl.core import fewshot as FS
from lore_pl.core import functional as LF


def loop_loss(features, users, basis, logits, tau, weighting):
    """The protocol formula written as the reference does: a Python loop over users."""
    num_users = logits.shape[0]
    total, pairs = 0.0, 0
    for user in range(num_users):
        x = features[users == user]
        if len(x) == 0:
            continue
        direction = basis @ torch.softmax(logits[user], dim=0)
        nll = -torch.log(torch.sigmoid(x @ direction / tau))
        if weighting == "user_mean":
            total = total + nll.sum() / len(x)
        else:
            total, pairs = total + nll.sum(), pairs + len(x)
    return total if weighting == "user_mean" else total / pairs


@pytest.mark.parametrize("weighting", ["pair_mean", "user_mean"])
def test_vectorized_loss_and_gradients_equal_the_per_user_loop(weighting):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    users = torch.randint(0, 5, (40,), generator=generator)
    users[users == 3] = 2  # user 3 has no pairs
    tau = 2.0
    basis = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    vectorized = LF.preference_loss(
        LF.pair_logits(features, users, basis, LF.simplex_weights(logits), tau), users, 5, weighting
    )
    grads = torch.autograd.grad(vectorized, (basis, logits))
    looped = loop_loss(features, users, basis, logits, tau, weighting)
    loop_grads = torch.autograd.grad(looped, (basis, logits))

    assert vectorized.item() == pytest.approx(looped.item(), rel=1e-12)
    for mine, reference in zip(grads, loop_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
    assert torch.all(grads[1][3] == 0)  # a user with no pairs gets no gradient


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting"):
        LF.preference_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long), 1, "median")


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.0), (19, 0.0), (20, 0.0), (50, 0.5), (79, 59 / 60), (80, 1.0), (100, 1.0)],
)
def test_alpha_ramp(step, expected):
    # 100 steps: 0 before step 20, linear from 20 to 80, full after 80.
    assert LF.alpha_at(step, 100, alpha=10.0) == pytest.approx(10.0 * expected)


def test_regularizers_by_hand():
    reference = torch.tensor([1.0, 0.0])
    basis = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # columns: parallel, orthogonal
    assert LF.basis_regularizer(basis, reference, "cosine").item() == pytest.approx(0.5)
    assert LF.basis_regularizer(basis, reference, "l2").item() == pytest.approx(0.0 + 1.0 + 4.0)
    assert LF.basis_regularizer(basis, reference, "none").item() == 0.0


def test_prune_mask_drops_exactly_the_columns_under_the_threshold():
    weights = torch.tensor([[0.90, 0.0099, 0.0901, 0.0], [0.50, 0.0050, 0.0100, 0.4850]])
    assert LF.prune_mask(weights, 0.01).tolist() == [True, False, True, True]
    assert LF.prune_mask(weights, 0.5).tolist() == [True, False, False, False]


def test_pruned_columns_get_zero_weight_and_the_rest_renormalize():
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    weights = LF.simplex_weights(logits, torch.tensor([True, False, True]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.0, 0.5]]))


def test_sample_shots_counts_and_membership():
    users = torch.tensor([0] * 7 + [1] * 2 + [3] * 5)
    generator = torch.Generator().manual_seed(0)
    kept = LF.sample_shots(users, 3, generator)
    assert torch.bincount(users[kept], minlength=4).tolist() == [3, 2, 0, 3]
    assert kept.unique().numel() == kept.numel()
    # the same seed draws the same pairs; other seeds draw other subsets
    again = LF.sample_shots(users, 3, torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    draws = {tuple(LF.sample_shots(users, 3, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1


def test_sample_shots_draws_uniformly_within_a_user():
    users = torch.zeros(4, dtype=torch.long)
    counts = torch.zeros(4)
    for seed in range(2000):
        counts[LF.sample_shots(users, 1, torch.Generator().manual_seed(seed))] += 1
    assert torch.all((counts / 2000 - 0.25).abs() < 0.04)


def test_sample_shots_rejects_non_positive():
    with pytest.raises(ValueError, match="shots"):
        LF.sample_shots(torch.zeros(3, dtype=torch.long), 0)


def test_initial_logits():
    assert torch.equal(LF.initial_user_logits(3, 2, "zeros"), torch.zeros(3, 2))
    rand = LF.initial_user_logits(100, 2, "rand")
    assert rand.min() >= 0 and rand.max() < 1
    assert not math.isclose(LF.initial_user_logits(100, 2, "randn").std().item(), 0.0)
    with pytest.raises(ValueError):
        LF.initial_user_logits(3, 2, "ones")


@pytest.mark.parametrize("strength", [0.0, 0.7])
def test_hand_written_fewshot_gradient_equals_autograd(strength):
    generator = torch.Generator().manual_seed(3)
    projected = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    users = torch.randint(0, 6, (30,), generator=generator)
    users[users == 2] = 1  # user 2 has no pairs: only the prior acts on it
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(4, generator=generator, dtype=torch.float64)
    expected = FS.fewshot_loss(projected, users, logits, 3.0, prior, strength)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    padded = FS.PaddedPairs.from_flat(projected, users, 6)
    loss, grad = FS.fewshot_loss_and_grad(padded, logits.detach(), 3.0, prior, strength)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_hand_written_adam_follows_torch_adam():
    generator = torch.Generator().manual_seed(4)
    projected = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    users = torch.randint(0, 5, (40,), generator=generator)
    init = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    logits = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(50):
        optimizer.zero_grad()
        FS.fewshot_loss(projected, users, logits, 2.0).backward()
        optimizer.step()
    fitted = FS.fit_user_weights(projected, users, init, steps=50, lr=0.1, tau=2.0)
    torch.testing.assert_close(fitted, logits.detach(), rtol=1e-9, atol=1e-10)
