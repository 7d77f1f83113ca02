"""Bad arguments to ``PersonalRewardModel`` and the ``users`` option of ``lightning predict``: a clear
error naming the argument, nothing stored (issue 18: user ids, overflowing scores, ``exclude``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lore_pl import BasisFile, PersonalRewardModel, save_basis
from lore_pl.errors import LoreDataError
from lore_pl.modules.scoring import ScoringModule

DIM = 8


@pytest.fixture
def model():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 3, generator=generator).softmax(-1)
    return PersonalRewardModel(BasisFile(torch.randn(DIM, 3, generator=generator), 2.0, None, ["a", "b", "c"],
                                         weights, prior_precision=torch.ones(3)))


def state(model):
    return list(model.user_ids), model.user_weights.clone(), dict(model._answers)


BAD_USERS = [None, 7, "", "   ", ["a"], b"a", 1.5]


@pytest.mark.parametrize("user", BAD_USERS, ids=[repr(user) for user in BAD_USERS])
def test_a_user_that_is_not_a_non_empty_string_is_refused_everywhere_and_nothing_is_stored(model, tmp_path, user):
    before = state(model)
    embeddings = torch.randn(3, DIM)
    pair = torch.randn(2, DIM)
    calls = {
        "score": lambda: model.score(embeddings, user),
        "rank": lambda: model.rank(embeddings, user),
        "preference_probability": lambda: model.preference_probability(embeddings, embeddings.flip(0), user),
        "score_std": lambda: model.score_std(embeddings, user),
        "weights": lambda: model.weights(user),
        "weight_covariance": lambda: model.weight_covariance(user),
        "personalize": lambda: model.personalize(user, embeddings, embeddings.flip(0)),
        "personalize_text": lambda: model.personalize_text(user, [("a prompt", "yes", "no")]),
        "observe": lambda: model.observe(user, pair, 0),
        "next_pair": lambda: model.next_pair(user, pair[None]),
        "answers": lambda: model.answers(user),
        "score_text": lambda: model.score_text("a prompt", ["yes"], user),
        "rank_text": lambda: model.rank_text("a prompt", ["yes", "no"], user),
        "preference_probability_text": lambda: model.preference_probability_text("a prompt", "yes", "no", user),
    }
    for name, call in calls.items():
        with pytest.raises(LoreDataError, match=rf"^{name}: argument 'user' must be a non-empty string \(a user id\)"):
            call()
            pytest.fail(f"{name} accepted the user {user!r}")
    after = state(model)
    assert after[0] == before[0] and torch.equal(after[1], before[1]) and after[2] == before[2]
    model.save(tmp_path / "kept.safetensors")  # the saved file holds the three good users only
    assert PersonalRewardModel.load(tmp_path / "kept.safetensors").user_ids == ["a", "b", "c"]


def test_scores_that_overflow_float32_are_refused_not_nan(model):
    huge = torch.full((2, DIM), 3e38)  # finite, but e . V w is not
    for name, call in {"score": lambda: model.score(huge, "a"), "rank": lambda: model.rank(huge, "a"),
                       "preference_probability": lambda: model.preference_probability(huge, -huge, "a")}.items():
        with pytest.raises(LoreDataError, match=r"score\('a'\): 2 of the rewards overflow float32 .* the basis "
                                                r"\(in memory\) \(tau=2\) is too large; nothing was scored"):
            call()
            pytest.fail(name)
    before = state(model)
    with pytest.raises(LoreDataError, match=r"personalize\('new'\): .*overflow float32"):
        model.personalize("new", torch.full((1, DIM), 1e38), torch.full((1, DIM), -1e38))
    with pytest.raises(LoreDataError, match=r"next_pair\('new'\): .*overflow float32"):
        model.next_pair("new", torch.stack([torch.full((2, DIM), 1e38), torch.full((2, DIM), -1e38)], dim=1))
    assert state(model)[0] == before[0] and "new" not in model._answers
    assert torch.isfinite(model.score(torch.full((2, DIM), 1e30), "a")).all()  # large but representable is fine


def test_a_tiny_tau_from_a_file_is_refused_and_a_small_one_never_stores_nan(tmp_path):
    weights = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(LoreDataError, match=r"field 'tau': must be a finite number"):
        PersonalRewardModel(BasisFile(torch.randn(DIM, 2), 1e-45, None, ["a", "b"], weights))
    model = PersonalRewardModel(BasisFile(torch.randn(DIM, 2), 1e-30, None, ["a", "b"], weights),
                                source="tiny-tau.safetensors")
    with pytest.raises(LoreDataError, match=r"personalize\('new'\): a pair's logit .* reaches .*e\+30, beyond "
                                            r"1.84e\+19 .* tiny-tau.safetensors \(tau=1e-30\).*nothing was stored"):
        model.personalize("new", torch.randn(4, DIM), torch.randn(4, DIM), steps=50)
    assert model.user_ids == ["a", "b"] and torch.isfinite(model.user_weights).all()
    small = PersonalRewardModel(BasisFile(torch.randn(DIM, 2), 1e-6, None, ["a", "b"], weights))
    assert torch.isfinite(small.personalize("new", torch.randn(4, DIM), torch.randn(4, DIM), steps=50)).all()
    small.save(tmp_path / "saved.safetensors")
    assert torch.isfinite(PersonalRewardModel.load(tmp_path / "saved.safetensors").user_weights).all()


EXCLUDES = [([1.5], r"exclude\[0\] must be an integer position, got 1\.5"),
            ([0, True], r"exclude\[1\] must be an integer position, got True"),
            (["2"], r"exclude\[0\] must be an integer position, got '2'"),
            ([[0]], r"exclude\[0\] must be an integer position"),
            ([torch.tensor(1.0)], r"exclude\[0\] must be an integer position"),
            ([4], r"exclude\[0\] is 4, outside the pool of 4 pairs \(positions -4 to 3\)"),
            ([0, -5], r"exclude\[1\] is -5, outside the pool of 4 pairs"),
            (3, r"exclude must be a list of integer positions, got 3"),
            ("01", r"exclude must be a list of integer positions, got '01'")]


@pytest.mark.parametrize(("exclude", "message"), EXCLUDES, ids=[repr(case[0]) for case in EXCLUDES])
def test_next_pair_exclude_holds_integer_positions_in_the_pool(model, exclude, message):
    pool = torch.randn(4, 2, DIM, generator=torch.Generator().manual_seed(3))
    with pytest.raises(LoreDataError, match=r"^next_pair\('a'\): " + message):
        model.next_pair("a", pool, exclude=exclude)


def test_next_pair_exclude_takes_any_integer_kind(model):
    pool = torch.randn(4, 2, DIM, generator=torch.Generator().manual_seed(3))
    for exclude in ([np.int64(0), 1, -1], torch.tensor([0, 1, 3]), (torch.tensor(0), torch.tensor(1), 3)):
        assert model.next_pair("a", pool, exclude=exclude) == 2


def test_the_users_option_of_predict_holds_known_user_ids(tmp_path):
    path = save_basis(tmp_path / "basis.safetensors",
                      BasisFile(torch.randn(DIM, 2), 1.0, None, ["a", "b"], torch.tensor([[0.5, 0.5], [0.1, 0.9]])))
    for users, message in ((["nobody"], r"users: unknown user\(s\) \['nobody'\]: not among the 2 users of .*basis"),
                           ([""], r"users\[0\] must be a non-empty string"),
                           (["a", 7], r"users\[1\] must be a non-empty string .*got 7"),
                           ("ab", r"users must be a list of user ids .*got 'ab'")):
        with pytest.raises(LoreDataError, match=message):
            ScoringModule(str(path), users=users).setup("predict")
    module = ScoringModule(str(path), users=["b"])
    module.setup("predict")
    assert module.user_ids == ["b"]


def test_a_user_fitted_on_a_basis_without_covariances_has_a_score_std(model):
    """The fixture's basis keeps no covariance for its own users; a user fitted here gets theirs."""
    assert model.model.weight_covariance is None and model.score_std(torch.randn(2, DIM), "a") is None
    generator = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(4, DIM, generator=generator), torch.randn(4, DIM, generator=generator)
    model.personalize("new", chosen, rejected)
    spread = model.score_std(torch.randn(5, DIM, generator=generator), "new")
    assert spread is not None and spread.shape == (5,) and bool((spread > 0).all())
    # twenty times the pairs narrow it on average (the fitted point moves too, so not on every probe)
    model.personalize("more", chosen.repeat(20, 1), rejected.repeat(20, 1))
    probe = torch.randn(64, DIM, generator=generator)
    assert float(model.score_std(probe, "more").mean()) < float(model.score_std(probe, "new").mean())


def test_personalizing_on_a_one_column_basis_says_why_nothing_changes():
    one = PersonalRewardModel(BasisFile(torch.randn(DIM, 1, generator=torch.Generator().manual_seed(0)), 1.0))
    with pytest.warns(UserWarning, match=r"one column \(K=1\).*weights are \[1.0\]"):
        weights = one.personalize("new", torch.randn(3, DIM), torch.randn(3, DIM))
    assert weights.tolist() == [1.0]
    # its uncertainty holds: the weights are known exactly, so the rewards' std is 0
    assert torch.equal(one.score_std(torch.randn(4, DIM), "new"), torch.zeros(4))


BAD_USER_LISTS = [("a", r"argument 'users' must be a list of user ids, got 'a'"),
                  (None, r"argument 'users' must be a list of user ids, got None"),
                  (["a", 7], r"argument 'users\[1\]' must be a non-empty string"),
                  (["a", " "], r"argument 'users\[1\]' must be a non-empty string")]


@pytest.mark.parametrize(("users", "message"), BAD_USER_LISTS, ids=[repr(case[0]) for case in BAD_USER_LISTS])
def test_score_users_and_heads_hold_a_list_of_user_ids(model, users, message):
    before = state(model)
    for name, call in {"score_users": lambda: model.score_users(torch.randn(3, DIM), users),
                       "heads": lambda: model.heads(users)}.items():
        with pytest.raises(LoreDataError, match=rf"^{name}: {message}"):
            call()
    with pytest.raises(KeyError, match="unknown user 'zed'"):
        model.score_users(torch.randn(3, DIM), ["a", "zed"])
    after = state(model)
    assert after[0] == before[0] and torch.equal(after[1], before[1])


def test_score_users_refuses_rewards_that_overflow_float32(model):
    with pytest.raises(LoreDataError, match=r"score_users\(2 users\): 4 of the rewards overflow float32"):
        model.score_users(torch.full((2, DIM), 3e38), ["a", "b"])


def test_top_k_holds_a_whole_number(model):
    for k in (-1, 1.5, True, "2"):
        with pytest.raises(LoreDataError, match=r"^top_k\('a'\): argument 'k' must be a whole number >= 0"):
            model.top_k(torch.randn(3, DIM), "a", k)
