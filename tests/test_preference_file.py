"""PreferenceFileDataModule: validation, split rules, the feature cache (reuse, resume) and the predict job."""

import json

import pytest
import torch

from helpers import assert_validation_is_prompt_disjoint, make, tiny_spec, write_preferences
from lore_pl import BasisModule, LoreDataError
from lore_pl.data.embedder import TextEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def counted_forward(monkeypatch):
    """Counts the embedder's forward calls (each embeds one shard)."""
    calls = []
    original = TextEmbedder.forward

    def forward(self, items):
        calls.append(len(items))
        return original(self, items)

    monkeypatch.setattr(TextEmbedder, "forward", forward)
    return calls


def test_split_rules(tmp_path, tiny_reward_model):
    rows = write_preferences(tmp_path / "prefs.jsonl")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, val_fraction=0.0)
    data.setup("fit")
    seen, unseen = set(data.seen_user_ids), set(data.unseen_user_ids)
    assert seen and unseen and not seen & unseen
    assert len(seen) == 4 and len(unseen) == 4  # seen_fraction 0.5 of 8 users
    # every pair lands in exactly one role, and train and test prompts are disjoint
    embeddings, _ = data.feature_cache.load()
    table = json.loads((data.feature_cache.directory / "table.json").read_text())
    assert sum(len(data.split(r)) for r in ("seen_train", "seen_test", "unseen_pool", "unseen_test")) == len(rows)
    features = {tuple(torch.round(f, decimals=5).tolist()) for f in data.split("seen_test").features}
    features |= {tuple(torch.round(f, decimals=5).tolist()) for f in data.split("unseen_test").features}
    train_groups, test_groups = set(), set()
    chosen, rejected = torch.tensor(table["chosen"]), torch.tensor(table["rejected"])
    for row, group in enumerate(table["group"]):
        x = tuple(torch.round(embeddings[chosen[row]] - embeddings[rejected[row]], decimals=5).tolist())
        (test_groups if x in features else train_groups).add(group)
    assert test_groups and train_groups and not train_groups & test_groups
    assert data.reference_head is not None and data.dim == 16


def test_validation_holds_out_whole_prompts(tmp_path, tiny_reward_model):
    rows = write_preferences(tmp_path / "prefs.jsonl", users=10, prompts=30)
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, val_fraction=0.25)
    data.setup("fit")
    assert_validation_is_prompt_disjoint(data)
    # the prompt ids are the prompts: pairs on one prompt text share one id, whoever judged them
    texts = {}
    for role in ("seen_train", "seen_val", "unseen_pool", "unseen_val", "seen_test", "unseen_test"):
        for prompt in data.split(role).prompts.tolist():
            texts.setdefault(prompt, role)
    assert len(texts) <= len({json.dumps(row["prompt"]) for row in rows})


def test_chat_prompts_are_kept_as_chat_lists(tmp_path, tiny_reward_model):
    write_preferences(tmp_path / "prefs.jsonl")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    data.prepare_data()
    items = data.feature_cache.items()
    systems = [messages for messages, _ in items if messages[0]["role"] == "system"]
    assert systems and all(len(m) == 2 and m[1]["role"] == "user" for m in systems)


def test_second_run_does_not_call_the_model(tmp_path, tiny_reward_model, counted_forward):
    write_preferences(tmp_path / "prefs.jsonl")
    first = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    first.setup("fit")
    calls = len(counted_forward)
    assert calls == first.feature_cache.manifest()["num_shards"] > 1
    second = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    second.prepare_data()
    second.setup("fit")
    assert len(counted_forward) == calls  # nothing embedded again
    assert torch.equal(first.split("seen_train").features, second.split("seen_train").features)


KILLER = """
import os, signal, sys
import numpy as np
sys.path[:0] = {paths!r}
import lore_pl.data.feature_cache as feature_cache
from helpers import tiny_spec
from datamodules import PreferenceFileDataModule

written = []
real_save = np.save

def save_then_die(stream, array):
    if len(written) == 2:  # the third shard: half its bytes hit the disk, then the process is killed
        stream.write(b"half a shard")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(array.shape)
    real_save(stream, array)

feature_cache.np.save = save_then_die
PreferenceFileDataModule({path!r}, cache_dir={cache!r}, embedder=tiny_spec({model!r}), shard_size=10,
                         progress=False).prepare_data()
"""


def test_killed_embedding_resumes_from_its_shards(tmp_path, tiny_reward_model, monkeypatch):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    write_preferences(tmp_path / "prefs.jsonl")
    tests, root = Path(__file__).parent, Path(__file__).parents[1]
    script = KILLER.format(paths=[str(tests), str(root)], path=str(tmp_path / "prefs.jsonl"),
                           cache=str(tmp_path / "cache"), model=tiny_reward_model)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]

    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    cache = data.feature_cache
    num_shards = cache.manifest()["num_shards"]
    assert not cache.is_complete() and cache.missing_shards() == list(range(2, num_shards))
    assert list(cache.directory.glob(".shard-00002.npy.*.tmp")), "the half-written shard should be a temporary file"

    calls = []
    original = TextEmbedder.forward
    monkeypatch.setattr(TextEmbedder, "forward", lambda self, items: calls.append(len(items)) or original(self, items))
    data.setup("fit")
    assert len(calls) == num_shards - 2  # only the missing shards were embedded
    fresh = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, cache_dir=str(tmp_path / "fresh"))
    fresh.setup("fit")
    torch.testing.assert_close(cache.load()[0], fresh.feature_cache.load()[0])


def test_cache_key_changes_with_model_settings(tmp_path, tiny_reward_model):
    write_preferences(tmp_path / "prefs.jsonl")
    base = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path).feature_cache.directory
    shorter = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path,
                   embedder=tiny_spec(tiny_reward_model).__class__(model=tiny_reward_model, max_length=32,
                                                                    dtype="float32")).feature_cache.directory
    encoder = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path,
                   embedder=tiny_spec(tiny_reward_model, kind="encoder")).feature_cache.directory
    assert len({base, shorter, encoder}) == 3


def test_encoder_data_has_no_reference_head_for_k0_or_the_regularizer(tmp_path, tiny_reward_model):
    from helpers import tiny_trainer

    write_preferences(tmp_path / "prefs.jsonl")
    encoder = tiny_spec(tiny_reward_model, kind="encoder")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, embedder=encoder)
    assert data.reference_head is None
    for model in (
        BasisModule(estimator="adam", rank=0),
        BasisModule(estimator="adam", rank=2, regularizer="cosine", alpha=1.0),
    ):
        with pytest.raises(ValueError, match="needs a reference head V_ref"):
            tiny_trainer(max_epochs=1).fit(model, datamodule=data)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"user_id": "a", "prompt": "hello"}, "line 2: field 'chosen' .*missing"),
        (
            {"user_id": "a", "prompt": "hello", "chosen": "  ", "rejected": "no"},
            "line 2: field 'chosen' must be a non-empty",
        ),
        ({"user_id": "a", "prompt": "hello", "chosen": "yes", "rejected": "yes"}, "line 2: .*identical"),
        (
            {"user_id": "a", "prompt": 7, "chosen": "yes", "rejected": "no"},
            "line 2: field 'prompt'.*string or chat list",
        ),
        (
            {"user_id": "a", "prompt": [{"role": "user"}], "chosen": "yes", "rejected": "no"},
            "line 2: field 'prompt'.*'content'",
        ),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, tiny_reward_model, row, message):
    good = {"user_id": "a", "prompt": "hello", "chosen": "yes", "rejected": "no"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl: {message}"):
        make(path, tiny_reward_model, tmp_path).prepare_data()


def test_csv_and_parquet_with_custom_columns(tmp_path, tiny_reward_model):
    import pandas as pd

    rows = write_preferences(tmp_path / "prefs.jsonl", chat_every=None)  # CSV prompts are strings
    frame = pd.DataFrame(rows).rename(columns={"user_id": "who", "chosen": "good", "rejected": "bad"})
    frame.to_csv(tmp_path / "prefs.csv", index=False)
    frame.to_parquet(tmp_path / "prefs.parquet")
    columns = dict(user_column="who", chosen_column="good", rejected_column="bad")
    reference = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    reference.setup("fit")
    for name in ("prefs.csv", "prefs.parquet"):
        data = make(tmp_path / name, tiny_reward_model, tmp_path, **columns)
        data.setup("fit")
        assert data.seen_user_ids == reference.seen_user_ids
        torch.testing.assert_close(data.split("unseen_test").features, reference.split("unseen_test").features)


def test_lightning_predict_fills_the_cache(tmp_path, tiny_reward_model, monkeypatch):
    from lore_pl.cli import build_cli

    write_preferences(tmp_path / "prefs.jsonl")
    args = [
        "predict",
        "--model=lore_pl.EmbeddingModule",
        "--data=datamodules.PreferenceFileDataModule",
        f"--data.init_args.path={tmp_path / 'prefs.jsonl'}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        f"--data.init_args.embedder.model={tiny_reward_model}",
        "--data.init_args.embedder.dtype=float32",
        "--data.init_args.embedder.max_length=64",
        "--data.init_args.embedder.batch_size=3",
        "--data.init_args.shard_size=10",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    build_cli(args)
    in_process = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, cache_dir=str(tmp_path / "direct"))
    predicted = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    assert predicted.feature_cache.is_complete()
    in_process.prepare_data()
    features, head = predicted.feature_cache.load()
    expected, expected_head = in_process.feature_cache.load()
    torch.testing.assert_close(features, expected)
    assert torch.equal(head, expected_head)
    # both ways record the embedding model's weights digest (a basis fitted on the cache keeps it)
    assert predicted.embedder_weights == in_process.embedder_weights
    assert predicted.embedder_weights.startswith("sha256-state-dict-v1:")

    def no_model(self, spec):
        raise AssertionError("the model was loaded although the cache is complete")

    monkeypatch.setattr(TextEmbedder, "__init__", no_model)
    build_cli(args)  # a second embedding job finds the cache complete: no model, nothing embedded
    assert torch.equal(predicted.feature_cache.load()[0], features)


@pytest.mark.slow
def test_predict_job_on_two_processes_writes_every_shard_once(tmp_path, tiny_reward_model):
    """The embedding job under DDP (2 CPU processes): shards are split between ranks, rank 0 completes the cache."""
    from lightning import Trainer

    from lore_pl import EmbeddingModule

    write_preferences(tmp_path / "prefs.jsonl")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(EmbeddingModule(), datamodule=data, return_predictions=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    direct = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, cache_dir=str(tmp_path / "direct"))
    direct.prepare_data()
    assert data.feature_cache.is_complete()
    torch.testing.assert_close(data.feature_cache.load()[0], direct.feature_cache.load()[0])
    assert torch.equal(data.feature_cache.load()[1], direct.feature_cache.load()[1])


def test_bad_rows_skipped_are_listed_in_the_run_directory_and_small_users_dropped(tmp_path, tiny_reward_model):
    from lightning import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    rows = write_preferences(tmp_path / "prefs.jsonl")
    bad = {**rows[0], "chosen": "   "}
    lonely = {**rows[1], "user_id": "rater-lonely"}  # one pair only
    with open(tmp_path / "prefs.jsonl", "a") as stream:
        stream.write(json.dumps(bad) + "\n" + json.dumps(lonely) + "\n")
    with pytest.raises(LoreDataError, match=f"prefs.jsonl: line {len(rows) + 1}: field 'chosen'"):
        make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path).prepare_data()

    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, skip_bad_rows=True, min_pairs_per_user=2)
    data.trainer = Trainer(logger=TensorBoardLogger(tmp_path / "logs", name="run"), accelerator="cpu",
                           enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="1 user\\(s\\) have fewer than min_pairs_per_user=2"):
        data.setup("fit")
    users = set(data.seen_user_ids) | set(data.unseen_user_ids)
    assert "rater-lonely" not in users and len(users) == 8
    skipped = (tmp_path / "logs" / "run" / "version_0" / "skipped_rows.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in skipped] == [
        {"where": f"line {len(rows) + 1}", "reason": "field 'chosen' must be a non-empty string, got '   '", "row": bad}
    ]
    with pytest.raises(ValueError, match="min_pairs_per_user must be an integer >= 1"):
        make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, min_pairs_per_user=0)


def test_a_corrupt_cache_table_names_the_file(tmp_path, tiny_reward_model):
    write_preferences(tmp_path / "prefs.jsonl")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    data.prepare_data()
    table = data.feature_cache.directory / "table.json"
    table.write_text(table.read_text()[:50])
    with pytest.raises(LoreDataError, match=r"table.json: not a readable feature cache table \(JSONDecodeError"):
        data.load()


def test_skipped_rows_without_a_logger_are_listed_where_the_warning_says(tmp_path, tiny_reward_model):
    import re

    from lightning import Trainer

    rows = write_preferences(tmp_path / "prefs.jsonl")
    cut = json.dumps(rows[0])[:30]  # a line a crash cut short
    with open(tmp_path / "prefs.jsonl", "a") as stream:
        stream.write(cut + "\n")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, skip_bad_rows=True)
    data.trainer = Trainer(logger=False, default_root_dir=tmp_path / "run", accelerator="cpu",
                           enable_progress_bar=False, enable_model_summary=False)
    listed = tmp_path / "run" / "skipped_rows.jsonl"
    with pytest.warns(UserWarning, match=rf"1 bad row\(s\) skipped \(first: line {len(rows) + 1}: not valid JSON .*\); "
                                         f"the list is {re.escape(str(listed))}$"):
        data.setup("fit")
    assert [json.loads(line)["row"] for line in listed.read_text().splitlines()] == [cut]

    # a file of the user's under that name is never replaced: refused, naming it, left byte-identical
    listed.write_text("my notes\n")
    other = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, skip_bad_rows=True)
    other.trainer = Trainer(logger=False, default_root_dir=tmp_path / "run", accelerator="cpu",
                            enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(LoreDataError, match=rf"{re.escape(str(listed))}: refusing to replace"):
        other.setup("fit")
    assert listed.read_text() == "my notes\n"

    bare = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path, skip_bad_rows=True)  # no Trainer: no file
    with pytest.warns(UserWarning, match="no list is written without a Trainer: they are in the data module's "
                                         "skipped_rows"):
        bare.setup("fit")
    assert bare.skipped_rows[0]["row"] == cut
