"""The fused CPU kernel against the PyTorch autograd path: same loss, logits and gradients."""

import shutil

import pytest
import torch

from lore_pl.core import cpu_kernel
from lore_pl.core import functional as LF

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def problem(num_users=6, rows=40, dim=37, rank=3, seed=0, sorted_users=False, empty_user=True):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=generator)
    users = torch.randint(0, num_users - int(empty_user), (rows,), generator=generator)
    if sorted_users:
        users = users.sort().values
    basis = torch.randn(dim, rank, generator=generator)
    logits = torch.randn(num_users, rank, generator=generator)
    return features, users, basis, logits


def loss_and_grads(features, users, basis, user_logits, fused, weighting="pair_mean", counts=None, scale=1.0,
                   train_basis=True, tau=2.0):
    basis = basis.clone().requires_grad_(train_basis)
    user_logits = user_logits.clone().requires_grad_()
    loss, logits = LF.pair_loss(features, users, basis, LF.simplex_weights(user_logits), tau, weighting, counts,
                                scale, fused=fused)
    loss.backward()
    return loss.detach(), logits, basis.grad, user_logits.grad


@needs_compiler
def test_the_kernel_builds_where_a_compiler_is():
    # CI has a compiler: if the build broke, every other kernel test would silently test PyTorch twice
    assert cpu_kernel.available()


@needs_compiler
@pytest.mark.parametrize("weighting", ["pair_mean", "user_mean"])
@pytest.mark.parametrize("rank,dim,sorted_users", [(1, 8, True), (3, 37, False), (7, 64, False), (5, 130, True)])
def test_kernel_matches_autograd(weighting, rank, dim, sorted_users):
    features, users, basis, user_logits = problem(dim=dim, rank=rank, sorted_users=sorted_users)
    fused = loss_and_grads(features, users, basis, user_logits, True, weighting)
    plain = loss_and_grads(features, users, basis, user_logits, False, weighting)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    assert fused[3][-1].abs().sum() == 0  # the user with no pairs gets no gradient


@needs_compiler
def test_kernel_takes_ddp_counts_and_scale():
    features, users, basis, user_logits = problem()
    counts = torch.bincount(users, minlength=6) * 2 + 1  # a shard of a bigger step batch
    for weighting in ("pair_mean", "user_mean"):
        fused = loss_and_grads(features, users, basis, user_logits, True, weighting, counts, scale=2.0)
        plain = loss_and_grads(features, users, basis, user_logits, False, weighting, counts, scale=2.0)
        for got, want in zip(fused, plain):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


@needs_compiler
def test_frozen_basis_gets_no_gradient_and_weights_still_do():
    features, users, basis, user_logits = problem()
    fused = loss_and_grads(features, users, basis, user_logits, True, train_basis=False)
    plain = loss_and_grads(features, users, basis, user_logits, False, train_basis=False)
    assert fused[2] is None
    torch.testing.assert_close(fused[3], plain[3], rtol=2e-5, atol=1e-6)


@needs_compiler
def test_result_does_not_depend_on_the_number_of_threads():
    features, users, basis, user_logits = problem(num_users=9, rows=300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(features, users, basis, user_logits, True)
        torch.set_num_threads(3)
        three = loss_and_grads(features, users, basis, user_logits, True)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(three, one):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_switched_off_it_falls_back_to_pytorch(monkeypatch):
    monkeypatch.setenv("LORE_PL_CPU_KERNEL", "0")
    features, users, basis, user_logits = problem()
    assert not cpu_kernel.applies(features, basis)
    loss, logits, _, _ = loss_and_grads(features, users, basis, user_logits, True)
    torch.testing.assert_close(logits, LF.pair_logits(features, users, basis, LF.simplex_weights(user_logits), 2.0))


def test_no_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_library", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LORE_PL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        assert not cpu_kernel.available()
    features, users, basis, user_logits = problem()
    fused = loss_and_grads(features, users, basis, user_logits, True)
    plain = loss_and_grads(features, users, basis, user_logits, False)
    torch.testing.assert_close(fused[0], plain[0])
    assert not list((tmp_path / "cache").glob("*.partial"))


@needs_compiler
def test_the_build_is_cached_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("LORE_PL_CACHE_DIR", str(tmp_path))
    built = cpu_kernel._compile("cc")
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert cpu_kernel._compile("cc") == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no partial files left behind


@needs_compiler
def test_without_openmp_a_thread_pool_gives_the_same_result(monkeypatch, tmp_path):
    features, users, basis, user_logits = problem(num_users=9, rows=300)
    with_openmp = loss_and_grads(features, users, basis, user_logits, True)
    monkeypatch.setenv("LORE_PL_CACHE_DIR", str(tmp_path))
    library = cpu_kernel.ctypes.CDLL(str(cpu_kernel._compile("cc", extra=())))
    assert library.lore_has_openmp() == 0
    monkeypatch.setattr(cpu_kernel, "_library", None)
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_build", lambda compiler: library)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pooled = loss_and_grads(features, users, basis, user_logits, True)
    finally:
        torch.set_num_threads(threads)
    assert cpu_kernel._library is library
    for got, want in zip(pooled, with_openmp):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@needs_compiler
def test_bfloat16_features_give_the_float32_result_of_their_values():
    # the kernel widens bfloat16 on load: same numbers as float32 features holding the same values
    features, users, basis, user_logits = problem(dim=45, rank=4)
    narrow = features.to(torch.bfloat16)
    fused = loss_and_grads(narrow, users, basis, user_logits, True, "user_mean")
    wide = loss_and_grads(narrow.float(), users, basis, user_logits, True, "user_mean")
    plain = loss_and_grads(narrow, users, basis, user_logits, False, "user_mean")
    assert cpu_kernel.applies(narrow, basis)
    for got, want, other in zip(fused, wide, plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(other, want, rtol=2e-5, atol=1e-6)


def test_project_widens_bfloat16_block_by_block(monkeypatch):
    # several blocks, and the V gradient's block loop, on a tiny problem
    monkeypatch.setattr(LF, "UPCAST_CHUNK_BYTES", 4 * 37 * 3)
    monkeypatch.setattr(LF, "GRAD_CHUNK_BYTES", 2 * 37 * 5)
    features, _, basis, _ = problem(dim=37, rank=3)
    narrow = features.to(torch.bfloat16)
    weights = torch.randn(40, 3)
    grads = []
    for x in (narrow, narrow.float()):
        v = basis.clone().requires_grad_()
        projected = LF.project(x, v)
        assert projected.dtype == torch.float32
        (projected * weights).sum().backward()
        grads.append((projected.detach(), v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_storage_trains_and_evaluates_like_float32(tmp_path):
    from datamodules import SyntheticPopulationDataModule
    from helpers import TINY, tiny_trainer
    from lore_pl import BasisModule

    results = {}
    for dtype in ("float32", "bfloat16"):
        data = SyntheticPopulationDataModule(**TINY, feature_dtype=dtype)
        data.setup("fit")
        assert data.split("seen_train").features.dtype == getattr(torch, dtype)
        torch.manual_seed(0)
        model = BasisModule(estimator="adam", rank=3, lr=0.1, prune_threshold=0.0)
        trainer = tiny_trainer(30)
        trainer.fit(model, datamodule=data)
        accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
        results[dtype] = (model.model.basis.detach(), accuracy)
    torch.testing.assert_close(results["bfloat16"][0], results["float32"][0], rtol=0.05, atol=0.02)
    assert abs(results["bfloat16"][1] - results["float32"][1]) <= 0.02


def test_an_unknown_feature_dtype_is_refused():
    from datamodules import SyntheticPopulationDataModule
    from helpers import TINY

    with pytest.raises(ValueError, match="feature_dtype must be one of"):
        SyntheticPopulationDataModule(**TINY, feature_dtype="float16")
