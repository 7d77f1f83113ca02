"""Reddit TLDR, PRISM and PersonalLLM fed a handful of rows written in the upstream schema."""

import json

import numpy as np
import pytest
import torch

from datamodules import PersonalLLMDataModule, PRISMDataModule, RedditTLDRDataModule
from datamodules.prism import conversation_pairs
from helpers import WORDS, assert_validation_is_prompt_disjoint, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

ROLES = ("seen_train", "seen_test", "unseen_pool", "unseen_test")


def words(rng, n):
    return " ".join(rng.choice(WORDS, n))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def settings(tmp_path, model, val_fraction=0.0):
    """The paper's splits (no validation hold-out) unless ``val_fraction`` says otherwise."""
    return dict(cache_dir=str(tmp_path / "cache"), embedder=tiny_spec(model), shard_size=64, progress=False,
                val_fraction=val_fraction)


def table_and_roles(data):
    """The cached pair table, and which role each table row landed in (matched by its features)."""
    embeddings, _ = data.feature_cache.load()
    table = json.loads((data.feature_cache.directory / "table.json").read_text())
    x = embeddings[torch.tensor(table["chosen"])] - embeddings[torch.tensor(table["rejected"])]
    roles = {}
    for role in ROLES:
        if data.has_split(role):
            for f in data.split(role).features:
                match = torch.nonzero((x - f).abs().sum(1) < 1e-6).flatten().tolist()
                roles.setdefault(role, set()).update(match)
    return table, roles


# ------------------------------------------------------------------------------------- TLDR
def tldr_record(rng, worker, post_id, split):
    texts = [words(rng, 4), words(rng, 6)]
    return {
        "info": {
            "id": post_id,
            "post": f"post {post_id} {words(rng, 8)}",
            "title": "t",
            "subreddit": "r",
            "site": None,
            "article": None,
        },
        "summaries": [{"text": texts[0], "policy": "a", "note": None}, {"text": texts[1], "policy": "b", "note": None}],
        "choice": int(rng.integers(2)),
        "worker": worker,
        "batch": "b1",
        "split": split,
        "extra": {},
    }


def test_reddit_tldr_split_rules(tmp_path, tiny_reward_model, capsys):
    rng = np.random.default_rng(0)
    train, validation = [], []
    train_pairs = {"w0": 9, "w1": 8, "w2": 7, "w3": 6, "w4": 5, "w5": 2, "w6": 1, "only-train": 5}
    for worker, count in train_pairs.items():
        train += [tldr_record(rng, worker, f"t{worker}{i}", "train") for i in range(count)]
    for worker in ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "only-val"]:
        validation += [tldr_record(rng, worker, f"v{worker}{i}", "valid1") for i in range(3)]
    validation.append(tldr_record(rng, "w0", "tw10", "valid1"))  # a post that w1 trains on
    write_jsonl(tmp_path / "tldr/comparisons/train.jsonl", train)
    write_jsonl(tmp_path / "tldr/comparisons/validation.jsonl", validation)

    data = RedditTLDRDataModule(
        str(tmp_path / "tldr"), seen_train_cap=4, unseen_train_cap=2, **settings(tmp_path, tiny_reward_model)
    )
    data.setup("fit")
    # the split plan is printed (before the embedding): users outside the paper's split are counted
    out = capsys.readouterr().out
    assert "split plan for RedditTLDRDataModule (split_by: prompt: the paper's posts)" in out
    assert "dropped users: 4 of 9 (4 outside the data set's split)" in out
    assert data.split("seen_test").lengths is not None
    seen, unseen = set(data.seen_user_ids), set(data.unseen_user_ids)
    # in both splits, minus the two with the fewest pairs (w6, w5), halved
    assert seen | unseen == {"w0", "w1", "w2", "w3", "w4"} and not seen & unseen
    assert len(seen) == 2 and len(unseen) == 3
    assert data.split("seen_train").pairs_per_user().max() <= 4 and data.split("seen_train").pairs_per_user().min() == 4
    assert data.split("unseen_pool").pairs_per_user().tolist() == [2, 2, 2]
    table, roles = table_and_roles(data)
    groups = np.asarray(table["group"])
    train_groups = set(groups[list(roles["seen_train"] | roles["unseen_pool"])])
    test_groups = set(groups[list(roles["seen_test"] | roles["unseen_test"])])
    assert not train_groups & test_groups
    assert all(table["source"][r] == "train" for r in roles["seen_train"] | roles["unseen_pool"])
    # everyone is tested on all their validation pairs (the leaked post excepted, if w1 trained on it)
    expected = 3 * 5 + (0 if "tw10" in train_groups else 1)
    assert len(data.split("seen_test")) + len(data.split("unseen_test")) == expected


# ------------------------------------------------------------------------------------ PRISM
def prism_conversation(rng, user, conversation_id, turns=2):
    history = []
    for turn in range(turns):
        history.append(
            {
                "turn": turn,
                "role": "user",
                "content": f"{words(rng, 5)} {conversation_id}",
                "model_provider": None,
                "model_name": None,
                "score": None,
                "if_chosen": None,
                "within_turn_id": None,
            }
        )
        replies = 4 if turn == 0 else 2
        chosen = int(rng.integers(replies))
        for within in range(replies):
            history.append(
                {
                    "turn": turn,
                    "role": "model",
                    "content": f"{words(rng, 6)} r{within}",
                    "model_provider": "p",
                    "model_name": f"m{within}",
                    "score": int(rng.integers(1, 101)),
                    "if_chosen": within == chosen,
                    "within_turn_id": within,
                }
            )
    return {
        "conversation_id": conversation_id,
        "user_id": user,
        "conversation_type": "unguided",
        "opening_prompt": history[0]["content"],
        "conversation_turns": turns,
        "conversation_history": history,
        "performance_attributes": {},
        "choice_attributes": {},
        "open_feedback": "ok",
        "generated_datetime": "x",
        "timing_duration_s": 1.0,
        "timing_duration_mins": 0.1,
        "included_in_balanced_subset": True,
    }


def write_prism(root, rng):
    dialogs = {f"user{i}": 6 + i % 3 for i in range(10)} | {"few0": 5, "few1": 2}
    conversations = [prism_conversation(rng, user, f"c-{user}-{k}") for user, n in dialogs.items() for k in range(n)]
    conversations.append(prism_conversation(rng, "not-in-survey", "c-x"))
    write_jsonl(root / "survey.jsonl", [{"user_id": u, "age": "25-34", "included_in_US_REP": False} for u in dialogs])
    write_jsonl(root / "conversations.jsonl", conversations)
    utterances = [
        {
            "utterance_id": f"{c['conversation_id']}-{m['turn']}-{m['within_turn_id']}",
            "conversation_id": c["conversation_id"],
            "user_id": c["user_id"],
            "turn": m["turn"],
            "within_turn_id": m["within_turn_id"],
            "model_response": m["content"],
            "if_chosen": m["if_chosen"],
        }
        for c in conversations
        for m in c["conversation_history"]
        if m["role"] == "model"
    ]
    write_jsonl(root / "utterances.jsonl", utterances)
    return dialogs, conversations


def test_prism_pairs_each_rejected_reply_with_the_conversation_so_far():
    conversation = prism_conversation(np.random.default_rng(1), "u", "c1")
    pairs = conversation_pairs(conversation)
    assert len(pairs) == 3 + 1  # turn 0: 4 replies, turn 1: 2 replies
    history = conversation["conversation_history"]
    chosen0 = next(m["content"] for m in history if m["turn"] == 0 and m["if_chosen"])
    messages, chosen, rejected = pairs[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[1]["content"] == chosen0
    for _, _, rejected in pairs:
        assert isinstance(rejected, str) and not rejected.startswith("[")  # one reply, not a list's string form
        assert rejected in {m["content"] for m in history if m["role"] == "model" and not m["if_chosen"]}


def test_prism_split_rules_and_identical_templates(tmp_path, tiny_reward_model):
    dialogs, _ = write_prism(tmp_path / "prism", np.random.default_rng(0))
    data = PRISMDataModule(str(tmp_path / "prism"), **settings(tmp_path, tiny_reward_model))
    data.setup("fit")
    seen, unseen = set(data.seen_user_ids), set(data.unseen_user_ids)
    assert seen | unseen == {u for u, n in dialogs.items() if n > 5} and not seen & unseen
    # the reference's order: every user with a conversation split 80/20 (floor), then the filter
    from datamodules.pairs import split_fraction

    first, rest = split_fraction(sorted(set(table_and_roles(data)[0]["user"])), 0.8, data.seed)
    assert seen == {u for u in first if dialogs[u] > 5} and unseen == {u for u in rest if dialogs[u] > 5}
    table, roles = table_and_roles(data)
    groups, users = np.asarray(table["group"]), np.asarray(table["user"])
    train_rows, test_rows = roles["seen_train"] | roles["unseen_pool"], roles["seen_test"] | roles["unseen_test"]
    assert not set(groups[list(train_rows)]) & set(groups[list(test_rows)])  # a dialog is train or test
    for user in seen | unseen:  # each user's dialogs halved
        mine = users == user
        n_train = len(set(groups[[r for r in train_rows if mine[r]]]))
        assert n_train == int(0.5 * dialogs[user])
    # chosen and rejected of a pair share the identical chat list, and every text is a real reply
    items = data.feature_cache.items()
    for chosen, rejected in zip(table["chosen"], table["rejected"]):
        assert items[chosen][0] == items[rejected][0] and isinstance(items[rejected][1], str)
    embedder_texts = (
        __import__("lore_pl.data.embedder", fromlist=["TextEmbedder"])
        .TextEmbedder(data.embedder_spec)
        .texts([items[table["chosen"][0]], items[table["rejected"][0]]])
    )
    prefix = len(embedder_texts[0]) - len(items[table["chosen"][0]][1]) - len(" </s> ")
    assert embedder_texts[0][:prefix] == embedder_texts[1][:prefix]


# ------------------------------------------------------------------------------ PersonalLLM
def write_personal_llm(root, rng, prompts):
    from datamodules.personal_llm import REWARD_MODELS

    for split, count in prompts.items():
        rows = []
        for p in range(count):
            row = {"prompt": f"{split} {p} {words(rng, 5)}", "subset": "s", "prompt_id": p}
            for i in range(1, 9):
                row[f"response_{i}"] = f"{words(rng, 4)} answer {i}"
                row.update({f"response_{i}_{rm}": float(rng.normal()) for rm in REWARD_MODELS})
            rows.append(row)
        write_jsonl(root / f"{split}.jsonl", rows)


def test_personal_llm_simulated_users(tmp_path, tiny_reward_model):
    write_personal_llm(tmp_path / "pllm", np.random.default_rng(0), {"train": 40, "test": 10})
    data = PersonalLLMDataModule(
        str(tmp_path / "pllm"),
        num_seen_users=20,
        num_unseen_users=10,
        seen_train_prompts=0.1,
        unseen_train_prompts=0.05,
        **settings(tmp_path, tiny_reward_model),
    )
    data.setup("fit")
    assert data.split("seen_train").pairs_per_user().tolist() == [4] * 20  # 0.1 of 40 train prompts
    assert data.split("unseen_pool").pairs_per_user().tolist() == [2] * 10
    assert data.split("unseen_test").pairs_per_user().tolist() == [10] * 10  # all test prompts
    assert not set(data.seen_user_ids) & set(data.unseen_user_ids)
    assert data.true_weights["seen"].shape == (20, 10)
    torch.testing.assert_close(data.true_weights["seen"].sum(1), torch.ones(20))
    # every pair is best vs worst of 8 under the user's weights: the true scores' order decides
    embeddings, _ = data.feature_cache.load()
    table = json.loads((data.feature_cache.directory / "table.json").read_text())
    responses, scores = np.asarray(table["test"]["responses"]), np.asarray(table["test"]["scores"])
    w = data.true_weights["unseen"][0].numpy()
    split = data.split("unseen_test")
    mine = split.features[split.users == 0]
    expected = set()
    for p in range(10):
        reward = scores[p] @ w
        x = embeddings[responses[p, reward.argmax()]] - embeddings[responses[p, reward.argmin()]]
        expected.add(tuple(torch.round(x, decimals=5).tolist()))
    assert {tuple(torch.round(f, decimals=5).tolist()) for f in mine} == expected
    # items are shared: 8 responses per prompt embedded once
    assert data.feature_cache.manifest()["num_items"] == 8 * 50


def test_personal_llm_missing_score_is_a_clear_error(tmp_path, tiny_reward_model):
    write_personal_llm(tmp_path / "pllm", np.random.default_rng(0), {"train": 3, "test": 2})
    rows = [json.loads(line) for line in (tmp_path / "pllm/test.jsonl").read_text().splitlines()]
    del rows[1]["response_3_gemma_7b"]
    write_jsonl(tmp_path / "pllm/test.jsonl", rows)
    data = PersonalLLMDataModule(str(tmp_path / "pllm"), **settings(tmp_path, tiny_reward_model))
    with pytest.raises(ValueError, match="test row 2: missing or empty score field 'response_3_gemma_7b'"):
        data.prepare_data()


@pytest.mark.parametrize("name", ["tldr", "prism", "personalllm"])
def test_every_upstream_data_set_holds_out_whole_prompts(name, tmp_path, tiny_reward_model):
    rng = np.random.default_rng(0)
    if name == "tldr":
        records = [tldr_record(rng, f"w{i % 6}", f"t{i % 40}", "train") for i in range(120)]
        records += [tldr_record(rng, f"w{i % 6}", f"v{i}", "valid1") for i in range(24)]
        write_jsonl(tmp_path / "tldr/comparisons/train.jsonl", records[:120])
        write_jsonl(tmp_path / "tldr/comparisons/validation.jsonl", records[120:])
        data = RedditTLDRDataModule(str(tmp_path / "tldr"), drop_fewest=0, **settings(tmp_path, tiny_reward_model, 0.3))
    elif name == "prism":
        write_prism(tmp_path / "prism", rng)
        data = PRISMDataModule(str(tmp_path / "prism"), **settings(tmp_path, tiny_reward_model, 0.3))
    else:
        write_personal_llm(tmp_path / "pllm", rng, {"train": 40, "test": 10})
        data = PersonalLLMDataModule(
            str(tmp_path / "pllm"),
            num_seen_users=20,
            num_unseen_users=10,
            seen_train_prompts=0.2,
            unseen_train_prompts=0.1,
            **settings(tmp_path, tiny_reward_model, 0.3),
        )
    data.setup("fit")
    assert_validation_is_prompt_disjoint(data)
