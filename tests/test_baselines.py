"""The skeptic's baselines (the longer response wins, the crowd's win-rate) and the diagnosis of personal
signal: by hand on constructed pairs, and on planted populations through the protocol."""

import pytest
import torch

from datamodules.base import PreferenceData, PreferenceDataModule
from lore_pl.core.baselines import (
    crowd_coverage,
    crowd_logits,
    longer_wins_logits,
    pair_agreement,
    personal_crowd_logits,
)
from lore_pl.core.diagnosis import diagnose, format_diagnosis, verdict
from lore_pl.core.stats import per_user_accuracy
from lore_pl.data.preferences import PreferenceSplit
from lore_pl.errors import LoreDataError

# (0 beat 1), (0 beat 2), (1 beat 2), (2 beat 0): Laplace win-rates 3/5, 2/4, 2/5; response 3 never judged
TRAIN = torch.tensor([[0, 1], [0, 2], [1, 2], [2, 0]])


# ----------------------------------------------------------------------------------- by hand
def test_the_longer_response_wins_and_ties_count_half():
    lengths = torch.tensor([[10.0, 5.0], [3.0, 8.0], [4.0, 4.0], [7.0, 2.0]])
    logits = longer_wins_logits(lengths)
    assert logits.tolist() == [1.0, -1.0, 0.0, 1.0]
    accuracy = per_user_accuracy(logits, torch.tensor([0, 0, 1, 1]), 2, tie_credit=0.5)
    assert accuracy.tolist() == [0.5, 0.75]
    with pytest.raises(LoreDataError, match="row 1 is not finite"):
        longer_wins_logits(torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]))


def test_the_crowd_compares_laplace_smoothed_win_rates_and_unseen_responses_are_coin_flips():
    test = torch.tensor([[0, 2], [2, 0], [3, 4], [1, 3], [0, 3]])
    logits = crowd_logits(TRAIN, test)
    torch.testing.assert_close(logits, torch.tensor([0.2, -0.2, 0.0, 0.0, 0.1], dtype=torch.float64))
    # right, wrong, coin flip (both unseen), coin flip (0.5 against unseen 0.5), right
    accuracy = per_user_accuracy(logits, torch.zeros(5, dtype=torch.long), 1, tie_credit=0.5)
    assert accuracy.item() == pytest.approx(3 / 5)
    assert crowd_coverage(TRAIN, test) == pytest.approx(4 / 5)  # only [3, 4] has no response judged in training
    assert crowd_coverage(TRAIN, torch.zeros(0, 2, dtype=torch.long)) is None


def test_the_crowd_reads_training_pairs_only():
    test = torch.tensor([[0, 2], [1, 0], [2, 1]])
    flipped = test.flip(1)  # every test label the other way round
    torch.testing.assert_close(crowd_logits(TRAIN, flipped), -crowd_logits(TRAIN, test))
    # while a training label does move it
    assert not torch.equal(crowd_logits(TRAIN[:3], test), crowd_logits(TRAIN, test))


def test_the_personal_crowd_shrinks_a_users_own_record_to_the_crowd():
    # user 1 judged response 2 over 0 once
    train, train_users = TRAIN, torch.tensor([0, 0, 0, 1])
    test, test_users = torch.tensor([[2, 0], [2, 0], [3, 1]]), torch.tensor([1, 0, 1])
    logits, covered = personal_crowd_logits(train, train_users, test, test_users, shrinkage=2.0)
    crowd = crowd_logits(train, test)
    own_2 = (1 + 2 * 0.4) / (1 + 2)  # one win of one judgment, against the crowd's 2/5 at weight 2
    own_0 = (0 + 2 * 0.6) / (1 + 2)  # one loss
    assert logits[0].item() == pytest.approx(own_2 - own_0)  # user 1 now prefers 2: the crowd did not
    assert crowd[0].item() < 0 < logits[0].item()
    # user 0 judged 0 twice (won both) and 2 twice (lost both): more sure than the crowd
    assert logits[1].item() == pytest.approx((0 + 2 * 0.4) / 4 - (2 + 2 * 0.6) / 4) and logits[1] < crowd[1] < 0
    assert covered.tolist() == [True, True, False]  # user 1 never judged 3 nor 1
    assert logits[2].item() == pytest.approx(crowd[2].item())


def test_agreement_is_fleiss_over_pairs_judged_by_several_users():
    responses = torch.tensor([[0, 1], [0, 1], [1, 0], [3, 2], [3, 2], [4, 5], [1, 0], [6, 6], [6, 6]])
    users = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2])
    # (0,1): users 0, 1 say 0 and user 2 says 1 (user 0's repeat, saying 1, is not another rater): 1/3 agree;
    # (2,3): both say 3: 1; (4,5): one rater; (6,6): a response against itself, left out
    result = pair_agreement(responses, users)
    assert result["shared_pairs"] == 2 and result["judgments"] == 5
    assert result["agreement"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["chance"] == pytest.approx(0.4**2 + 0.6**2)  # the lower id won 2 of 5 shared judgments
    assert result["kappa"] == pytest.approx((2 / 3 - 0.52) / 0.48)
    alone = pair_agreement(torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]))
    assert alone["shared_pairs"] == 0 and alone["agreement"] is None and alone["kappa"] is None
    unanimous = diagnose(torch.tensor([[0, 1], [0, 1]]), torch.tensor([0, 1]), *[torch.zeros(0, 2).long(),
                         torch.zeros(0).long()] * 2, 2)
    assert unanimous["agreement"]["kappa"] is None  # chance agreement is 1: kappa is undefined, and said so
    assert "Fleiss kappa n/a" in format_diagnosis(unanimous) and unanimous["case"] == "unknown"


def test_the_verdict_follows_its_rules_in_order():
    def gain(value, low, high, users=20):
        return {"gain": value, "low": low, "high": high, "pairs": 50, "users": users}

    above, across = gain(0.1, 0.05, 0.15), gain(0.01, -0.02, 0.04)
    assert verdict(across, above)[0] == "helps" and "+0.1000 [+0.0500, +0.1500]" in verdict(across, above)[1]
    assert verdict(above, across)[0] == "differ"
    assert verdict(across, across)[0] == "unknown"  # could add up to 4 points: too wide to say "agree"
    below = gain(-0.01, -0.03, 0.015)
    assert verdict(below, across)[0] == "agree"
    missing = gain(None, None, None)
    assert verdict(missing, across)[0] == "unknown" and verdict(missing, None)[0] == "unknown"
    assert verdict(missing, above)[0] == "helps"
    # (b) from too few users, or with too wide an interval, decides nothing
    one_user_right, one_user_wrong = gain(1.0, 1.0, 1.0, users=1), gain(0.0, 0.0, 0.0, users=1)
    assert verdict(one_user_right, across)[0] == "unknown" and verdict(one_user_wrong, across)[0] == "unknown"
    assert verdict(gain(-0.2, -0.5, 0.01), across)[0] == "unknown"


# ------------------------------------------------------------------------------ planted data
def planted_pairs(distinct: bool, users: int = 40, pairs: int = 40, responses: int = 30, dim: int = 8, seed: int = 0):
    """Users judging random pairs of one pool of responses by a planted direction: half of the users by
    ``-direction`` where ``distinct``, everyone by the same one otherwise (no personal signal)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(responses, dim, generator=generator)
    direction = torch.randn(dim, generator=generator)
    owner = torch.arange(users).repeat_interleave(pairs)
    sign = torch.where((owner % 2 == 1) & distinct, -1.0, 1.0)
    every_pair = torch.triu_indices(responses, responses, offset=1)  # each user judges a pair once
    drawn = torch.cat([torch.randperm(every_pair.shape[1], generator=generator)[:pairs] for _ in range(users)])
    first, second = every_pair[:, drawn]
    first_wins = sign * ((embeddings[first] - embeddings[second]) @ direction) > 0
    chosen, rejected = torch.where(first_wins, first, second), torch.where(first_wins, second, first)
    return owner, torch.stack([chosen, rejected], dim=1), embeddings, direction


@pytest.mark.parametrize("distinct, case", [(True, "differ"), (False, "agree")])
def test_the_diagnosis_tells_distinct_users_from_one_direction(distinct, case):
    users, responses, _, _ = planted_pairs(distinct)
    train = torch.arange(len(users)) % 2 == 0  # each user's pairs alternate: train, test
    diagnosis = diagnose(responses, users, responses[train], users[train], responses[~train], users[~train], 40)
    assert diagnosis["case"] == case, diagnosis
    agreement = diagnosis["agreement"]["agreement"]
    assert agreement == 1.0 if not distinct else agreement < 0.7  # one direction: every rater agrees
    assert diagnosis["personal"]["coverage"] > 0.9
    assert "verdict: " + diagnosis["verdict"] in format_diagnosis(diagnosis)


class PlantedData(PreferenceDataModule):
    """Seen and unseen users of ``planted_pairs`` (first half seen), each user's pairs alternating
    between training (train pairs, few-shot pool) and test; lengths as given per response."""

    def __init__(self, distinct: bool, lengths: torch.Tensor | None = None, responses: bool = True):
        super().__init__()
        self.distinct, self.response_lengths, self.with_responses = distinct, lengths, responses
        self.embeddings = self.direction = None

    def load(self):
        owner, responses, self.embeddings, self.direction = planted_pairs(self.distinct)
        splits, half = {}, int(owner.max()) // 2 + 1
        for population, users in (("seen", owner < half), ("unseen", owner >= half)):
            ids = [f"{population}-{i}" for i in range(half)]
            for role, parity in ((f"{population}_{'train' if population == 'seen' else 'pool'}", 0),
                                 (f"{population}_test", 1)):
                rows = torch.nonzero(users & (torch.arange(len(owner)) % 2 == parity))[:, 0]
                pairs = responses[rows]
                splits[role] = PreferenceSplit(
                    self.embeddings[pairs[:, 0]] - self.embeddings[pairs[:, 1]], owner[rows] % half, ids, name=role,
                    responses=pairs if self.with_responses else None,
                    lengths=None if self.response_lengths is None else self.response_lengths[pairs])
        return PreferenceData(splits)


def protocol_on(data: PlantedData, personal: bool) -> dict:
    """The protocol on the planted truth: a basis of +-direction with each seen user at their side, or
    the one direction (K=1)."""
    from callbacks.protocol import evaluate_protocol, shared_baseline
    from lore_pl import FewShotSettings, LoreModel

    data.setup("fit")
    direction = data.direction[:, None] / data.direction.norm()
    if personal:
        side = torch.tensor([1.0 if u % 2 == 0 else -1.0 for u in range(data.num_users)])
        model = LoreModel(torch.cat([direction, -direction], dim=1), torch.stack([4 * side, -4 * side], dim=1),
                          tau=1.0, prior_mean=torch.zeros(2), train_basis=False, train_logits=False)
    else:
        model = LoreModel(direction, tau=1.0, num_users=data.num_users, train_basis=False, train_logits=False)
    return evaluate_protocol(model, data, FewShotSettings(shots=10, steps=100), shared=shared_baseline(model, data)[0])


def test_the_protocol_reports_the_rule_baselines_on_the_same_users_and_pairs_crowd_from_train_and_shots():
    from callbacks.protocol import format_table, loggable

    lengths = torch.arange(30, dtype=torch.float32) % 7  # ties among responses of equal length
    data = PlantedData(distinct=True, lengths=lengths)
    results = protocol_on(data, personal=True)
    test = data.split("unseen_test")
    by_hand = per_user_accuracy(torch.sign(lengths[test.responses[:, 0]] - lengths[test.responses[:, 1]]),
                                test.users, test.num_users, tie_credit=0.5)
    assert results["baselines/longer/unseen/test_acc"] == pytest.approx(float(by_hand.mean()))
    for key in ("seen/test_acc", "unseen/test_acc"):
        for name in ("longer", "crowd"):
            gain = results[f"gain/{name}/{key}"]
            assert gain == pytest.approx(results[key] - results[f"baselines/{name}/{key}"])
            assert results[f"gain/{name}/{key}_low"] <= gain <= results[f"gain/{name}/{key}_high"]
        best = results[f"gain/best/{key}_name"]
        assert results[f"baselines/{best}/{key}"] == max(
            results[f"baselines/{name}/{key}"] for name in ("shared", "population", "longer", "crowd"))
        assert results[f"gain/best/{key}"] == results[f"gain/{best}/{key}"]
        assert results[f"baselines/crowd/{key}_coverage"] > 0.9
    # by hand: win-rates of the seen users' train pairs and the unseen users' 10 shots, nothing else
    from lore_pl import FewShotSettings
    from lore_pl.core import functional as LF

    pool, test = data.split("unseen_pool"), data.split("unseen_test")
    shots = pool.subset(LF.sample_shots(pool.users, 10, FewShotSettings(shots=10).shot_generator()))
    assert len(shots) < len(pool)
    for trained_on, matches in ((shots, True), (pool, False)):
        train = torch.cat([data.split("seen_train").responses, trained_on.responses])
        by_hand = per_user_accuracy(crowd_logits(train, test.responses), test.users, test.num_users, tie_credit=0.5)
        assert (results["baselines/crowd/unseen/test_acc"] == pytest.approx(float(by_hand.mean()))) == matches
    # half the users by -direction: the crowd is near chance, the planted model near perfect
    assert results["baselines/crowd/unseen/test_acc"] < 0.7 < results["unseen/test_acc"]
    assert results["diagnosis"]["case"] == "helps"
    logged = loggable(results)  # what TensorBoard gets: numbers only, the diagnosis's included
    assert logged["baselines/crowd/unseen/test_acc"] == results["baselines/crowd/unseen/test_acc"]
    assert logged["diagnosis/personal/gain"] == results["diagnosis"]["personal"]["gain"] > 0
    assert all(isinstance(value, (int, float)) for value in logged.values())
    table = format_table(results)
    assert "longer wins" in table and "crowd" in table and "over the best baseline there" in table
    assert f"{results['baselines/crowd/unseen/test_acc']:.4f}" in table


def test_the_crowd_never_reads_a_test_label():
    data = PlantedData(distinct=False)
    results = protocol_on(data, personal=False)
    flipped = PlantedData(distinct=False)
    flipped.setup("fit")
    for role in ("seen_test", "unseen_test"):  # every test label the other way round
        split = flipped.split(role)
        flipped.data.splits[role] = PreferenceSplit(-split.features, split.users, split.user_ids, name=role,
                                                    responses=split.responses.flip(1))
    again = protocol_on(flipped, personal=False)
    for key in ("seen/test_acc", "unseen/test_acc"):
        assert again[f"baselines/crowd/{key}"] == pytest.approx(1 - results[f"baselines/crowd/{key}"])
    # one direction, the model is the shared one: no gain, and the users' own records add nothing
    assert results["diagnosis"]["case"] == "agree", results["diagnosis"]
    assert results["diagnosis"]["agreement"]["agreement"] == 1.0


def test_a_crowd_that_covers_no_test_pair_is_not_available():
    from callbacks.protocol import crowd, format_table

    data = PlantedData(distinct=True)
    data.setup("fit")
    train = {"seen_train": data.split("seen_train")}
    test = data.split("seen_test")
    unseen = PreferenceSplit(test.features, test.users, test.user_ids, responses=test.responses + 100)
    assert crowd(train, unseen) == (None, 0.0)
    results = {"rank": 1, "kept_rank": 1, "seen/test_acc": 0.6, "seen/test_acc_std": 0.1,
               "baselines/crowd/seen/test_acc": None, "baselines/crowd/seen/test_acc_std": None,
               "baselines/crowd/seen/test_acc_coverage": 0.0}
    assert "crowd: n/a (no test pair has a response judged in training" in format_table(results)


def test_without_lengths_or_response_ids_the_rule_baselines_are_not_available():
    import json

    from callbacks.protocol import format_table

    results = protocol_on(PlantedData(distinct=True, responses=False), personal=True)
    for key in ("seen/test_acc", "unseen/test_acc"):
        for name in ("longer", "crowd"):
            assert results[f"baselines/{name}/{key}"] is None and results[f"gain/{name}/{key}"] is None
        assert results[f"gain/best/{key}_name"] in ("shared", "population")
    assert json.loads(json.dumps(results))["baselines/crowd/unseen/test_acc"] is None  # null in protocol.json
    table = format_table(results)
    assert "n/a" in table and "longer wins: n/a" in table and "crowd: n/a" in table
    diagnosis = format_diagnosis(results["diagnosis"])
    assert "(a) agreement between users on the same pair: n/a" in diagnosis
    assert results["diagnosis"]["case"] == "helps"  # the planted model's gain over K=1 still shows


# ---------------------------------------------------------------------------- lore-pl-diagnose
def write_planted_file(path, distinct: bool):
    import json

    users, responses, _, _ = planted_pairs(distinct, users=20, pairs=30, responses=20)
    rows = [{"user_id": f"rater-{int(u)}", "prompt": "Which opinion?", "chosen": f"opinion {int(c)}",
             "rejected": f"opinion {int(r)}"} for u, (c, r) in zip(users, responses.tolist())]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("distinct, case", [(True, "differ"), (False, "agree")])
def test_the_diagnose_command_reads_a_preference_file_without_embedding_it(tmp_path, capsys, distinct, case):
    import json

    from lore_pl.experiments.diagnose import main

    write_planted_file(tmp_path / "prefs.jsonl", distinct)
    main([str(tmp_path / "prefs.jsonl"), "--json", str(tmp_path / "diagnosis.json")])
    result = json.loads((tmp_path / "diagnosis.json").read_text())
    assert result["case"] == case and result["users"] == 20 and result["pairs"] == 600
    assert result["test_pairs"] == 300  # half of each user's pairs
    out = capsys.readouterr().out
    assert "20 users, 600 pairs, 300 held out" in out and "verdict: " + result["verdict"] in out


def test_the_diagnose_command_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    from lore_pl.experiments.diagnose import main

    (tmp_path / "bad.jsonl").write_text('{"user_id": "a", "prompt": "p", "chosen": "x"}\n')
    for path in (tmp_path / "bad.jsonl", tmp_path / "missing.jsonl"):
        with pytest.raises(SystemExit) as stopped:
            main([str(path)])
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and str(path) in error and error.count("\n") == 1


def test_the_diagnose_command_never_writes_over_its_input_or_a_foreign_file(tmp_path, capsys):
    from lore_pl.experiments.diagnose import main

    prefs, notes = tmp_path / "prefs.jsonl", tmp_path / "notes.json"
    write_planted_file(prefs, True)
    notes.write_text('{"mine": 1}')
    before = prefs.read_bytes()
    for target, reason in ((prefs, "an input of this command"), (notes, "remove it first"),
                           (tmp_path, "the output is a directory")):
        with pytest.raises(SystemExit) as stopped:
            main([str(prefs), "--json", str(target)])
        error = capsys.readouterr().err
        assert stopped.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
        assert reason in error, error
    assert prefs.read_bytes() == before and notes.read_text() == '{"mine": 1}'
    main([str(prefs), "--json", str(tmp_path / "d.json")])
    main([str(prefs), "--json", str(tmp_path / "d.json")])  # its own earlier diagnosis is replaced


def test_the_diagnose_hold_out_leaves_every_user_a_training_pair():
    from lore_pl.experiments.diagnose import held_out_pairs

    users = torch.arange(6).repeat_interleave(torch.tensor([1, 2, 3, 8, 8, 40]))
    held = held_out_pairs(users, 0.99, seed=0)
    counts, held_counts = torch.bincount(users), torch.bincount(users[held], minlength=6)
    assert held_counts[0] == 0 and bool((held_counts[1:] == counts[1:] - 1).all())
