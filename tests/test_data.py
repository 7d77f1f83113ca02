import hashlib

import pytest
import torch

from callbacks.protocol import accuracy
from datamodules import SyntheticPopulationDataModule
from datamodules.sources import file_digest
from helpers import TINY
from lore_pl.data.feature_cache import file_sha256
from lore_pl.data.preferences import PreferenceSplit


def test_the_four_roles_and_their_sizes():
    tiny_data = SyntheticPopulationDataModule(**TINY, val_fraction=0.0)
    assert not tiny_data.has_split("seen_val") and not tiny_data.has_split("unseen_val")
    assert tiny_data.num_users == TINY["num_seen_users"]
    assert tiny_data.num_unseen_users == TINY["num_unseen_users"]
    assert tiny_data.dim == TINY["dim"]
    expected = {
        "seen_train": TINY["train_prompts_per_user"],
        "seen_test": TINY["test_prompts_per_user"],
        "unseen_pool": TINY["fewshot_prompts_per_user"],
        "unseen_test": TINY["test_prompts_per_user"],
    }
    for role, per_user in expected.items():
        split = tiny_data.split(role)
        assert split.features.shape == (split.num_users * per_user, TINY["dim"])
        assert torch.all(split.pairs_per_user() == per_user)
    assert set(tiny_data.seen_user_ids).isdisjoint(tiny_data.unseen_user_ids)
    assert tiny_data.reference_head.shape == (TINY["dim"],)


def test_fractions_of_prompts():
    data = SyntheticPopulationDataModule(**{**TINY, "train_prompts_per_user": 0.25}, val_fraction=0.0)
    assert torch.all(data.split("seen_train").pairs_per_user() == 15)
    with pytest.raises(ValueError, match="train_prompts_per_user"):
        SyntheticPopulationDataModule(**{**TINY, "train_prompts_per_user": 61}).setup()


def test_same_seed_same_data_other_seed_other_data():
    a = SyntheticPopulationDataModule(**TINY).split("seen_train").features
    b = SyntheticPopulationDataModule(**TINY).split("seen_train").features
    c = SyntheticPopulationDataModule(**{**TINY, "seed": 1}).split("seen_train").features
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_oracle_is_exact_for_best_vs_worst_and_noisy_for_bradley_terry(tiny_data):
    for role in ("seen_test", "unseen_test"):
        split = tiny_data.split(role)
        assert accuracy(tiny_data.oracle_logits(role, split), split)[0] == 1.0
    noisy = SyntheticPopulationDataModule(**{**TINY, "labels": "bradley_terry", "noise_temperature": 0.5})
    split = noisy.split("seen_test")
    oracle = accuracy(noisy.oracle_logits("seen_test", split), split)[0]
    assert 0.55 < oracle < 1.0


def test_the_true_rank_explains_the_data(tiny_data):
    # every pair's difference, seen through the planted directions, favours the chosen response
    split = tiny_data.split("seen_train")
    weights = tiny_data.true_weights["seen"][split.users]
    assert torch.all((split.features @ tiny_data.true_directions * weights).sum(-1) > 0)


def test_full_batch_loader_yields_the_whole_split_once(tiny_data):
    split = tiny_data.split("seen_train")
    batches = list(split.loader(None))
    assert len(batches) == 1
    assert batches[0]["features"].data_ptr() == split.features.data_ptr()  # a view, no copy
    assert torch.equal(batches[0]["users"], split.users)


def test_mini_batches_cover_every_pair_once(tiny_data):
    split = tiny_data.split("seen_train")
    loader = split.loader(batch_size=7, shuffle=True, seed=3)
    rows = torch.cat([batch["features"] for batch in loader])
    assert len(loader) == -(-len(split) // 7)
    assert rows.shape == split.features.shape
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731 - compare as sets of rows
    torch.testing.assert_close(order(rows), order(split.features))


def test_split_validation():
    with pytest.raises(ValueError, match="users must be"):
        PreferenceSplit(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), ["a"], name="bad")
    with pytest.raises(ValueError, match="out of range"):
        PreferenceSplit(torch.zeros(2, 2), torch.tensor([0, 1]), ["a"], name="bad")


def test_missing_role_is_a_clear_error(tiny_data):
    with pytest.raises(ValueError, match="unknown split role"):
        tiny_data.split("validation")
    no_unseen = SyntheticPopulationDataModule(**{**TINY, "num_unseen_users": 0})
    assert not no_unseen.has_split("unseen_pool")
    with pytest.raises(ValueError, match="no 'unseen_pool' split"):
        no_unseen.split("unseen_pool")


def test_validation_holds_out_whole_prompts_for_every_user():
    whole = SyntheticPopulationDataModule(**TINY, val_fraction=0.0)
    held = SyntheticPopulationDataModule(**TINY, val_fraction=0.3)
    val_prompts = torch.cat([held.split("seen_val").prompts, held.split("unseen_val").prompts]).unique()
    train_prompts = torch.cat([whole.split("seen_train").prompts, whole.split("unseen_pool").prompts]).unique()
    assert len(val_prompts) <= round(0.3 * len(train_prompts)) and len(val_prompts) > 0.2 * len(train_prompts)
    for role, val_role in (("seen_train", "seen_val"), ("unseen_pool", "unseen_val")):
        train, val, before = held.split(role), held.split(val_role), whole.split(role)
        # prompt-disjoint: no validation prompt is anyone's training prompt, nor a test prompt
        assert not torch.isin(train.prompts, val_prompts).any()
        assert not torch.isin(held.split(role.split("_")[0] + "_test").prompts, val_prompts).any()
        # every pair on a held prompt moved, each once: together they are the original pairs
        assert len(train) + len(val) == len(before) and torch.isin(val.prompts, val_prompts).all()
        order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
        torch.testing.assert_close(order(torch.cat([train.features, val.features])), order(before.features))
        assert train.user_ids == val.user_ids == before.user_ids
    again = SyntheticPopulationDataModule(**TINY, val_fraction=0.3)
    assert torch.equal(again.split("seen_val").features, held.split("seen_val").features)  # seeded
    assert SyntheticPopulationDataModule(**TINY).has_split("seen_val")  # on by default: 10% of the prompts
    with pytest.raises(ValueError, match="val_fraction"):
        SyntheticPopulationDataModule(**TINY, val_fraction=1.0)
    # a hold-out that would take all of a user's training prompts leaves each user one
    greedy = SyntheticPopulationDataModule(**TINY, val_fraction=0.95)
    assert greedy.split("seen_train").pairs_per_user().min() >= 1
    assert greedy.split("unseen_pool").pairs_per_user().min() >= 1


def test_validation_never_reads_the_test_pairs():
    from lore_pl import DataRequest

    without = SyntheticPopulationDataModule(**TINY, val_fraction=0.0)
    assert without.val_dataloader() == []  # no validation rather than the test split
    held = SyntheticPopulationDataModule(**TINY)
    for population in ("seen", "unseen"):
        held.connect(DataRequest(population=population))
        batch = next(iter(held.val_dataloader()))
        assert torch.equal(batch["features"], held.split(f"{population}_val").features)


# ---------------------------------------------------------------- memory at scale (issue 22)
def previous_synthetic_pairs(hp: dict, role_order=("seen_train", "seen_test", "unseen_pool", "unseen_test")):
    """The generator as it was before it worked in blocks (whole float64 arrays): the features of each role."""
    import numpy as np

    rng = np.random.default_rng(hp["seed"])
    scale = np.arange(1, hp["dim"] + 1, dtype=np.float64) ** (-hp.get("spectrum_decay", 0.0) / 2)
    scale *= np.sqrt(hp["dim"] / np.sum(scale**2))
    directions = rng.standard_normal((hp["dim"], hp["num_directions"]))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    prompts = {name: rng.standard_normal((hp[f"num_{name}_prompts"], hp["responses_per_prompt"], hp["dim"])) * scale
               for name in ("train", "test")}
    counts = {"seen": hp["num_seen_users"], "unseen": hp["num_unseen_users"]}
    weights = {name: rng.dirichlet(np.full(hp["num_directions"], 0.1), size=n) for name, n in counts.items()}
    per_user = {"seen_train": ("train", hp["train_prompts_per_user"]),
                "seen_test": ("test", hp["test_prompts_per_user"]),
                "unseen_pool": ("train", hp["fewshot_prompts_per_user"]),
                "unseen_test": ("test", hp["test_prompts_per_user"])}
    features = {}
    for role in role_order:
        prompt_set, count = per_user[role]
        embeddings, w = prompts[prompt_set], weights[role.split("_")[0]]
        prompt_of = np.argsort(rng.random((w.shape[0], embeddings.shape[0])), axis=1)[:, :count].reshape(-1)
        users = np.repeat(np.arange(w.shape[0]), count)
        rewards = ((embeddings @ directions)[prompt_of] * w[users][:, None, :]).sum(-1)
        if hp.get("labels", "best_worst") == "best_worst":
            chosen, rejected = rewards.argmax(axis=1), rewards.argmin(axis=1)
        else:
            rows = np.arange(users.size)
            first = rng.integers(embeddings.shape[1], size=users.size)
            second = (first + rng.integers(1, embeddings.shape[1], size=users.size)) % embeddings.shape[1]
            margin = rewards[rows, first] - rewards[rows, second]
            first_wins = rng.random(users.size) < 1.0 / (1.0 + np.exp(-margin))
            chosen, rejected = np.where(first_wins, first, second), np.where(first_wins, second, first)
        features[role] = torch.from_numpy(embeddings[prompt_of, chosen] - embeddings[prompt_of, rejected]).float()
    return features


@pytest.mark.parametrize("labels", ["best_worst", "bradley_terry"])
def test_synthetic_data_generated_in_blocks_are_the_pairs_of_one_whole_draw(monkeypatch, tmp_path, labels):
    import datamodules.synthetic as synthetic

    hp = {**TINY, "labels": labels, "spectrum_decay": 0.5}
    expected = previous_synthetic_pairs(hp)
    monkeypatch.setattr(synthetic, "BLOCK_VALUES", 50)  # blocks of a few rows: dozens per split
    for on_disk in (None, str(tmp_path)):
        data = SyntheticPopulationDataModule(**hp, val_fraction=0.0, test_features_dir=on_disk)
        for role, features in expected.items():
            split = data.split(role)
            assert split.features.dtype == torch.float32
            assert torch.equal(split.features, features), role
            assert (split.source is not None) == (on_disk is not None and role.endswith("_test"))


def test_owned_data_are_narrowed_in_place_to_the_same_splits_as_a_copy():
    from datamodules.base import PreferenceData, PreferenceDataModule

    class Given(PreferenceDataModule):
        def __init__(self, owned: bool) -> None:
            super().__init__(val_fraction=0.3)
            self.owned = owned

        def load(self) -> PreferenceData:
            loaded = SyntheticPopulationDataModule(**TINY, val_fraction=0.0).data
            return PreferenceData(loaded.splits, loaded.reference_head, owned=self.owned)

    copied, in_place = Given(owned=False), Given(owned=True)
    for role in ("seen_train", "seen_val", "unseen_pool", "unseen_val"):
        a, b = copied.split(role), in_place.split(role)
        assert torch.equal(a.features, b.features) and torch.equal(a.users, b.users), role
        assert torch.equal(a.prompts, b.prompts)
    train = in_place.split("seen_train")
    assert train.features.untyped_storage().nbytes() > train.features.nbytes  # moved up within its own storage
    with pytest.raises(ValueError, match="ascending"):
        train.compacted(torch.tensor([3, 1]))


def test_npy_rows_are_written_and_read_in_blocks(tmp_path):
    import numpy as np

    from lore_pl.data.npy_rows import read_npy_rows, write_npy_rows

    array = np.arange(60, dtype=np.float32).reshape(12, 5)
    path = write_npy_rows(tmp_path / "rows.npy", array.shape, np.float32, np.array_split(array, 4))
    assert np.array_equal(np.load(path), array)
    assert np.array_equal(read_npy_rows(path, 3, 9), array[3:9])
    with pytest.raises(ValueError, match="11 rows written, the header says 12"):
        write_npy_rows(tmp_path / "short.npy", array.shape, np.float32, [array[:11]])
    assert not (tmp_path / "short.npy").exists() and not list(tmp_path.glob(".short*"))  # nothing half-written
    with pytest.raises(IndexError, match="out of range"):
        read_npy_rows(path, 10, 13)


def test_duplicate_rows_are_found_per_user_as_a_brute_force_search_finds_them():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 4, generator=generator)
    users = torch.arange(40) % 5
    for copy, original in ((10, 0), (20, 0), (18, 7), (9, 2)):  # rows 18 and 9: for other users
        features[copy] = features[original]
    split = PreferenceSplit(features, users, [f"u{i}" for i in range(5)])
    def same(a: int, b: int) -> bool:
        return bool(users[a] == users[b]) and torch.equal(features[a], features[b])

    brute = {(min(a for a in range(b) if same(a, b)), b) for b in range(40) if any(same(a, b) for a in range(b))}
    assert {tuple(pair) for pair in split.duplicate_rows().tolist()} == brute == {(0, 10), (0, 20)}
    assert split.duplicate_rows().shape == (2, 2)
def test_file_hashes_read_every_block(tmp_path):
    data = torch.randint(256, (3 << 19,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    big = tmp_path / "b.bin"  # 1.5 MiB: more than one read block
    big.write_bytes(data.numpy().tobytes())
    small = tmp_path / "a.bin"
    small.write_bytes(b"abc")
    assert file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    expected = hashlib.sha256(b"a.bin" + b"abc" + b"b.bin" + big.read_bytes()).hexdigest()[:32]
    assert file_digest([big, small]) == "sha256:" + expected  # names and bytes, in sorted order


def test_draw_shots_keeps_at_most_shots_per_user_and_is_seeded():
    users = torch.tensor([0, 0, 0, 0, 1, 1, 2, 0, 1, 1])
    split = PreferenceSplit(torch.arange(20.0).reshape(10, 2), users, ["a", "b", "c"], name="pool")
    assert split.draw_shots(None, 0) is split  # null: every pair
    drawn = split.draw_shots(2, seed=3, name="shots")
    assert drawn.name == "shots" and drawn.user_ids == split.user_ids
    assert torch.bincount(drawn.users, minlength=3).tolist() == [2, 2, 1]  # user 2 has one pair: kept
    rows = (drawn.features[:, 0] / 2).long()  # each feature row names its pair
    assert torch.equal(split.users[rows], drawn.users) and torch.equal(rows, rows.sort().values)
    assert torch.equal(split.draw_shots(2, seed=3).features, drawn.features)
    seeds = {tuple(split.draw_shots(2, seed=s).features[:, 0].tolist()) for s in range(10)}
    assert len(seeds) > 1  # the seed decides which pairs



def test_a_test_features_dir_never_replaces_a_file_it_did_not_write(tmp_path):
    from lore_pl.errors import LoreDataError

    foreign = tmp_path / "seen_test.features.npy"
    foreign.write_bytes(b"not a feature table")
    with pytest.raises(LoreDataError, match=f"{foreign}: refusing to replace"):
        SyntheticPopulationDataModule(**TINY, test_features_dir=str(tmp_path)).setup("fit")
    assert foreign.read_bytes() == b"not a feature table"
    foreign.unlink()
    for _ in range(2):  # its own tables, from an earlier run, are replaced
        data = SyntheticPopulationDataModule(**TINY, test_features_dir=str(tmp_path))
        data.setup("fit")
    assert data.split("seen_test").source == foreign
