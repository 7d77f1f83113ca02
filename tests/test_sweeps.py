import json

import pytest
import torch

from helpers import ROOT, TINY_DATA
from lore_pl import FewShotSettings
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import fit_user_weights, per_fit_accuracy, stack_shots
from lore_pl.experiments.sweeps import active_sweep, held_out_prior, shots_sweep, shots_to_match


@pytest.fixture
def basis(tiny_data):
    return tiny_data.true_directions.clone()


def test_stacking_gives_every_fit_its_own_subsample(tiny_data):
    pool = tiny_data.split("unseen_pool")
    stacked = stack_shots(LF.project(pool.features, torch.eye(pool.dim)), pool.users, pool.num_users, [1, 3], 2,
                          torch.Generator().manual_seed(0))
    counts = torch.bincount(stacked.users, minlength=4 * pool.num_users).reshape(4, pool.num_users)
    assert torch.all(counts == torch.tensor([1, 1, 3, 3])[:, None])
    assert stacked.num_fits == 4


def test_the_batched_sweep_equals_each_fit_alone(tiny_data, basis):
    pool = tiny_data.split("unseen_pool")
    stacked = stack_shots(LF.project(pool.features, basis), pool.users, pool.num_users, [2, 5], 3,
                          torch.Generator().manual_seed(1))
    init = torch.randn(stacked.num_fits * pool.num_users, basis.shape[1])
    prior = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    together = fit_user_weights(stacked.projected, stacked.users, init, steps=60, lr=0.1, tau=1.0,
                                prior_logits=prior, prior_strength=0.5)
    for virtual in (0, 7, stacked.num_fits * pool.num_users - 1):  # first, middle, last (trial, shots, user)
        rows = stacked.users == virtual
        alone = fit_user_weights(stacked.projected[rows], torch.zeros(int(rows.sum()), dtype=torch.long),
                                 init[virtual:virtual + 1], steps=60, lr=0.1, tau=1.0,
                                 prior_logits=prior, prior_strength=0.5)
        torch.testing.assert_close(together[virtual], alone[0], rtol=1e-5, atol=1e-6)


def test_prior_at_strength_zero_is_the_plain_fit(tiny_data, basis):
    pool = tiny_data.split("unseen_pool")
    projected = LF.project(pool.features, basis)
    init = torch.randn(pool.num_users, 3)
    plain = fit_user_weights(projected, pool.users, init, steps=30, tau=1.0)
    zero = fit_user_weights(projected, pool.users, init, steps=30, tau=1.0, prior_logits=torch.zeros(3),
                            prior_strength=0.0)
    strong = fit_user_weights(projected, pool.users, init, steps=30, tau=1.0, prior_logits=torch.zeros(3),
                              prior_strength=1e4)
    assert torch.equal(plain, zero)
    assert (strong - strong.mean(1, keepdim=True)).abs().max() < (plain - plain.mean(1, keepdim=True)).abs().max()


def test_per_fit_accuracy_by_hand():
    projected_test = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    users = torch.tensor([0, 0, 1])
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],   # fit 0: user0 1/2 right, user1 wrong -> 0.25
                            [[0.5, 0.5], [1.0, 0.0]]])  # fit 1: user0 2/2, user1 right (0 logit: no) -> 1.0
    assert per_fit_accuracy(projected_test, users, weights, tau=1.0).tolist() == [0.25, 1.0]


def test_more_shots_help_and_the_prior_choice_is_from_the_grid(tiny_data, basis):
    pool, test = tiny_data.split("unseen_pool"), tiny_data.split("unseen_test")
    accuracy = shots_sweep(basis, 1.0, pool, test, [1, 8], trials=4,
                           settings=FewShotSettings(steps=100, weight_init="randn", prior_strength=0.0))
    assert accuracy.shape == (2, 4)
    assert accuracy[1].mean() > accuracy[0].mean()
    from lore_pl.core.fewshot import ISOTROPIC_PRIORS

    prior = LF.population_logits(tiny_data.true_weights["seen"])
    precision, label = held_out_prior(basis, 1.0, pool, tiny_data.split("unseen_val"), prior, None, 2,
                                      FewShotSettings(steps=50))
    assert label.startswith("isotropic") and any(abs(float(precision[0]) - s) < 1e-6 for s in ISOTROPIC_PRIORS)


def test_shots_to_match_by_hand():
    shots = [1, 2, 5, 10]
    random = [0.6, 0.7, 0.8, 0.9]
    active = [0.7, 0.85, 0.88, 0.95]
    assert shots_to_match(active, random, shots) == {"1": 1, "2": 1, "5": 2, "10": 10}
    assert shots_to_match([0.5] * 4, random, shots)["10"] is None


def test_active_selection_on_the_planted_population_beats_its_first_pairs(tiny_data, basis):
    pool, test = tiny_data.split("unseen_pool"), tiny_data.split("unseen_test")
    prior = LF.population_logits(tiny_data.true_weights["seen"])
    settings = FewShotSettings(steps=100, prior_strength=1.0)
    curve = active_sweep(basis, 1.0, pool, test, [1, 6], "information", settings, prior,
                         covariance_precision=torch.ones(3))
    assert curve.shape == (2,) and curve[1] > curve[0]
    with pytest.raises(ValueError, match="unknown selection"):
        active_sweep(basis, 1.0, pool, test, [1], "best", settings, prior)


@pytest.mark.slow
def test_sweep_commands_write_their_outputs(tiny_data, tmp_path):
    from lore_pl import BasisFile, save_basis
    from lore_pl.experiments.sweeps import main

    save_basis(tmp_path / "basis.safetensors",
               BasisFile(tiny_data.true_directions, 1.0, tiny_data.reference_head, tiny_data.seen_user_ids,
                         tiny_data.true_weights["seen"]))
    main(["shots", "--config", str(ROOT / "configs/sweep/shots.yaml"), f"--basis_path={tmp_path / 'basis.safetensors'}",
          "--shots=[1, 4]", "--trials=2", "--fewshot.steps=30", "--methods=[reference, population, map, average]",
          "--selection=[random, information]", "--loop_sample=2", f"--out_dir={tmp_path / 'shots'}", *TINY_DATA])
    results = json.loads((tmp_path / "shots" / "results.json").read_text())
    assert set(results["methods"]) == {"reference", "population", "map", "average"}
    assert results["selection"] == ["random", "information"] and "selection" not in results["methods"]["average"]
    assert len(results["methods"]["map"]["selection"]["information"]["mean"]) == 2
    assert "map_information_mean" in (tmp_path / "shots" / "results.csv").read_text().splitlines()[0]
    average = results["methods"]["average"]["mean"]
    assert average[0] == average[1]  # no fit: the same whatever the shots
    assert len(results["methods"]["map"]["mean"]) == 2 and results["methods"]["reference"]["speedup"] > 0
    assert (tmp_path / "shots" / "results.png").stat().st_size > 0
    assert (tmp_path / "shots" / "results.csv").read_text().startswith("shots,reference_mean")
    assert list((tmp_path / "shots").glob("events.out.tfevents.*"))

    main(["rank", "--config", str(ROOT / "configs/sweep/rank.yaml"), "--ranks=[0, 2]",
          f"--overrides=[{', '.join(TINY_DATA)}, --trainer.max_epochs=5]", f"--out_dir={tmp_path / 'rank'}"])
    results = json.loads((tmp_path / "rank" / "results.json").read_text())
    assert results["labels"] == ["ref", "2"]
    k2, reference = results["results"]["2"]["unseen/test_acc"], results["results"]["0"]["unseen/test_acc"]
    assert k2 >= 0.8 and reference >= 0.8  # the planted population: V_ref is its mean direction
    assert (tmp_path / "rank" / "results.csv").read_text().splitlines()[1].startswith("ref,")


def test_the_rank_sweep_honours_an_experiment_given_to_config():
    from lore_pl.experiments.sweeps import _experiment_as_config

    experiment = str(ROOT / "configs/experiment/tulu1.yaml")
    assert _experiment_as_config(["rank", "--config", experiment]) == ["rank", "--experiment", experiment]
    sweep = str(ROOT / "configs/sweep/rank.yaml")  # the sweep's own settings stay a --config
    assert _experiment_as_config(["rank", "--config", sweep]) == ["rank", "--config", sweep]
    assert _experiment_as_config(["shots", "--config", experiment]) == ["shots", "--config", experiment]
