"""The MAP estimator (the default): held-out selection of K, the ridge path, the population prior."""

import pytest
import torch

from datamodules import SyntheticPopulationDataModule
from helpers import TINY, tiny_trainer
from lore_pl import BasisModule, FewShotSettings, LoreDataWarning, LoreModel, PersonalRewardModel
from lore_pl.core import estimator as E
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import adapt_users, fit_user_weights, weight_covariance

pytestmark = pytest.mark.usefixtures("one_thread")

#: a small noisy population: 150 seen users x 30 Bradley-Terry pairs in d=16
PLANTED = dict(dim=16, responses_per_prompt=8, num_train_prompts=300, num_test_prompts=60, num_seen_users=150,
               num_unseen_users=20, train_prompts_per_user=30, fewshot_prompts_per_user=10, test_prompts_per_user=10,
               labels="bradley_terry", noise_temperature=0.3, val_fraction=0.2)
QUICK = E.MapSettings(subspace=8, projected_iterations=100, stage_iterations=20)


def fitted(directions: int, seed: int = 0, **module) -> tuple[BasisModule, SyntheticPopulationDataModule]:
    data = SyntheticPopulationDataModule(**PLANTED, num_directions=directions, seed=seed)
    model = BasisModule(map_settings=QUICK, **module)
    tiny_trainer(20, limit_val_batches=1.0, check_val_every_n_epoch=1).fit(model, datamodule=data)
    return model, data


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_auto_finds_the_planted_rank_and_no_personalization_where_there_is_none(seed):
    planted, _ = fitted(3, seed)
    assert planted.model.rank == 3 and planted.selection["rank"] == 3
    alike, _ = fitted(1, seed)  # every user has the same true direction
    assert alike.model.rank == 1 and not alike.model.personalized
    # the held-out curve is kept: every candidate K with its validation NLL
    assert {entry["rank"] for entry in planted.selection["curve"]} == set(QUICK.ranks)


def test_the_ridge_path_keeps_the_best_validated_stage(capsys):
    model, data = fitted(3)
    # selection's time is printed with the rest of the fit's progress, and kept
    assert model.selection["seconds"] > 0 and model.selection["notes"] == []
    assert f"{len(model.selection['curve'])} fits in " in capsys.readouterr().out
    path = model.selection["path"]
    kept = min(path, key=lambda stage: stage["val_nll"])
    assert model.selection["ridge"] == kept["ridge"] and len(path) >= 2
    # the model in hand is that stage's: its validation NLL is the best one seen
    val = data.split("seen_val")
    logits = model(val.features, val.users)
    assert float(torch.nn.functional.softplus(-logits).mean()) == pytest.approx(kept["val_nll"], abs=1e-4)
    # ridges go from strong to weak; the path stopped at the first worse stage or at its end
    ridges = [stage["ridge"] for stage in path]
    assert ridges == sorted(ridges, reverse=True)
    assert path[-1]["val_nll"] > kept["val_nll"] or len(path) == len(model.ridge_path)


def test_a_map_checkpoint_reloads_to_the_same_scores_and_selection(tmp_path):
    data = SyntheticPopulationDataModule(**PLANTED, num_directions=3)
    model = BasisModule(map_settings=QUICK)
    trainer = tiny_trainer(20, limit_val_batches=1.0, check_val_every_n_epoch=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "map.ckpt")
    reloaded = BasisModule.load_from_checkpoint(tmp_path / "map.ckpt", weights_only=True)
    test = data.split("seen_test")
    assert torch.equal(reloaded(test.features, test.users), model(test.features, test.users))
    assert reloaded.selection == model.selection and reloaded.map_settings == QUICK
    assert torch.equal(reloaded.model.prior_mean, model.model.prior_mean)


def test_the_map_estimator_needs_validation_pairs_and_full_batches():
    from lore_pl import LoreDataError

    data = SyntheticPopulationDataModule(**{**PLANTED, "val_fraction": 0.0}, num_directions=3)
    with pytest.raises(LoreDataError, match="validation pairs, and .* has none: give it a val_fraction > 0"):
        tiny_trainer(1).fit(BasisModule(map_settings=QUICK), datamodule=data)
    batched = SyntheticPopulationDataModule(**PLANTED, num_directions=3, batch_size=100)
    with pytest.raises(ValueError, match="full-batch"):
        tiny_trainer(1).fit(BasisModule(map_settings=QUICK), datamodule=batched)


def test_the_prior_pulls_one_pair_to_the_population_and_lets_many_pairs_speak():
    # one user whose own best weights are far from the population's mean
    generator = torch.Generator().manual_seed(0)
    basis = torch.eye(3)
    population = torch.tensor([2.0, 0.0, 0.0])  # the population leans on column 0; this user on column 2
    user = torch.tensor([-2.0, -2.0, 3.0])
    settings = FewShotSettings(shots=None, steps=800, lr=0.1, weight_init="population", prior_strength=1.0)
    distances = {}
    for pairs in (1, 200):
        features = 2 * torch.randn(pairs, 3, generator=generator)
        labels = torch.sigmoid(features @ torch.softmax(user, 0)) > torch.rand(pairs, generator=generator)
        features = torch.where(labels[:, None], features, -features)  # chosen minus rejected
        users = torch.zeros(pairs, dtype=torch.long)
        projected = LF.project(features, basis)
        with_prior = torch.softmax(adapt_users(projected, users, 1, settings, 1.0, population)[0], 0)
        own = torch.softmax(fit_user_weights(projected, users, population[None], steps=800, lr=0.1, tau=1.0)[0], 0)
        prior = torch.softmax(population, 0)
        distances[pairs] = ((with_prior - prior).abs().sum() / (own - prior).abs().sum(), own)
    # the share of the way from the population's weights to the user's own fit, in L1
    assert distances[1][0] < 0.35  # one pair: near the population
    assert distances[200][0] > 0.8  # 200 pairs: near the user's own fit


def test_the_weight_covariance_is_a_covariance_and_shrinks_with_data():
    generator = torch.Generator().manual_seed(1)
    projected = torch.randn(400, 3, generator=generator)
    users = torch.cat([torch.zeros(4, dtype=torch.long), torch.ones(396, dtype=torch.long)])
    logits = torch.zeros(2, 3)
    covariance = weight_covariance(projected, users, logits, 1.0, torch.ones(3))
    for one in covariance:
        torch.testing.assert_close(one, one.t())
        assert torch.linalg.eigvalsh(one).min() > -1e-6
        torch.testing.assert_close(one.sum(1), torch.zeros(3), atol=1e-6, rtol=0)  # weights sum to 1: no spread along
    assert torch.trace(covariance[1]) < 0.2 * torch.trace(covariance[0])  # 396 pairs against 4
    # a very strong prior leaves (almost) nothing uncertain
    assert torch.trace(weight_covariance(projected, users, logits, 1.0, torch.full((3,), 1e6))[0]) < 1e-5


def test_personalize_uses_the_basis_prior_and_reports_uncertainty(tmp_path):
    from lore_pl import BasisFile, save_basis

    basis = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor([1.0, 0.0, -1.0])
    model = LoreModel(basis, mean.expand(4, 3), tau=1.0, user_ids=["a", "b", "c", "d"], prior_mean=mean,
                      prior_precision=torch.full((3,), 5.0), weight_covariance=torch.eye(3).expand(4, 3, 3) * 0.01,
                      train_basis=False, train_logits=False)
    save_basis(tmp_path / "basis.safetensors", BasisFile.from_model(model))
    reward = PersonalRewardModel.load(tmp_path / "basis.safetensors")
    chosen, rejected = 0.1 * torch.randn(1, 8), 0.1 * torch.randn(1, 8)
    one = reward.personalize("new", chosen, rejected)
    # one weak pair under the basis's prior: close to the population's mean weights
    assert (one - torch.softmax(mean, 0)).abs().sum() < 0.05
    unpulled = reward.personalize("unpulled", chosen, rejected, prior_strength=0.0)
    assert (unpulled - torch.softmax(mean, 0)).abs().sum() > 0.05
    spread = reward.score_std(torch.randn(5, 8), "new")
    assert spread is not None and spread.shape == (5,) and bool((spread > 0).all())
    assert reward.weight_covariance("new").shape == (3, 3)
    reward.save(tmp_path / "with-new.safetensors")
    again = PersonalRewardModel.load(tmp_path / "with-new.safetensors")
    torch.testing.assert_close(again.weights("new"), one)
    with pytest.raises(ValueError, match="non-finite value.*nothing was scored or stored"):
        reward.personalize("broken", torch.full((1, 8), float("nan")), rejected)
    assert "broken" not in reward.user_ids


def test_the_prior_is_chosen_on_the_unseen_users_validation_prompts(tiny_data):
    from callbacks.protocol import evaluate_protocol

    data = SyntheticPopulationDataModule(**TINY, val_fraction=0.3)
    data.setup("fit")
    model = LoreModel(data.true_directions, torch.zeros(data.num_users, 3), tau=1.0, prior_mean=torch.zeros(3),
                      train_basis=False, train_logits=False)
    results = evaluate_protocol(model, data, FewShotSettings(shots=4, steps=100))
    assert results["fewshot_prior"].startswith(("isotropic", "empirical"))
    fixed = evaluate_protocol(model, data, FewShotSettings(shots=4, steps=100, prior_strength=0.0))
    assert "fewshot_prior" not in fixed


# ------------------------------------------------------------------ real shapes (issue 21)
def test_a_grid_whose_best_value_is_on_its_edge_goes_on_past_it():
    assert E.past_edge((100.0, 10.0, 1.0), 100.0) == pytest.approx(1000.0)
    assert E.past_edge((100.0, 10.0, 1.0), 1.0) == pytest.approx(0.1)
    assert E.past_edge((100.0, 10.0, 1.0), 10.0) is None  # inside
    assert E.past_edge((1.0, 10.0), 10.0) is None  # two values: both edges, no inside to judge by
    assert E.next_rank((1, 2, 3, 5, 8), 8, limit=16) == 12 and E.next_rank((1, 2, 3, 5, 8, 12), 12, limit=16) == 16
    assert E.next_rank((1, 2, 3, 5, 8), 5, limit=16) is None and E.next_rank((1, 8), 8, limit=8) is None


def test_the_rank_grid_is_extended_while_its_largest_k_is_the_best():
    data = SyntheticPopulationDataModule(**PLANTED, num_directions=5)
    data.setup("fit")
    train, val = data.split("seen_train"), data.split("seen_val")
    settings = E.MapSettings(ranks=(1, 2), subspace=8, projected_iterations=100, start_ridges=(10.0, 1.0, 0.1))
    selection = E.select_model(train.features, train.users, val.features, val.users, train.num_users, settings)
    tried = sorted({c.rank for c in selection.curve})
    assert tried[:3] == [1, 2, 3] and selection.best.rank >= 3  # 2 was the edge: 3 was tried and won
    assert any(line.startswith("ranks: K=3") for line in selection.extended)
    fixed = E.select_model(train.features, train.users, val.features, val.users, train.num_users, settings,
                           extend_ranks=False)
    assert {c.rank for c in fixed.curve} == {1, 2}


def unequal_population(seed: int = 0) -> SyntheticPopulationDataModule:
    """Half the seen users with 40 training pairs, half cut to 2 (before the validation hold-out)."""

    class Unequal(SyntheticPopulationDataModule):
        def load(self):
            data = super().load()
            train = data.splits["seen_train"]
            order = torch.arange(len(train)) - torch.searchsorted(train.users, train.users)
            data.splits["seen_train"] = train.subset(torch.nonzero((train.users % 2 == 0) | (order < 2))[:, 0])
            return data

    options = {**PLANTED, "dim": 64, "num_seen_users": 300, "train_prompts_per_user": 40}
    data = Unequal(**options, num_directions=3, seed=seed)
    data.setup("fit")
    return data


def test_users_with_unequal_amounts_of_data_do_not_hide_the_directions():
    data = unequal_population()
    train = data.split("seen_train")
    subspace = E.spectral_subspace(train.features, train.users, train.num_users, 8)
    truth, _ = torch.linalg.qr(data.true_directions)
    cosines = torch.linalg.svdvals(truth.t() @ subspace)
    assert float(cosines.min()) > 0.8  # every true direction is in the subspace the selection runs in
    model = BasisModule(map_settings=QUICK)
    tiny_trainer(20, limit_val_batches=1.0, check_val_every_n_epoch=1).fit(model, datamodule=data)
    assert model.model.rank > 1 and int(model.model.active_columns.sum()) > 1


def test_forced_rank_on_two_directions_keeps_two_distinct_columns():
    model, _ = fitted(2, rank=2, prune_threshold=0.0)
    columns = torch.nn.functional.normalize(model.model.basis.detach(), dim=0)
    assert float(columns[:, 0] @ columns[:, 1]) < 0.9
    weights = model.model.user_weights()
    assert float(weights.max(1).values.mean()) < 0.999  # not every user one-hot on one column
    assert model.model.head_spread() > 0.1


def test_a_forced_rank_that_ends_up_one_shared_direction_says_so():
    with pytest.warns(LoreDataWarning, match=r"rank K=3 \(forced\) .*(kept 1 column|is the same)"):
        model, _ = fitted(1, rank=3)
    assert int(model.model.active_columns.sum()) == 1 or model.model.head_spread() < 1e-3


# ------------------------------------------------------------------ selection's fast path (issue 22)
def _projected_problem(seed: int = 0, rank: int = 3, users: int = 12, pairs: int = 40):
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(pairs, 6, generator=generator, dtype=torch.float64)
    users_of = torch.randint(0, users, (pairs,), generator=generator)
    state = E.random_state(6, rank, users, generator)
    if state.mean is not None:
        state.mean.normal_(generator=generator)
    return projected, users_of, users, state


@pytest.mark.parametrize("rank, strengths", [(1, E.Strengths(2.0, 1.0, 0.0)), (3, E.Strengths(0.5, 1.0, 2.0)),
                                             (3, E.Strengths(0.5, 10.0, 0.3))])
def test_the_projected_objective_and_its_gradient_by_hand_are_map_loss_and_autograd(rank, strengths):
    from lore_pl.core.projected_fit import UserPairs, map_objective

    projected, users, num_users, state = _projected_problem(rank=rank)
    pairs = UserPairs.from_flat(projected, users, num_users)
    loss, *grads = map_objective(pairs, state.basis, state.logits, state.mean, strengths.ridge,
                                 strengths.deviation_ratio, strengths.prior)
    parameters = [None if t is None else t.clone().requires_grad_() for t in (state.basis, state.logits, state.mean)]
    expected, _, _ = E.map_loss(projected, users, num_users, E.MapState(*parameters), strengths)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-12)
    for grad, parameter in zip(grads, parameters):
        if parameter is None:
            assert grad is None
        else:
            torch.testing.assert_close(grad, parameter.grad, rtol=1e-10, atol=1e-13)


def test_fit_projected_follows_fit_map():
    from lore_pl.core.projected_fit import UserPairs

    projected, users, num_users, state = _projected_problem(seed=1)
    strengths = E.Strengths(1.0, 10.0, 1.0)
    slow = E.fit_map(projected, users, num_users, state, strengths, 15)
    fast = E.fit_projected(UserPairs.from_flat(projected, users, num_users), state, strengths, 15)
    for a, b in zip((slow.basis, slow.logits, slow.mean), (fast.basis, fast.logits, fast.mean)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert not torch.equal(fast.basis, state.basis)  # it moved, and the start is untouched


def test_the_fast_selection_chooses_the_reference_evaluations_candidate():
    data = SyntheticPopulationDataModule(**PLANTED, num_directions=3, seed=0)
    data.setup("fit")
    train, val = data.split("seen_train"), data.split("seen_val")
    settings = E.MapSettings(ranks=(1, 2, 3, 5), subspace=8, projected_iterations=60)
    chosen = []
    for fast in (True, False):
        selection = E.select_model(train.features, train.users, val.features, val.users, train.num_users, settings,
                                   fast=fast)
        chosen.append((selection.best, [(c.rank, c.strengths) for c in selection.curve]))
    (fast_best, fast_curve), (slow_best, slow_curve) = chosen
    assert fast_curve == slow_curve  # the same candidates tried, in the same order
    assert (fast_best.rank, fast_best.strengths) == (slow_best.rank, slow_best.strengths) and fast_best.rank == 3
    assert fast_best.val_nll == pytest.approx(slow_best.val_nll, abs=1e-5)


def _candidate(nll: list[float], ridge: float) -> E.Candidate:
    pair_nll = torch.tensor(nll, dtype=torch.float64)
    state = E.MapState(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2))
    return E.Candidate(2, E.Strengths(ridge, 1.0, 1.0), float(pair_nll.mean()), 0.5, state, pair_nll)


def test_the_strength_grid_moves_only_for_a_clear_win():
    settings = E.MapSettings(ridges=(1.0, 0.1), deviation_ratios=(1.0,), priors=(1.0,))
    chosen = _candidate([0.5, 0.6, 0.7, 0.8], ridge=10.0)
    tried = []

    def fit(rank, strengths, start, nll):
        tried.append(strengths)
        return _candidate(nll, strengths.ridge)

    noise = [0.5 - 1e-6, 0.6 + 2e-6, 0.7 - 1e-6, 0.8 - 1e-6]  # lower mean, but within its standard error
    assert E._strength_grid(chosen, settings, lambda *a: fit(*a, noise)) is chosen
    clear = [0.4, 0.5, 0.6, 0.7]
    best = E._strength_grid(chosen, settings, lambda *a: fit(*a, clear))
    assert best.strengths.ridge == pytest.approx(1.0) and tried[-1].ridge == pytest.approx(1.0)


def test_threads_for_runs_small_loops_on_one_thread_and_restores_the_count():
    from lore_pl.core.threads import SMALL_OPS, small_ops, threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for(SMALL_OPS - 1) as count:
            assert count == 1 == torch.get_num_threads()
        assert torch.get_num_threads() == 2
        with threads_for(SMALL_OPS) as count:
            assert count == 2 == torch.get_num_threads()
        with pytest.raises(RuntimeError, match="inside"), threads_for(10):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        assert small_ops(10) and not small_ops(10, "meta") and not small_ops(SMALL_OPS)
    finally:
        torch.set_num_threads(before)


def test_many_users_are_selected_on_a_sample_and_the_choice_is_refitted_on_every_user():
    data = SyntheticPopulationDataModule(**PLANTED, num_directions=3, seed=0)
    data.setup("fit")
    train, val = data.split("seen_train"), data.split("seen_val")
    settings = E.MapSettings(ranks=(1, 2, 3, 5), subspace=8, projected_iterations=60, selection_users=80)
    selection = E.select_model(train.features, train.users, val.features, val.users, train.num_users, settings)
    best = selection.best
    assert best.rank == 3 and best.state.logits.shape == (train.num_users, 3)
    assert len(selection.notes) == 1 and "chosen on 80 of 150 users" in selection.notes[0]
    # the reported scores are the refitted model's on the whole validation split
    nll, accuracy = E.evaluate(val.features, val.users, train.num_users, best.state)
    assert best.val_nll == pytest.approx(nll, abs=1e-4) and best.val_acc == pytest.approx(accuracy, abs=1e-3)
    assert best.pair_nll.numel() == val.users.numel()
    assert E.sampled_users(150, 80, 0).tolist() == sorted(set(E.sampled_users(150, 80, 0).tolist()))
    with pytest.raises(ValueError, match="selection_users"):
        E.MapSettings(selection_users=1)


def test_minimize_lbfgs_takes_torchs_lbfgs_steps_past_a_full_history():
    from lore_pl.core.projected_fit import minimize_lbfgs

    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    target = torch.randn(12, generator=generator, dtype=torch.float64)

    def loss_of(x):  # smooth, not quadratic: the line search has work to do
        return (matrix @ x - target).pow(2).sum() + torch.nn.functional.softplus(x).pow(3).sum()

    def objective(x):
        x = x.clone().requires_grad_()
        loss = loss_of(x)
        loss.backward()
        return float(loss), x.grad

    start = torch.zeros(12, dtype=torch.float64)
    ours = minimize_lbfgs(objective, start, 25, history_size=4)
    x = start.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=25, history_size=4, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = loss_of(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(ours, x.detach(), rtol=1e-7, atol=1e-9)
    assert float(loss_of(ours)) < float(loss_of(start)) and torch.equal(start, torch.zeros(12, dtype=torch.float64))
