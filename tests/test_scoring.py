import subprocess
import sys
import time

import pytest
import torch

from lore_pl import BasisFile, PersonalRewardModel, save_basis
from lore_pl.core import fewshot as FS
from lore_pl.core import functional as LF


@pytest.fixture
def model(tmp_path):
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 3, generator=generator)
    weights = torch.softmax(torch.randn(4, 3, generator=generator), dim=1)
    path = tmp_path / "basis.safetensors"
    save_basis(path, BasisFile(basis, 10.0, torch.randn(8, generator=generator), ["a", "b", "c", "d"], weights,
                               embedder="tiny-encoder@rev1"))
    return PersonalRewardModel.load(path), basis, weights, path


def test_the_exported_file_reloads_to_identical_scores(model, tmp_path):
    loaded, basis, weights, _ = model
    embeddings = torch.randn(5, 8)
    expected = embeddings @ (basis @ weights[2])  # the personal head V w_u, then every response
    assert torch.equal(loaded.score(embeddings, "c"), expected)
    loaded.save(tmp_path / "again.safetensors")
    again = PersonalRewardModel.load(tmp_path / "again.safetensors")
    assert torch.equal(again.score(embeddings, "c"), expected)
    assert again.embedder == "tiny-encoder@rev1" and again.tau == 10.0 and again.user_ids == ["a", "b", "c", "d"]


def test_ranking_agrees_with_the_scores(model):
    loaded, *_ = model
    candidates = torch.randn(20, 8)
    for user in loaded.user_ids:
        order = loaded.rank(candidates, user)
        scores = loaded.score(candidates, user)
        assert torch.all(scores[order][:-1] >= scores[order][1:])
        assert order[0] == torch.argmax(scores)


def test_preference_probability(model):
    loaded, basis, weights, _ = model
    chosen, rejected = torch.randn(3, 8), torch.randn(3, 8)
    expected = torch.sigmoid((chosen - rejected) @ basis @ weights[0] / 10.0)
    torch.testing.assert_close(loaded.preference_probability(chosen, rejected, "a"), expected)


def test_personalize_a_new_user_matches_the_batched_fit_and_is_fast(model):
    loaded, basis, weights, _ = model
    chosen, rejected = torch.randn(6, 8), torch.randn(6, 8)
    start = time.perf_counter()
    w = loaded.personalize("new", chosen, rejected, steps=500)
    elapsed = time.perf_counter() - start
    prior = LF.population_logits(weights)
    expected = FS.fit_user_weights(LF.project(chosen - rejected, basis), torch.zeros(6, dtype=torch.long),
                                   prior[None].clone(), steps=500, tau=10.0)
    torch.testing.assert_close(w, torch.softmax(expected[0], dim=0))
    assert loaded.user_ids[-1] == "new" and torch.equal(loaded.weights("new"), w)
    assert elapsed < 5.0  # generous bound for a loaded CI machine; the README quotes the real figure
    w_again = loaded.personalize("new", chosen, rejected, steps=10)  # refit replaces, does not append
    assert loaded.user_ids.count("new") == 1 and torch.equal(loaded.weights("new"), w_again)


def test_bad_input(model):
    loaded, *_ = model
    with pytest.raises(KeyError, match="unknown user 'zed'"):
        loaded.score(torch.randn(8), "zed")
    with pytest.raises(ValueError, match="d=7, the basis has d=8"):
        loaded.score(torch.randn(2, 7), "a")


def test_scoring_needs_no_lightning():
    code = "import sys, lore_pl.inference; sys.exit(1 if 'lightning' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused_at_every_entry_point_and_nothing_changes(model, tmp_path, bad):
    loaded, *_ = model
    before_ids, before_weights = list(loaded.user_ids), loaded.user_weights.clone()
    poisoned = torch.randn(4, 8)
    poisoned[2, 5] = bad
    fine = torch.randn(4, 8)
    calls = {
        "score": lambda: loaded.score(poisoned, "a"),
        "rank": lambda: loaded.rank(poisoned, "a"),
        "preference_probability": lambda: loaded.preference_probability(fine, poisoned, "a"),
        "score_std": lambda: loaded.score_std(poisoned, "a"),
        "personalize a new user": lambda: loaded.personalize("new", poisoned, fine),
        "personalize a known user": lambda: loaded.personalize("b", fine, poisoned),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="non-finite value.* at row 2") as error:
            call()
        assert "nothing was scored or stored" in str(error.value), name
    assert loaded.user_ids == before_ids and torch.equal(loaded.user_weights, before_weights)
    huge = torch.full((1, 8), 3e38)
    with pytest.raises(ValueError, match="overflow; nothing was stored"):
        loaded.personalize("new", huge, -huge)
    assert loaded.user_ids == before_ids


def test_a_basis_file_with_nan_is_refused_on_load(tmp_path):
    from safetensors.torch import save_file

    weights = torch.full((2, 3), 1 / 3)
    weights[1, 0] = float("nan")
    poisoned = BasisFile(torch.randn(8, 3), 1.0, None, ["a", "b"], weights)
    with pytest.raises(ValueError, match="refusing to write .*poisoned.safetensors: field 'user_weights': holds NaN"):
        save_basis(tmp_path / "poisoned.safetensors", poisoned)  # save_basis writes no such file
    assert not (tmp_path / "poisoned.safetensors").exists()
    save_file({"basis": poisoned.basis, "user_weights": weights}, str(tmp_path / "poisoned.safetensors"),
              metadata={"format": "lore-pl-basis/1", "tau": "1.0", "user_ids": '["a", "b"]'})
    with pytest.raises(ValueError, match="poisoned.safetensors: field 'user_weights': holds NaN or Inf"):
        PersonalRewardModel.load(tmp_path / "poisoned.safetensors")
