import pytest
import torch

from lore_pl.core.stats import paired_bootstrap, per_user_accuracy


def test_per_user_accuracy_by_hand():
    logits = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0])
    users = torch.tensor([0, 0, 1, 1, 2])
    accuracy = per_user_accuracy(logits, users, 4)
    assert accuracy[:3].tolist() == [0.5, 0.5, 1.0] and torch.isnan(accuracy[3])  # a zero logit is not right


def test_the_interval_covers_the_true_gain_about_95_times_in_100():
    # users whose true accuracies differ by 0.03 on average, measured on 20 pairs each
    generator = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for _ in range(200):
        base = 0.55 + 0.2 * torch.rand(150, generator=generator)
        gain = 0.03 + 0.05 * torch.randn(150, generator=generator)
        true_gain = float(gain.mean())  # the population is these users: the estimand is their mean gain
        measured = [torch.binomial(torch.full((150,), 20.0), p.clamp(0, 1), generator=generator) / 20
                    for p in (base + gain, base)]
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
