import math

import pytest
import torch

from lore_pl.modules.metrics import PerUserAccuracy


def test_mean_and_std_against_a_hand_computation_with_an_empty_user():
    metric = PerUserAccuracy(num_users=4)
    # user 0: 2 of 3 right; user 1: 1 of 1; user 2: no pairs; user 3: 0 of 2 (a zero logit is wrong)
    logits = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.1, 0.0])
    users = torch.tensor([0, 0, 0, 1, 3, 3])
    metric.update(logits[:4], users[:4])
    metric.update(logits[4:], users[4:])  # accumulates across updates
    result = metric.compute()
    per_user = [2 / 3, 1.0, 0.0]
    mean = sum(per_user) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in per_user) / 3)
    assert result["mean"].item() == pytest.approx(mean)
    assert result["std"].item() == pytest.approx(std)
    assert result["users"].item() == 3
    assert torch.isnan(metric.per_user()[2])


def test_states_are_sum_reduced_for_ddp():
    metric = PerUserAccuracy(num_users=2)
    assert metric._reductions["correct"] is not None
    assert metric._reductions["total"] is not None
    # two "ranks" merged by summing their states equal one process that saw everything
    a, b, both = PerUserAccuracy(2), PerUserAccuracy(2), PerUserAccuracy(2)
    logits, users = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([0, 1, 1, 0])
    a.update(logits[:2], users[:2])
    b.update(logits[2:], users[2:])
    both.update(logits, users)
    a.correct += b.correct
    a.total += b.total
    assert a.compute()["mean"] == both.compute()["mean"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_users"):
        PerUserAccuracy(0)
    metric = PerUserAccuracy(2)
    with pytest.raises(ValueError, match="out of range"):
        metric.update(torch.tensor([1.0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0]))


def test_no_pairs_gives_nan():
    assert torch.isnan(PerUserAccuracy(3).compute()["mean"])
