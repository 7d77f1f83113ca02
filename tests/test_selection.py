"""Active selection: which pair to ask a user next (lore_pl/core/selection.py, PersonalRewardModel)."""

import pytest
import torch

from lore_pl import BasisFile, FewShotSettings, PersonalRewardModel
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import adapt_users
from lore_pl.core.selection import active_fits, best_per_user, information_scores, posterior_precision


def two_column_model(prior_precision=(1.0, 1.0)) -> PersonalRewardModel:
    """V = the first two axes of R^4; one stored user at weights (0.8, 0.2); a unit prior precision."""
    basis = torch.eye(4)[:, :2]
    return PersonalRewardModel(BasisFile(basis, 1.0, None, ["known"], torch.tensor([[0.8, 0.2]]),
                                         prior_mean=torch.zeros(2),
                                         prior_precision=None if prior_precision is None
                                         else torch.tensor(prior_precision)))


def pair(difference) -> torch.Tensor:
    """A pair [2, d] whose first-minus-second embedding is ``difference`` (second at the origin)."""
    difference = torch.tensor(difference, dtype=torch.float32)
    return torch.stack([difference, torch.zeros_like(difference)])


# three pairs: one orthogonal to the basis (p = 0), one with equal projections (p.w = 0.2 whatever w is),
# one along the difference of the two columns (its answer depends on w)
POOL = torch.stack([pair([0.0, 0.0, 3.0, 1.0]), pair([0.2, 0.2, 0.0, 0.0]), pair([3.0, -3.0, 0.0, 0.0])])


def test_information_picks_the_informative_pair_uncertainty_the_undecided_one():
    model = two_column_model()
    # under the population prior (uniform weights) the orthogonal pair is exactly at p = 0.5: uncertainty
    # asks it, though no w decides it; information asks the pair whose answer depends on w
    assert model.next_pair("new", POOL, selection="uncertainty") == 0
    assert model.next_pair("new", POOL, selection="information") == 2
    projected = LF.project(POOL[:, 0] - POOL[:, 1], model.basis)
    weights, covariance = model._posterior("new")
    scores = information_scores(projected, torch.zeros(3, dtype=torch.long), weights[None], covariance[None], 1.0)
    assert scores[0] == 0 and scores[1] < 1e-12 and scores[2] > 0.05
    assert model.next_pair("new", POOL, selection="information", exclude=[2]) in (0, 1)
    assert "new" not in model.user_ids  # asking stores nothing


def test_uncertainty_picks_the_probability_closest_to_one_half():
    model = two_column_model()
    pool = torch.stack([pair([2.0, 0.0, 0, 0]), pair([0.5, 1.5, 0, 0]), pair([-1.0, 0.0, 0, 0]),
                        pair([0.0, 3.0, 0, 0])])
    probability = model.preference_probability(pool[:, 0], pool[:, 1], "known")
    # p.w for the known user (0.8, 0.2): 1.6, 0.7, -0.8, 0.6: the last is closest to 0.5
    assert model.next_pair("known", pool, selection="uncertainty") == int((probability - 0.5).abs().argmin()) == 3


def test_information_is_bald_by_monte_carlo():
    """The quadrature's mutual information against a large Monte Carlo estimate of the same quantity."""
    generator = torch.Generator().manual_seed(0)
    projected = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -4.0]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    root = torch.randn(3, 3, generator=generator) * 0.3
    covariance = (root @ root.T)[None]
    users = torch.zeros(2, dtype=torch.long)
    scores = information_scores(projected, users, weights, covariance, tau=0.5)
    draws = torch.distributions.MultivariateNormal(weights[0].double(), covariance[0].double() + 1e-12 * torch.eye(3))
    w = draws.sample((400_000,))
    p = torch.sigmoid(projected.double() @ w.T / 0.5)  # [2, draws]

    def entropy(q):
        return -(q * q.log() + (1 - q) * (1 - q).log())

    monte_carlo = entropy(p.mean(1)) - entropy(p).mean(1)
    torch.testing.assert_close(scores, monte_carlo, atol=2e-3, rtol=0)
    assert scores.min() > 0.01


def test_best_per_user_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.9, 0.5, 0.7, 0.2])
    users = torch.tensor([0, 0, 0, 1, 1, 2])
    available = torch.tensor([True, True, True, True, False, False])
    # user 0: a tie between pairs 1 and 2, the first wins; user 1: pair 4 is taken; user 2: none left
    assert best_per_user(scores, users, 3, available).tolist() == [1, 3, -1]


def test_observe_moves_the_user_and_equals_personalize():
    model, reference = two_column_model(), two_column_model()
    pairs = [pair([1.0, -1.0, 0, 0]), pair([0.5, -2.0, 1.0, 0]), pair([2.0, 1.0, 0, 0])]
    choices = [1, 1, 0]  # the user prefers the second column
    fast = FewShotSettings(steps=100)
    before = torch.softmax(model.model.population_logits(), -1)
    for answered, (asked, choice) in enumerate(zip(pairs, choices), start=1):
        weights = model.observe("new", asked, choice, settings=fast)
        assert model.answers("new")[0].shape == (answered, 4)
    assert weights[1] > before[1] + 0.1
    chosen = torch.stack([p[c] for p, c in zip(pairs, choices)])
    rejected = torch.stack([p[1 - c] for p, c in zip(pairs, choices)])
    torch.testing.assert_close(reference.personalize("new", chosen, rejected, settings=fast), weights, rtol=0, atol=0)
    torch.testing.assert_close(reference.weight_covariance("new"), model.weight_covariance("new"), rtol=0, atol=0)
    reference.personalize("new", chosen[:1], rejected[:1], settings=fast)
    assert reference.answers("new") is None  # a direct fit replaces the recorded answers
    # each answer narrows the posterior along the direction it asked about
    variance = [two_column_model()._posterior("new")[1]]
    variance.append(model._posterior("new")[1])
    direction = torch.tensor([1.0, -1.0])
    assert direction @ variance[1] @ direction < direction @ variance[0] @ direction


def test_non_finite_pools_and_bad_choices_are_refused_and_nothing_is_stored():
    model = two_column_model()
    bad = POOL.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.next_pair("new", bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.observe("new", bad[1], 0)
    with pytest.raises(ValueError, match="choice must be 0"):
        model.observe("new", POOL[0], 2)
    with pytest.raises(ValueError, match=r"\[n, 2, d\]"):
        model.next_pair("new", POOL[:, 0])
    with pytest.raises(ValueError, match="unknown selection"):
        model.next_pair("new", POOL, selection="greedy")
    assert "new" not in model.user_ids and model.answers("new") is None
    model.observe("new", POOL[2], 0)
    before = model.weights("new").clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.observe("new", bad[1], 1)
    assert model.answers("new")[0].shape[0] == 1 and torch.equal(model.weights("new"), before)


def test_a_fit_without_prior_takes_an_empirical_one_or_says_it_needs_one():
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    precision = posterior_precision(0.0, None, 2, weights, torch.zeros(2))
    assert precision.shape == (2,) and bool((precision > 0).all())
    assert torch.equal(posterior_precision(None, torch.tensor([2.0, 3.0]), 2), torch.tensor([2.0, 3.0]).double())
    with pytest.raises(ValueError, match="needs a prior"):
        posterior_precision(0.0, None, 2)
    assert torch.equal(posterior_precision(0.0, None, 1), torch.ones(1).double())  # K=1: nothing to fit


def test_a_shared_model_asks_its_least_decided_pair_and_learns_nothing_personal():
    model = PersonalRewardModel(BasisFile(torch.eye(4)[:, :1], 1.0))
    pool = torch.stack([pair([2.0, 0, 0, 0]), pair([-0.5, 3.0, 0, 0]), pair([1.0, 0, 0, 0])])
    assert model.next_pair("new", pool, selection="uncertainty") == 1
    assert model.next_pair("new", pool, selection="information") == 0  # no pair informs: the first
    assert torch.equal(model.observe("new", pool[1], 1), torch.ones(1))


def test_active_fits_ask_each_pair_once_and_refit_with_the_one_solver(tiny_data):
    pool = tiny_data.split("unseen_pool")
    basis, prior = tiny_data.true_directions, LF.population_logits(tiny_data.true_weights["seen"])
    projected = LF.project(pool.features, basis)
    settings = FewShotSettings(steps=40, prior_strength=1.0)
    weights, order = active_fits(projected, pool.users, pool.num_users, [2, 3], "information", settings, 1.0,
                                 prior, covariance_precision=torch.ones(3))
    assert weights.shape == (2, pool.num_users, 3) and order.shape == (pool.num_users, 3)
    for user in range(pool.num_users):
        asked = order[user]
        assert len(set(asked.tolist())) == 3 and bool((pool.users[asked] == user).all())
    first_two = order[:, :2].reshape(-1).sort().values
    alone = adapt_users(projected[first_two], pool.users[first_two], pool.num_users, settings, 1.0, prior)
    torch.testing.assert_close(weights[0], torch.softmax(alone, -1))
