"""The ridge path past its weak edge: a stage there is kept only where its validation NLL is clearly lower
(one standard error of the paired difference), as in the strength grids; measured on Tulu-1, a step kept
for 0.003 nats on 20 validation pairs lost 0.025 on test (docs/results.md)."""

import pytest
import torch

from lore_pl.core import estimator as E

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clearly_lower_needs_more_than_one_standard_error_of_the_paired_difference():
    base = torch.linspace(0.3, 0.9, 20, dtype=torch.float64)
    assert E.clearly_lower(base - 0.05, base)  # lower on every pair
    noise = torch.tensor([0.2, -0.2] * 10, dtype=torch.float64)
    assert not E.clearly_lower(base - 0.01 + noise, base)  # lower on average, within its error
    assert not E.clearly_lower(base, base)


def scripted_path(monkeypatch, past_edge_nll: list[torch.Tensor]) -> tuple[float, list]:
    """``E.ridge_path`` over (100, 10, 1), each stage better than the last, with the per-pair validation NLLs
    of the stages past the edge given; returns (the kept ridge, the stages)."""
    on_grid = [torch.full((20,), value, dtype=torch.float64) for value in (0.69, 0.65, 0.60)]
    scripted = iter(on_grid + past_edge_nll)

    def scores(features, users, num_users, state):
        pair_nll = next(scripted)
        return float(pair_nll.mean()), 0.5, pair_nll

    monkeypatch.setattr(E, "_scores", scores)
    generator = torch.Generator().manual_seed(0)
    features, users = torch.randn(30, 4, generator=generator), torch.zeros(30, dtype=torch.long)
    start = E.MapState(torch.zeros(4, 1), None, None)
    _, ridge, stages = E.ridge_path(features, users, features[:20], users[:20], 1, start, E.Strengths(100.0, 1.0, 0.0),
                                    (100.0, 10.0, 1.0), iterations=2, stop_early=False)
    return ridge, stages


def test_a_stage_past_the_edge_is_kept_only_where_clearly_better(monkeypatch):
    noise = torch.tensor([0.2, -0.2] * 10, dtype=torch.float64)
    ridge, stages = scripted_path(monkeypatch, [0.599 + noise])  # 0.001 lower on average, 0.2 apart per pair
    assert [s[0] for s in stages] == pytest.approx([100.0, 10.0, 1.0, 0.1]) and ridge == 1.0
    ridge, stages = scripted_path(monkeypatch, [torch.full((20,), 0.55, dtype=torch.float64),
                                                torch.full((20,), 0.50, dtype=torch.float64)])
    assert [s[0] for s in stages] == pytest.approx([100.0, 10.0, 1.0, 0.1, 0.01]) and ridge == pytest.approx(0.01)
