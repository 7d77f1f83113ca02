"""benchmarks/real.py's own parts: Polis on the data module's response split, and the feature-free baselines."""

import json
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, tiny_spec
from lore_pl.data.preferences import PreferenceSplit

sys.path.insert(0, str(ROOT / "benchmarks"))
import real

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heuristic_accuracies_count_ties_as_half_a_pair():
    # user 0: pairs (0 beats 1), (2 beats 3); user 1: (1 beats 0), (3 beats 2)
    split = PreferenceSplit(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), ["a", "b"],
                            responses=torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]))
    score = np.array([5.0, 1.0, 2.0, 2.0])  # response 0 is longest; 2 and 3 tie
    torch.testing.assert_close(real.heuristic_accuracies(split, score), torch.tensor([0.75, 0.25]))


def test_polis_runs_on_the_data_modules_response_split_and_quick_keeps_its_conversations(tmp_path, monkeypatch,
                                                                                         tiny_reward_model):
    rng = np.random.default_rng(0)
    comments = [f"comment number {i} says {' '.join(rng.choice(['yes', 'no', 'maybe'], i % 4 + 1))}" for i in range(30)]
    rows = [{"user_id": f"{topic}:{u}", "prompt": topic, "chosen": comments[a], "rejected": comments[b]}
            for topic in ("kept-topic", "other-topic") for u in range(12)
            for a, b in (rng.choice(30, 2, replace=False) for _ in range(25))]
    path = tmp_path / "polis_pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setitem(real.DATASETS, "polis", path)
    monkeypatch.setattr(real, "QUICK_POLIS", ("kept-topic",))
    subset = real.polis_subset(real.QUICK_POLIS, tmp_path)
    topics = [json.loads(line)["user_id"].split(":")[0] for line in subset.read_text().splitlines()]
    assert topics == ["kept-topic"] * 300
    data = real.data_module("polis", tiny_spec(tiny_reward_model, kind="encoder"), tmp_path, quick=True, seed=0)
    assert data.split_plan.mode == "response" and data.path == subset
    responses = {role: set(data.split(role).responses.flatten().tolist())
                 for role in ("seen_train", "seen_val", "seen_test", "unseen_pool", "unseen_val", "unseen_test")
                 if data.has_split(role)}
    trained = responses["seen_train"] | responses["unseen_pool"] | responses.get("seen_val", set())
    assert responses["seen_test"] and responses["unseen_test"]
    assert not (responses["seen_test"] | responses["unseen_test"]) & trained


def test_the_seen_response_protocol_draws_each_users_pairs_and_appends_response_ids(tmp_path, tiny_reward_model):
    rng = np.random.default_rng(1)
    comments = [f"comment {i} " + "word " * (i % 5) for i in range(20)]
    rows = [{"user_id": f"topic:{u}", "prompt": "topic", "chosen": comments[a], "rejected": comments[b]}
            for u in range(10) for a, b in (rng.choice(20, 2, replace=False) for _ in range(20))]
    path = tmp_path / "votes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = tiny_spec(tiny_reward_model, kind="encoder")
    modules = [real.SeenResponsePreferences(str(path), response_ids=ids, cache_dir=str(tmp_path / "cache"),
                                            shard_size=16, progress=False, embedder=spec) for ids in (False, True)]
    for data in modules:
        data.setup("fit")
    plain, with_ids = modules
    assert len(plain.feature_cache.items()) == 20 and with_ids.dim == plain.dim + 20
    train, test = with_ids.split("seen_train"), with_ids.split("seen_test")
    # the one-hot block of e(chosen) - e(rejected): +1 at the chosen response's id, -1 at the rejected one's
    ids = train.features[:, plain.dim:]
    assert bool((ids[torch.arange(len(train)), train.responses[:, 0]] == 1).all())
    assert bool((ids[torch.arange(len(train)), train.responses[:, 1]] == -1).all()) and bool((ids.sum(1) == 0).all())
    torch.testing.assert_close(train.features[:, :plain.dim], plain.split("seen_train").features)
    # each user's pairs are drawn: every kept user trains and is tested, and test comments recur in training
    assert bool((train.pairs_per_user() > 0).all()) and bool((test.pairs_per_user() > 0).all())
    assert set(test.responses.flatten().tolist()) <= set(train.responses.flatten().tolist())
