"""Every row of the README's "Failure behaviour" table: the error (or warning) type, and that the
message names the culprit (split, row, user, file, field)."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import PreferenceData, PreferenceDataModule, SyntheticPopulationDataModule
from datamodules.preference_file import parse_rows
from datamodules.sources import read_records
from helpers import TINY, tiny_trainer
from lore_pl import BasisModule, FewShotModule, FewShotSettings, LoreDataError, LoreDataWarning
from lore_pl.data.basis_file import BasisFile, save_basis
from lore_pl.data.feature_cache import FeatureCache
from lore_pl.data.preferences import PreferenceSplit

COLUMNS = {"user_id": "user_id", "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


class ArrayData(PreferenceDataModule):
    """Splits given as tensors: the smallest data module that reaches the base class's checks."""

    def __init__(self, splits, reference_head=None):
        super().__init__()
        self._splits, self._head = splits, reference_head

    def load(self):
        built = {role: PreferenceSplit(x, u, ids, name=role) for role, (x, u, ids) in self._splits.items()}
        return PreferenceData(built, self._head)


def population(d=6, users=3, pairs=4, seed=0, unseen=True, head=True):
    generator = torch.Generator().manual_seed(seed)
    seen_ids, unseen_ids = [f"u{i}" for i in range(users)], [f"new{i}" for i in range(users)]
    per_user = torch.arange(users).repeat_interleave(pairs)
    splits = {role: (torch.randn(users * pairs, d, generator=generator), per_user.clone(), ids)
              for role, ids in (("seen_train", seen_ids), ("seen_test", seen_ids),
                                ("unseen_pool", unseen_ids), ("unseen_test", unseen_ids))
              if unseen or role.startswith("seen")}
    return splits, (torch.randn(d, generator=generator) if head else None)


# ------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_name_the_split_row_and_user(bad):
    splits, head = population()
    splits["seen_train"][0][5, 2] = bad  # row 5 is user u1's (4 pairs per user)
    with pytest.raises(LoreDataError, match=r"split 'seen_train': row 5 \(user 'u1'\) has a non-finite feature "
                                            rf"\({bad} at dimension 2\); 1 row\(s\) of 12"):
        ArrayData(splits, head).setup("fit")


def test_feature_dimensions_that_differ_between_splits_name_the_splits():
    splits, head = population()
    x, u, ids = splits["seen_test"]
    splits["seen_test"] = (x[:, :4], u, ids)
    with pytest.raises(LoreDataError, match=r"feature dimensions differ: \{'seen_train': 6, 'seen_test': 4"):
        ArrayData(splits, head).setup("fit")


def test_a_reference_head_of_another_dimension_is_an_error():
    splits, _ = population()
    with pytest.raises(LoreDataError, match=r"V_ref has shape \(5,\), but the features have d="):
        ArrayData(splits, torch.ones(5)).setup("fit")


def test_a_non_finite_reference_head_is_an_error():
    splits, head = population()
    head[1] = float("nan")
    with pytest.raises(LoreDataError, match="reference head V_ref has NaN or Inf entries"):
        ArrayData(splits, head).setup("fit")


@pytest.mark.parametrize("role, what", [("seen_train", "train pairs"), ("unseen_pool", "few-shot pool pairs")])
def test_users_without_the_pairs_their_split_needs_are_named(role, what):
    splits, head = population()
    x, u, ids = splits[role]
    keep = u != 2  # the third user loses every pair of this split
    splits[role] = (x[keep], u[keep], ids)
    prefix = "u" if role.startswith("seen") else "new"
    with pytest.raises(LoreDataError, match=rf"split '{role}': 1 of its 3 users have no {what}: '{prefix}2'"):
        ArrayData(splits, head).setup("fit")


def test_duplicate_pairs_warn_with_the_rows_and_the_user():
    splits, head = population()
    x, u, ids = splits["seen_train"]
    x[7] = x[6]  # user u1 judged the same pair twice
    x[9] = x[2]  # same features, other users (u2 and u0): not a duplicate of one user's
    x, u, ids = splits["seen_test"]
    x[1] = x[0]  # and twice in another split: still one warning, counting both
    with pytest.warns(LoreDataWarning) as caught:
        data = ArrayData(splits, head)
        data.setup("fit")
    repeated = [str(w.message) for w in caught if "repeated judgments" in str(w.message)]
    assert len(repeated) == 1, repeated
    assert re.search(r"1 in 'seen_train', 1 in 'seen_test'.*rows 6 and 7 of 'seen_train', user 'u1'", repeated[0])
    assert len(data.split("seen_train")) == 12  # kept: a warning, not an error


def test_a_data_warning_from_the_command_line_is_one_line():
    from lore_pl.cli import one_line_data_warnings

    formatted = one_line_data_warnings(warnings.formatwarning)(
        "repeated judgments: 1 in 'seen_train'", LoreDataWarning, "datamodules/base.py", 220, "rank_zero_warn(")
    assert formatted == "warning: repeated judgments: 1 in 'seen_train'\n"
    other = one_line_data_warnings(warnings.formatwarning)("x", UserWarning, "f.py", 1, "warn(")
    assert "UserWarning" in other  # other warnings keep the library's form


def test_clean_data_gives_no_warning():
    splits, head = population()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoreDataWarning)
        ArrayData(splits, head).setup("fit")


# ------------------------------------------------------------------------------------- settings
def test_rank_above_the_dimension_names_both(tiny_data):
    with pytest.raises(LoreDataError, match="rank K=17 exceeds the feature dimension d=16"):
        tiny_trainer(max_epochs=1).fit(BasisModule(estimator="adam", rank=17), datamodule=tiny_data)


@pytest.mark.parametrize("model, what", [
    (lambda: BasisModule(estimator="adam", rank=0), "rank K=0 \\(the reference model\\)"),
    (lambda: BasisModule(estimator="adam", rank=2, regularizer="l2", alpha=1.0), "regularizer='l2'"),
])
def test_k0_or_a_regularizer_without_a_reference_head(model, what):
    splits, _ = population(head=False)
    with pytest.raises(LoreDataError, match=f"{what} needs a reference head V_ref, and the data module provides none"):
        tiny_trainer(max_epochs=1).fit(model(), datamodule=ArrayData(splits))


@pytest.mark.parametrize("shots", [0, -3])
def test_shots_must_be_positive(shots, tmp_path):
    from lore_pl import DataRequest, FewShotSettings

    with pytest.raises(LoreDataError, match=f"shots must be a positive number of pairs per user .*got {shots}"):
        FewShotSettings(shots=shots)
    with pytest.raises(LoreDataError, match=f"shots must be a positive number of pairs per user .*got {shots}"):
        DataRequest(population="unseen", shots=shots)


def test_protocol_without_unseen_users_stops_before_training():
    from callbacks import ProtocolEvaluation

    splits, head = population(unseen=False)
    model = BasisModule(estimator="adam", rank=2)
    with pytest.raises(LoreDataError, match="ProtocolEvaluation adapts unseen users few-shot, but ArrayData has no "
                                            "unseen users"):
        tiny_trainer(max_epochs=5, callbacks=[ProtocolEvaluation()]).fit(
            model, datamodule=ArrayData(splits, head))
    assert int(model.iterations_done) == 0  # stopped in setup, nothing trained


def test_fewshot_without_unseen_users(tmp_path):
    splits, head = population(unseen=False)
    with pytest.raises(LoreDataError, match="ArrayData has no unseen users with few-shot pool pairs"):
        tiny_trainer(max_epochs=1).fit(FewShotModule.from_basis(torch.randn(6, 2)), datamodule=ArrayData(splits, head))


# ------------------------------------------------------------------------------ basis files, ckpts
def test_a_basis_file_of_another_dimension_names_the_file(tiny_data, tmp_path):
    path = save_basis(tmp_path / "other.safetensors", BasisFile(torch.randn(8, 3), 100.0))
    with pytest.raises(LoreDataError, match=rf"the basis {path} has d=8 but SyntheticPopulationDataModule has d=16"):
        tiny_trainer(max_epochs=1).fit(FewShotModule(basis_path=str(path)), datamodule=tiny_data)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    data = SyntheticPopulationDataModule(**TINY)
    trainer = tiny_trainer(max_epochs=2, enable_checkpointing=True,
                           default_root_dir=str(tmp_path_factory.mktemp("ckpt")))
    trainer.fit(BasisModule(estimator="adam", rank=3), datamodule=data)
    return trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path


@pytest.mark.parametrize("change, what", [
    (dict(rank=2), "rank: checkpoint 3, data/model 2"),
    (dict(dim=12), "feature_dim: checkpoint 16, data/model 12"),
])
def test_resuming_from_a_checkpoint_of_another_shape_names_the_file(tiny_checkpoint, change, what):
    data = SyntheticPopulationDataModule(**{**TINY, **{k: v for k, v in change.items() if k == "dim"}})
    model = BasisModule(estimator="adam", rank=change.get("rank", 3))
    with pytest.raises(LoreDataError, match=rf"checkpoint {tiny_checkpoint} does not match this run \({what}\)"):
        tiny_trainer(max_epochs=4).fit(model, datamodule=data, ckpt_path=tiny_checkpoint)


def test_a_loaded_checkpoint_on_other_data(tiny_checkpoint):
    model = BasisModule.load_from_checkpoint(tiny_checkpoint)
    data = SyntheticPopulationDataModule(**{**TINY, "dim": 12})
    with pytest.raises(LoreDataError, match="built for 12 users x d=16, but SyntheticPopulationDataModule has 12 seen "
                                            "users x d=12"):
        tiny_trainer().test(model, datamodule=data)


# -------------------------------------------------------------------------------- preference file
GOOD = {"user_id": "a", "prompt": "hello", "chosen": "yes", "rejected": "no"}


@pytest.mark.parametrize("row, message", [
    ({"user_id": "a", "prompt": "hello", "chosen": "yes"}, "line 2: field 'rejected' \\(rejected\\) is missing"),
    ({**GOOD, "user_id": None}, "line 2: field 'user_id' \\(user_id\\) is missing"),
    ({**GOOD, "user_id": "  "}, "line 2: field 'user_id' is empty"),
    ({**GOOD, "user_id": ["a"]}, "line 2: field 'user_id' must be a string or a number"),
    ({**GOOD, "chosen": ""}, "line 2: field 'chosen' must be a non-empty string"),
    ({**GOOD, "rejected": 3}, "line 2: field 'rejected' must be a non-empty string"),
    ({**GOOD, "chosen": "no"}, "line 2: fields 'chosen' and 'rejected' are identical"),
    ({**GOOD, "prompt": " "}, "line 2: field 'prompt': the prompt is empty"),
    ({**GOOD, "prompt": {"role": "user"}}, "line 2: field 'prompt': the prompt must be a non-empty string or chat"),
    ({**GOOD, "prompt": [{"role": "user", "content": 5}]}, "line 2: field 'prompt': every chat turn needs string"),
    (["a", "hello", "yes", "no"], "line 2: a row must be an object"),
])
def test_malformed_rows_name_the_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LoreDataError, match=f"prefs.jsonl: {message}"):
        parse_rows(path, read_records(path), COLUMNS)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"user_id": "a"}\n{not json\n', "bad.jsonl: line 2 is not valid JSON"),
    ("bad.json", "[1, 2", "bad.json: not a readable .json file"),
    ("bad.json", '{"rows": 3}', "bad.json: expected a JSON list of rows"),
    ("bad.parquet", "not parquet", "bad.parquet: not a readable .parquet file"),
    ("bad.txt", "", "bad.txt: unsupported file type '.txt'"),
])
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LoreDataError, match=message):
        read_records(tmp_path / name)


def test_an_empty_file_has_no_rows(tmp_path):
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(LoreDataError, match=f"{name}: no rows"):
            parse_rows(tmp_path / name, read_records(tmp_path / name), COLUMNS)



def write_lines(path, *rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_every_bad_row_is_reported_at_once_by_its_line_blank_lines_counted(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", GOOD, "", {**GOOD, "chosen": ""}, "   ", GOOD,
                       {**GOOD, "user_id": None}, ["not", "a", "row"])
    with pytest.raises(LoreDataError) as error:
        parse_rows(path, read_records(path), COLUMNS)
    assert str(error.value).splitlines() == [
        f"{path}: 3 bad rows (skip them with skip_bad_rows: true):",
        "  line 3: field 'chosen' must be a non-empty string, got ''",
        "  line 6: field 'user_id' (user_id) is missing",
        "  line 7: a row must be an object with fields ['chosen', 'prompt', 'rejected', 'user_id'], got list",
    ]


def test_the_list_of_bad_rows_is_capped_and_counts_the_rest(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", *[{**GOOD, "chosen": ""}] * 25)
    with pytest.raises(LoreDataError) as error:
        parse_rows(path, read_records(path), COLUMNS)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("25 bad rows (skip them with skip_bad_rows: true):") and len(lines) == 1 + 20 + 1
    assert lines[20].startswith("  line 20:") and lines[-1] == "  ... and 5 more"


def test_skipping_bad_rows_keeps_the_good_ones_and_lists_the_rest(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", GOOD, {**GOOD, "chosen": " no "}, {**GOOD, "user_id": "b"})
    items, table = parse_rows(path, read_records(path), COLUMNS, skip_bad_rows=True)
    assert table["user"] == ["a", "b"] and len(items) == 2  # the two good rows share their two items
    assert table["skipped"] == [{"where": "line 2", "row": {**GOOD, "chosen": " no "},
                                 "reason": "fields 'chosen' and 'rejected' are identical up to whitespace"}]
    only_bad = write_lines(tmp_path / "bad.jsonl", {**GOOD, "chosen": ""})
    with pytest.raises(LoreDataError, match="no rows left after skipping 1 bad rows"):
        parse_rows(only_bad, read_records(only_bad), COLUMNS, skip_bad_rows=True)


def test_bytes_that_are_not_utf8_are_named_by_line_and_byte(tmp_path):
    (tmp_path / "prefs.jsonl").write_bytes(b'{"a": 1}\n\n{"user_id": "caf\xe9"}\n')
    with pytest.raises(LoreDataError, match=r"prefs.jsonl: line 3, byte 17: not UTF-8 text .*\\xe9"):
        read_records(tmp_path / "prefs.jsonl")
    (tmp_path / "prefs.csv").write_bytes(b"user_id,prompt\nok,fine\nb,\xff\xfe\n")
    with pytest.raises(LoreDataError, match=r"prefs.csv: line 3, byte 3: not UTF-8 text"):
        read_records(tmp_path / "prefs.csv")


def test_csv_rows_know_their_lines_and_read_chat_lists_back_as_lists(tmp_path):
    import pandas as pd

    chat = [{"role": "system", "content": "be short"}, {"role": "user", "content": "hi"}]
    rows = [{**GOOD, "prompt": chat}, {**GOOD, "prompt": "two\nlines", "chosen": ""}, GOOD]
    path = tmp_path / "prefs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)  # writes the chat list as its Python repr
    records = read_records(path)
    assert records.where == ["line 2", "line 3", "line 5"] and records[0]["prompt"] == chat
    with pytest.raises(LoreDataError, match="prefs.csv: line 3: field 'chosen' must be a non-empty string"):
        parse_rows(path, records, COLUMNS)
    hostile = tmp_path / "hostile.csv"
    hostile.write_text('user_id,prompt\na,"[__import__(\'os\').system(\'touch pwned\'), \'role\']"\n')
    assert isinstance(read_records(hostile)[0]["prompt"], str) and not Path("pwned").exists()

# ----------------------------------------------------------------------------------- feature cache
def filled_cache(tmp_path, dims=(4, 4, 4)):
    cache = FeatureCache(tmp_path / "cache", {"test": 1})
    cache.initialize([f"item {i}" for i in range(3 * len(dims))], shard_size=3)
    for shard, d in enumerate(dims):
        cache.write_shard(shard, np.random.default_rng(shard).standard_normal((3, d)).astype(np.float32))
    return cache


def test_shards_of_different_dimensions_are_named(tmp_path):
    cache = filled_cache(tmp_path, dims=(4, 5, 4))
    with pytest.raises(LoreDataError, match=r"shards have different embedding dimensions \{4: 'shard-00000.npy', "
                                            r"5: 'shard-00001.npy'\}"):
        cache.finalize()


@pytest.mark.parametrize("damage, what", [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), r"\d+ bytes, the manifest says \d+ \(truncated\?\)"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\x00\x00\x80\x7f"), "its sha256 differs"),
    (lambda p: p.unlink(), "missing"),
])
def test_a_damaged_shard_is_detected_by_the_manifest(tmp_path, damage, what):
    cache = filled_cache(tmp_path)
    cache.finalize()
    expected = cache.load()[0].clone()
    damage(cache.shard_path(1))
    assert list(cache.verify()) == [1]
    with pytest.raises(LoreDataError, match=f"1 damaged shard\\(s\\), e.g. shard-00001.npy: {what}"):
        cache.load(checksums=True)
    cache.invalidate([1])  # what prepare_data does before re-embedding
    assert not cache.is_complete() and cache.missing_shards() == [1]
    cache.write_shard(1, expected[3:6])
    cache.finalize()
    assert torch.equal(cache.load(checksums=True)[0], expected)


def test_a_damaged_shard_is_re_embedded_by_the_data_module(tmp_path, tiny_reward_model, monkeypatch):
    from helpers import make, write_preferences
    from lore_pl.data.embedder import TextEmbedder

    write_preferences(tmp_path / "prefs.jsonl")
    first = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    first.setup("fit")
    cache = first.feature_cache
    expected = cache.load()[0].clone()
    shard = cache.shard_path(2)
    shard.write_bytes(shard.read_bytes()[:-40] + bytes(40))  # same size, other bytes: only the sha256 sees it
    calls = []
    original = TextEmbedder.forward
    monkeypatch.setattr(TextEmbedder, "forward", lambda self, items: calls.append(len(items)) or original(self, items))
    second = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    damaged = "re-embedding 1 damaged shard\\(s\\): shard-00002.npy: its sha256 differs"
    with pytest.warns(LoreDataWarning, match=damaged):
        second.setup("fit")
    assert len(calls) == 1  # only the damaged shard
    torch.testing.assert_close(cache.load(checksums=True)[0], expected)
    assert torch.equal(second.split("seen_train").features, first.split("seen_train").features)


class _Payload:
    """Unpickling this runs code: it touches a file (a stand-in for anything worse)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_could_run_code_is_refused(tmp_path, tiny_data):
    from lore_pl import PersonalRewardModel, load_basis

    trainer = tiny_trainer(max_epochs=1)
    trainer.fit(BasisModule(estimator="adam", rank=2), datamodule=tiny_data)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    checkpoint = torch.load(tmp_path / "good.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = _Payload(tmp_path / "pwned")
    torch.save(checkpoint, tmp_path / "hostile.ckpt")
    from lore_pl.cli import main
    from lore_pl.data.basis_file import read_reference_head
    from lore_pl.modules.scoring import ScoringModule

    def resume(path):
        main(["fit", "--model=lore_pl.BasisModule", "--data=datamodules.SyntheticPopulationDataModule",
              "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"])

    loaders = {"load_basis": load_basis, "PersonalRewardModel.load": PersonalRewardModel.load,
               "reference_head_file": read_reference_head,
               "lightning predict (ScoringModule)": lambda path: ScoringModule(str(path)).setup("predict"),
               "BasisModule(initial_basis)": lambda path: BasisModule(initial_basis=str(path))._given_initial()}
    for name, load in loaders.items():
        with pytest.raises(LoreDataError, match="hostile.ckpt: refused: .* could run code"):
            load(tmp_path / "hostile.ckpt")
        assert not (tmp_path / "pwned").exists(), name
    with pytest.raises(SystemExit) as stopped:  # the command line, --ckpt_path: one line, exit 2
        resume(tmp_path / "hostile.ckpt")
    assert stopped.value.code == 2
    module = FewShotModule(basis_path=str(tmp_path / "hostile.ckpt"))
    with pytest.raises(LoreDataError, match="refused"):
        tiny_trainer(max_epochs=1).fit(module, datamodule=tiny_data)
    assert not (tmp_path / "pwned").exists()  # the payload never ran
    assert load_basis(tmp_path / "good.ckpt").rank == 2
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:100])
    with pytest.raises(LoreDataError, match="truncated.ckpt: not a readable checkpoint"):
        load_basis(tmp_path / "truncated.ckpt")


# ------------------------------------------------------------------------ every file error names its file
def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def test_unreadable_files_of_every_kind_name_the_file(tmp_path):
    from datamodules import CandidateFileDataModule, MemmapPreferenceDataModule, write_memmap_dataset
    from lore_pl import load_basis

    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save({"scores": torch.zeros(3, 4)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(0, 4), tmp_path / "none.pt")
    memmap = write_memmap_dataset(tmp_path / "memmap", SyntheticPopulationDataModule(**TINY).data)
    _truncate(memmap / "seen_train.features.npy", keep=200)
    cache = filled_cache(tmp_path)
    cache.finalize()
    cache.manifest_path.write_text('{"key": {"test": 1}, "num_items": ')  # cut off mid-write by another tool
    checks = [
        (lambda: load_basis(tmp_path / "empty.ckpt"), r"empty.ckpt: not a readable checkpoint \(the file is empty\)"),
        (lambda: load_basis(tmp_path / "empty.safetensors"),
         r"empty.safetensors: not a readable safetensors basis file \(the file is empty\)"),
        (lambda: CandidateFileDataModule(str(tmp_path / "empty.safetensors")).setup(),
         r"empty.safetensors: not a readable candidate embeddings file \(the file is empty\)"),
        (lambda: CandidateFileDataModule(str(tmp_path / "dict.pt")).setup(),
         r"dict.pt: the candidate embeddings file must hold a tensor \(or a dict with 'embeddings'\), found a dict "
         r"with keys \['scores'\]"),
        (lambda: CandidateFileDataModule(str(tmp_path / "none.pt")).setup(),
         r"none.pt: candidate embeddings must be a non-empty \[n, d\] matrix, got shape \(0, 4\)"),
        (lambda: MemmapPreferenceDataModule(str(memmap)).setup(),
         r"seen_train.features.npy: not a readable memmap features \(ValueError: mmap length is greater"),
        (lambda: cache.is_complete(), r"manifest.json: not a readable feature cache manifest \(JSONDecodeError"),
    ]
    for call, message in checks:
        with pytest.raises(LoreDataError, match=message):
            call()


def test_candidate_embeddings_with_nan_are_refused_by_position(tmp_path):
    from datamodules import CandidateFileDataModule

    embeddings = torch.zeros(5, 3)
    embeddings[3, 1] = float("nan")
    np.save(tmp_path / "candidates.npy", embeddings.numpy())
    with pytest.raises(LoreDataError, match=r"candidates.npy: 1 non-finite value\(s\) .* candidate 3, dimension 1"):
        CandidateFileDataModule(str(tmp_path / "candidates.npy")).setup()


@pytest.mark.parametrize("build, message", [
    (lambda: SyntheticPopulationDataModule(**{**TINY, "batch_size": 0}), "batch_size must be a number of pairs >= 1"),
    (lambda: SyntheticPopulationDataModule(**{**TINY, "eval_batch_size": -4}), "eval_batch_size must be"),
    (lambda: SyntheticPopulationDataModule(**{**TINY, "val_fraction": 1.0}), r"val_fraction must be in \[0, 1\)"),
    (lambda: BasisModule(estimator="adam", rank=2, prune_threshold=1.5), "prune_threshold must be in"),
    (lambda: FewShotSettings(steps=-1), "steps must be >= 0"),
])
def test_option_ranges_are_checked_where_they_are_read(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_embedder_options_are_checked():
    from lore_pl.data.embedder import EmbedderSpec

    with pytest.raises(ValueError, match="dtype must be 'bfloat16', 'float16' or 'float32', got 'int8'"):
        EmbedderSpec(dtype="int8")
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        EmbedderSpec(max_length=1)


def test_a_line_cut_short_is_a_bad_row_reported_with_the_others_or_skipped(tmp_path):
    cut = json.dumps(GOOD)[:25]  # a line a crash cut short
    path = write_lines(tmp_path / "prefs.jsonl", GOOD, cut, {**GOOD, "chosen": ""}, {**GOOD, "user_id": "b"})
    with pytest.raises(LoreDataError) as error:
        parse_rows(path, read_records(path, keep_bad_lines=True), COLUMNS)
    assert str(error.value).splitlines() == [
        f"{path}: 2 bad rows (skip them with skip_bad_rows: true):",
        "  line 2: not valid JSON (Expecting ':' delimiter at character 26 of 25)",
        "  line 3: field 'chosen' must be a non-empty string, got ''",
    ]
    _, table = parse_rows(path, read_records(path, keep_bad_lines=True), COLUMNS, skip_bad_rows=True)
    assert table["user"] == ["a", "b"]
    assert table["skipped"][0] == {"where": "line 2", "reason": "not valid JSON (Expecting ':' delimiter at "
                                                                "character 26 of 25)", "row": cut}
    with pytest.raises(LoreDataError, match="line 2 is not valid JSON"):  # readers of other files: an error
        read_records(path)
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"user_id": "caf\xe9"}\n')
    _, table = parse_rows(tmp_path / "latin1.jsonl", read_records(tmp_path / "latin1.jsonl", keep_bad_lines=True),
                          COLUMNS, skip_bad_rows=True)
    assert table["user"] == ["a"] and table["skipped"][0]["reason"].startswith("byte 17: not UTF-8 text")
