import subprocess
import sys
import time

import pytest
import torch

from helpers import one_error_line
from lore_pl import BasisFile, PersonalRewardModel, save_basis
from lore_pl.core import fewshot as FS
from lore_pl.core import functional as LF


@pytest.fixture
def model(tmp_path):
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 3, generator=generator)
    weights = torch.softmax(torch.randn(4, 3, generator=generator), dim=1)
    path = tmp_path / "basis.safetensors"
    save_basis(path, BasisFile(basis, 10.0, torch.randn(8, generator=generator), ["a", "b", "c", "d"], weights,
                               embedder="tiny-encoder@rev1"))
    return PersonalRewardModel.load(path), basis, weights, path


def test_the_exported_file_reloads_to_identical_scores(model, tmp_path):
    loaded, basis, weights, _ = model
    embeddings = torch.randn(5, 8)
    expected = embeddings @ (basis @ weights[2])  # the personal head V w_u, then every response
    assert torch.equal(loaded.score(embeddings, "c"), expected)
    loaded.save(tmp_path / "again.safetensors")
    again = PersonalRewardModel.load(tmp_path / "again.safetensors")
    assert torch.equal(again.score(embeddings, "c"), expected)
    assert again.embedder == "tiny-encoder@rev1" and again.tau == 10.0 and again.user_ids == ["a", "b", "c", "d"]


def test_ranking_agrees_with_the_scores(model):
    loaded, *_ = model
    candidates = torch.randn(20, 8)
    for user in loaded.user_ids:
        order = loaded.rank(candidates, user)
        scores = loaded.score(candidates, user)
        assert torch.all(scores[order][:-1] >= scores[order][1:])
        assert order[0] == torch.argmax(scores)


def test_preference_probability(model):
    loaded, basis, weights, _ = model
    chosen, rejected = torch.randn(3, 8), torch.randn(3, 8)
    expected = torch.sigmoid((chosen - rejected) @ basis @ weights[0] / 10.0)
    torch.testing.assert_close(loaded.preference_probability(chosen, rejected, "a"), expected)


def test_personalize_a_new_user_matches_the_batched_fit_and_is_fast(model):
    loaded, basis, weights, _ = model
    chosen, rejected = torch.randn(6, 8), torch.randn(6, 8)
    start = time.perf_counter()
    w = loaded.personalize("new", chosen, rejected, steps=500)
    elapsed = time.perf_counter() - start
    prior = LF.population_logits(weights)
    expected = FS.fit_user_weights(LF.project(chosen - rejected, basis), torch.zeros(6, dtype=torch.long),
                                   prior[None].clone(), steps=500, tau=10.0)
    torch.testing.assert_close(w, torch.softmax(expected[0], dim=0))
    assert loaded.user_ids[-1] == "new" and torch.equal(loaded.weights("new"), w)
    assert elapsed < 5.0  # generous bound for a loaded CI machine; the README quotes the real figure
    w_again = loaded.personalize("new", chosen, rejected, steps=10)  # refit replaces, does not append
    assert loaded.user_ids.count("new") == 1 and torch.equal(loaded.weights("new"), w_again)


def test_bad_input(model):
    loaded, *_ = model
    with pytest.raises(KeyError, match="unknown user 'zed'"):
        loaded.score(torch.randn(8), "zed")
    with pytest.raises(ValueError, match="d=7, the basis has d=8"):
        loaded.score(torch.randn(2, 7), "a")


def test_scoring_needs_no_lightning():
    code = "import sys, lore_pl.inference; sys.exit(1 if 'lightning' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused_at_every_entry_point_and_nothing_changes(model, tmp_path, bad):
    loaded, *_ = model
    before_ids, before_weights = list(loaded.user_ids), loaded.user_weights.clone()
    poisoned = torch.randn(4, 8)
    poisoned[2, 5] = bad
    fine = torch.randn(4, 8)
    calls = {
        "score": lambda: loaded.score(poisoned, "a"),
        "rank": lambda: loaded.rank(poisoned, "a"),
        "preference_probability": lambda: loaded.preference_probability(fine, poisoned, "a"),
        "score_std": lambda: loaded.score_std(poisoned, "a"),
        "personalize a new user": lambda: loaded.personalize("new", poisoned, fine),
        "personalize a known user": lambda: loaded.personalize("b", fine, poisoned),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="non-finite value.* at row 2") as error:
            call()
        assert "nothing was scored or stored" in str(error.value), name
    assert loaded.user_ids == before_ids and torch.equal(loaded.user_weights, before_weights)
    huge = torch.full((1, 8), 3e38)
    with pytest.raises(ValueError, match="overflow; nothing was stored"):
        loaded.personalize("new", huge, -huge)
    assert loaded.user_ids == before_ids


def test_a_basis_file_with_nan_is_refused_on_load(tmp_path):
    from safetensors.torch import save_file

    weights = torch.full((2, 3), 1 / 3)
    weights[1, 0] = float("nan")
    poisoned = BasisFile(torch.randn(8, 3), 1.0, None, ["a", "b"], weights)
    with pytest.raises(ValueError, match="refusing to write .*poisoned.safetensors: field 'user_weights': holds NaN"):
        save_basis(tmp_path / "poisoned.safetensors", poisoned)  # save_basis writes no such file
    assert not (tmp_path / "poisoned.safetensors").exists()
    save_file({"basis": poisoned.basis, "user_weights": weights}, str(tmp_path / "poisoned.safetensors"),
              metadata={"format": "lore-pl-basis/1", "tau": "1.0", "user_ids": '["a", "b"]'})
    with pytest.raises(ValueError, match="poisoned.safetensors: field 'user_weights': holds NaN or Inf"):
        PersonalRewardModel.load(tmp_path / "poisoned.safetensors")


# ---------------------------------------------------------------- many users, cached weights, top-k (issue 22)
def test_score_users_is_each_user_s_score_in_one_product(model):
    loaded, basis, weights, _ = model
    embeddings = torch.randn(30, 8)
    table = loaded.score_users(embeddings, ["c", "a", "c", "d"])
    assert table.shape == (30, 4)
    for column, user in enumerate(["c", "a", "c", "d"]):
        torch.testing.assert_close(table[:, column], loaded.score(embeddings, user), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(table[:, 1], embeddings @ (basis @ weights[0]), rtol=1e-6, atol=1e-6)
    assert loaded.score_users(torch.randn(8), ["b"]).shape == (1, 1)  # one response [d]
    torch.testing.assert_close(loaded.heads(["a", "d"]), basis @ weights[[0, 3]].t())


def test_the_cached_weights_follow_every_change_of_the_users(model):
    loaded, basis, weights, _ = model
    embeddings = torch.randn(10, 8)
    old_c = loaded.score(embeddings, "c")  # fills the cache
    chosen, rejected = torch.randn(6, 8), torch.randn(6, 8)
    new = loaded.personalize("new", chosen, rejected, steps=50)  # a user added
    torch.testing.assert_close(loaded.score(embeddings, "new"), embeddings @ (basis @ new))
    torch.testing.assert_close(loaded.score_users(embeddings, ["new"])[:, 0], embeddings @ (basis @ new))
    refit = loaded.personalize("c", chosen, rejected, steps=50)  # a stored user refitted in place
    assert not torch.allclose(refit, weights[2])
    torch.testing.assert_close(loaded.score(embeddings, "c"), embeddings @ (basis @ refit))
    assert not torch.allclose(loaded.score(embeddings, "c"), old_c)
    observed = loaded.observe("asked", torch.randn(2, 8), 0)  # observe adds a user too
    torch.testing.assert_close(loaded.weights("asked"), observed)
    with torch.no_grad():  # the model changed by hand, in place: the cache sees it
        loaded.model.user_logits[0] = torch.tensor([5.0, 0.0, 0.0])
    torch.testing.assert_close(loaded.weights("a"), torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0))
    loaded.weights("a")[0] = 123.0  # a copy: the cache is not the caller's to change
    assert float(loaded.weights("a")[0]) < 1


def test_top_k_is_the_first_k_of_rank_with_ties_in_candidate_order(model):
    loaded, *_ = model
    distinct = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    candidates = distinct[torch.tensor([3, 0, 3, 5, 1, 0, 3, 2, 4, 5])]  # tied rewards, across every k
    for user in loaded.user_ids:
        order = loaded.rank(candidates, user)
        assert torch.equal(order, torch.argsort(loaded.score(candidates, user), descending=True, stable=True))
        for k in range(len(candidates) + 2):
            assert torch.equal(loaded.top_k(candidates, user, k), order[:k]), (user, k)


def test_all_finite_is_exact_when_the_sum_overflows():
    from lore_pl.core.finite import all_finite, non_finite_rows

    huge = torch.full((4, 3), 3e38)  # finite entries whose sum is Inf
    assert all_finite(huge) and non_finite_rows(huge).numel() == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = huge.clone()
        poisoned[2, 1] = bad
        assert not all_finite(poisoned) and non_finite_rows(poisoned).tolist() == [2]
    assert all_finite(torch.zeros(0, 3)) and all_finite(torch.arange(3))


@pytest.mark.parametrize("zero_row", [False, True], ids=["heads without zeros", "a head with a zero"])
def test_non_finite_rows_are_named_wherever_they_are(zero_row):
    """The product is checked, not the embeddings: NaN and Inf anywhere in a row still refuse it, in the
    vectorised kernels' body and tail columns, and where a head is exactly 0 (Inf * 0 is NaN)."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(300, 3, generator=generator)
    if zero_row:
        basis[150] = 0.0
    loaded = PersonalRewardModel(BasisFile(basis, 1.0, None, ["a", "b"],
                                           torch.softmax(torch.randn(2, 3, generator=generator), 1)))
    embeddings = torch.randn(64, 300, generator=generator)
    embeddings[3, 0], embeddings[40, 299], embeddings[41, 150] = float("nan"), float("inf"), -float("inf")
    calls = {"score": lambda: loaded.score(embeddings, "a"), "rank": lambda: loaded.rank(embeddings, "b"),
             "top_k": lambda: loaded.top_k(embeddings, "a", 2),
             "score_users": lambda: loaded.score_users(embeddings, ["a", "b"]),
             "score_std": lambda: loaded.score_std(embeddings, "a")}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"3 non-finite value\(s\) in the embeddings, the first at row 3 "
                                             r"\(3 row\(s\): 3, 40, 41\); nothing was scored or stored"):
            call()
            pytest.fail(name)
    only_the_zero_column = torch.randn(5, 300, generator=generator)
    only_the_zero_column[4, 150] = float("inf")
    with pytest.raises(ValueError, match="the first at row 4"):
        loaded.score(only_the_zero_column, "a")


# ---------------------------------------------------------------- lightning predict: streamed, columnar outputs
PREDICT_USERS = ["u1", "u2", "u3"]


@pytest.fixture
def scoring_run(tmp_path, monkeypatch):
    """A basis and 5 candidates (scored 2 at a time); cwd is tmp_path (the CLI saves its config there)."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    save_basis(tmp_path / "basis.safetensors", BasisFile(torch.randn(6, 2, generator=generator), 1.0, None,
                                                         PREDICT_USERS,
                                                         torch.softmax(torch.randn(3, 2, generator=generator), -1)))
    candidates = torch.randn(5, 6, generator=generator)
    save_file({"embeddings": candidates}, str(tmp_path / "candidates.safetensors"))
    return tmp_path, candidates


def run_predict(folder, output, *extra):
    from helpers import ROOT
    from lore_pl.cli import main

    main(["predict", "--config", str(ROOT / "configs/experiment/score.yaml"),
          f"--model.init_args.basis_path={folder / 'basis.safetensors'}",
          f"--data.init_args.path={folder / 'candidates.safetensors'}", "--data.init_args.batch_size=2",
          f"--model.init_args.output={output}", "--trainer.accelerator=cpu", "--trainer.devices=1",
          "--trainer.enable_progress_bar=false", *extra])


def predict_refused(capsys, folder, output, *extra):
    return one_error_line(capsys, run_predict, folder, output, *extra)


def read_scores(path):
    """(candidate rows, user ids, scores [n, users]) of any of predict's outputs."""
    import csv
    import json

    import numpy as np

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        users = table.column_names[1:]
        return (table.column("candidate").to_pylist(), users,
                torch.tensor(np.stack([table.column(user).to_numpy() for user in users], 1)))
    if path.suffix == ".npy":
        index = json.loads(path.with_suffix(".index.json").read_text())
        scores = torch.from_numpy(np.load(path, allow_pickle=False))
        return list(range(index["candidates"])), index["users"], scores
    with open(path, newline="") as stream:
        rows = list(csv.reader(stream))
    return ([int(row[0]) for row in rows[1:]], rows[0][1:],
            torch.tensor([[float(value) for value in row[1:]] for row in rows[1:]]))


def test_predict_writes_the_same_scores_as_csv_parquet_and_npy(scoring_run):
    pytest.importorskip("pyarrow")
    folder, candidates = scoring_run
    expected = PersonalRewardModel.load(folder / "basis.safetensors").score_users(candidates, PREDICT_USERS)
    for name in ("scores.csv", "scores.parquet", "scores.npy"):
        run_predict(folder, folder / name)
        rows, users, scores = read_scores(folder / name)
        assert rows == [0, 1, 2, 3, 4] and users == PREDICT_USERS, name
        tolerance = 1e-5 if name.endswith(".csv") else 0  # the CSV holds 6 significant digits
        torch.testing.assert_close(scores, expected, rtol=tolerance, atol=tolerance)
    run_predict(folder, folder / "two.parquet", '--model.init_args.users=["u3", "u1"]')
    assert read_scores(folder / "two.parquet")[1] == ["u3", "u1"]
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".*.lock"))


@pytest.mark.parametrize("name", ["scores.parquet", "scores.npy", "scores.index.json"])
def test_columnar_outputs_are_refused_replaced_and_overwritten_like_the_csv(scoring_run, capsys, name):
    pytest.importorskip("pyarrow")
    folder, _ = scoring_run
    target = folder / name
    target.write_bytes(b"PAR1 my own notes")  # a file predict did not write
    output = folder / ("scores.npy" if name.endswith(".json") else name)
    line = predict_refused(capsys, folder, output)
    assert f"{target}: refusing to replace a file that lightning predict did not write" in line, line
    assert target.read_bytes() == b"PAR1 my own notes"
    assert "an input of this command" in predict_refused(capsys, folder, folder / "candidates.safetensors",
                                                         "--overwrite=true")
    run_predict(folder, output, "--overwrite=true")  # told to: replaced
    first = read_scores(output)[2]
    run_predict(folder, output)  # its own output: replaced without being told
    assert torch.equal(read_scores(output)[2], first)
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".*.lock"))


def test_a_failure_mid_prediction_leaves_the_earlier_output_whole(scoring_run, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    from lore_pl.errors import LoreDataError
    from lore_pl.modules.scoring import ScoringModule

    folder, _ = scoring_run
    for name in ("scores.parquet", "scores.npy", "scores.csv"):
        run_predict(folder, folder / name)
    before = {path: path.read_bytes() for path in folder.glob("scores.*")}
    original = ScoringModule.predict_step

    def fails_on_the_second_batch(self, batch, batch_idx):
        if batch_idx == 1:
            raise LoreDataError("a failure after the first batch was written")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ScoringModule, "predict_step", fails_on_the_second_batch)
    for name in ("scores.parquet", "scores.npy", "scores.csv"):
        assert predict_refused(capsys, folder, folder / name) == "error: a failure after the first batch was written"
    assert {path: path.read_bytes() for path in folder.glob("scores.*")} == before
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".*.lock"))
