import math

import pytest
import torch

from lore_pl.core.stats import (
    count_per_user,
    mean_over_users,
    mean_std_over_users,
    paired_bootstrap,
    per_user_accuracy,
)
from lore_pl.modules.metrics import PerUserAccuracy


def test_per_user_accuracy_by_hand():
    logits = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0])
    users = torch.tensor([0, 0, 1, 1, 2])
    accuracy = per_user_accuracy(logits, users, 4)
    assert accuracy[:3].tolist() == [0.5, 0.5, 1.0] and torch.isnan(accuracy[3])  # a zero logit is not right


def test_ties_earn_their_credit():
    logits = torch.tensor([0.0, 0.0, 1.0, -1.0])
    users = torch.tensor([0, 0, 1, 1])
    assert per_user_accuracy(logits, users, 2, tie_credit=0.5).tolist() == [0.5, 0.5]


def test_batched_fits_are_each_row_alone():
    # rows of logits are fits scored on the same pairs: each row counts exactly as it would alone
    generator = torch.Generator().manual_seed(0)
    users = torch.tensor([0, 2, 2, 3, 0, 3, 3])  # user 1 has no pairs
    logits = torch.randn(3, 2, 7, generator=generator)
    logits[0, 0, 1] = 0.0
    batched = per_user_accuracy(logits, users, 4, tie_credit=0.5)
    assert batched.shape == (3, 2, 4)
    assert count_per_user(logits > 0, users, 4).shape == (3, 2, 4)
    for fit in range(3):
        for row in range(2):
            alone = per_user_accuracy(logits[fit, row], users, 4, tie_credit=0.5)
            assert torch.equal(batched[fit, row].nan_to_num(-1), alone.nan_to_num(-1))
            assert mean_over_users(batched)[fit, row] == mean_std_over_users(alone)[0]
    assert torch.isnan(batched[..., 1]).all()


def test_mean_and_std_leave_out_users_without_pairs():
    per_user = torch.tensor([0.5, float("nan"), 1.0], dtype=torch.float64)
    assert mean_std_over_users(per_user) == (0.75, 0.25)
    assert float(mean_over_users(per_user)) == 0.75
    assert all(math.isnan(x) for x in mean_std_over_users(torch.full((2,), float("nan"))))


def test_the_metric_is_the_functional_summed_over_batches():
    generator = torch.Generator().manual_seed(1)
    users = torch.randint(5, (40,), generator=generator)
    logits = torch.randn(40, generator=generator)
    metric = PerUserAccuracy(6)
    metric.update(logits[:25], users[:25])
    metric.update(logits[25:], users[25:])
    functional = per_user_accuracy(logits, users, 6)
    assert torch.equal(metric.per_user().nan_to_num(-1), functional.nan_to_num(-1))
    mean, std = mean_std_over_users(functional)
    result = metric.compute()
    assert (float(result["mean"]), float(result["std"]), int(result["users"])) == (mean, std, 5)


def test_the_interval_covers_the_true_gain_about_95_times_in_100():
    # users whose true accuracies differ by 0.03 on average, measured on 20 pairs each
    generator = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for _ in range(200):
        base = 0.55 + 0.2 * torch.rand(150, generator=generator)
        gain = 0.03 + 0.05 * torch.randn(150, generator=generator)
        true_gain = float(gain.mean())  # the population is these users: the estimand is their mean gain
        measured = [
            torch.binomial(torch.full((150,), 20.0), p.clamp(0, 1), generator=generator) / 20
            for p in (base + gain, base)
        ]
        result = paired_bootstrap(*measured, samples=1000, seed=int(torch.randint(10**6, (1,), generator=generator)))
        covered += result["low"] <= true_gain <= result["high"]
        widths.append(result["high"] - result["low"])
    assert 0.9 <= covered / 200 <= 0.99
    assert 0.02 < sum(widths) / len(widths) < 0.06  # neither degenerate nor uninformative


def test_identical_models_have_no_gain_and_nan_users_are_left_out():
    accuracy = torch.tensor([0.5, 0.7, float("nan"), 0.9])
    result = paired_bootstrap(accuracy, accuracy)
    assert result == {"gain": 0.0, "low": 0.0, "high": 0.0, "users": 3}
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(torch.zeros(3), torch.zeros(4))
