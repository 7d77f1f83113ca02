import pytest
import torch

from helpers import tiny_trainer
from lore_pl import BasisFile, BasisModule, FewShotModule, FewShotSettings, load_basis, save_basis
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import adapt_users, fit_user_weights


@pytest.fixture
def trained_basis(tiny_data):
    model = BasisModule(estimator="adam", rank=3, lr=0.1)
    tiny_trainer(20).fit(model, datamodule=tiny_data)
    return model


def settings(**kwargs) -> FewShotSettings:
    """The reference's few-shot fit (random start, no prior) unless told otherwise."""
    return FewShotSettings(**{"shots": 4, "steps": 30, "lr": 0.1, "weight_init": "randn", "prior_strength": 0.0,
                              **kwargs})


def test_v_stays_bit_identical_and_only_user_weights_move(tiny_data, trained_basis):
    basis, _ = trained_basis.kept_basis()
    module = FewShotModule.from_basis(basis.clone(), tau=100.0, fewshot=settings())
    tiny_trainer(1).fit(module, datamodule=tiny_data)
    assert torch.equal(module.model.basis, basis)
    assert [name for name, _ in module.named_parameters()] == ["model.user_logits"]
    assert module.model.user_logits.shape == (tiny_data.num_unseen_users, basis.shape[1])
    assert not torch.equal(module.model.user_logits, module.new_users(tiny_data.num_unseen_users).user_logits)


def test_the_lightning_fit_is_the_solver_the_protocol_runs(tiny_data, trained_basis):
    basis, seen = trained_basis.kept_basis()
    fewshot = settings(shots=5, shot_seed=7, steps=25, weight_init="population", prior_strength=0.3)
    module = FewShotModule.from_basis(basis, seen_weights=seen, fewshot=fewshot)
    tiny_trainer(1).fit(module, datamodule=tiny_data)

    # the same fit by hand: the shots the data module drew, the start, the solver
    pool = tiny_data.split("unseen_pool")
    kept = LF.sample_shots(pool.users, 5, torch.Generator().manual_seed(7))
    prior = LF.population_logits(seen)
    init = LF.initial_user_logits(pool.num_users, basis.shape[1], "population", prior_logits=prior)
    expected = fit_user_weights(LF.project(pool.features[kept], basis), pool.users[kept], init, steps=25, lr=0.1,
                                tau=100.0, prior_logits=prior, prior_strength=0.3)
    torch.testing.assert_close(module.model.user_logits.detach(), expected, rtol=1e-5, atol=1e-6)
    # and without a Trainer (what ProtocolEvaluation calls): identical
    adapter = FewShotModule.from_basis(basis, seen_weights=seen, fewshot=fewshot)
    torch.testing.assert_close(adapter.adapt(pool), module.model.user_weights(), rtol=0, atol=0)


def test_one_batched_fit_equals_each_user_alone(tiny_data, trained_basis):
    basis, _ = trained_basis.kept_basis()
    pool = tiny_data.split("unseen_pool")
    projected = LF.project(pool.features, basis)
    init = torch.randn(pool.num_users, basis.shape[1])
    together = fit_user_weights(projected, pool.users, init, steps=40, lr=0.1)
    for user in range(pool.num_users):
        mine = pool.users == user
        alone = fit_user_weights(projected[mine], torch.zeros(int(mine.sum()), dtype=torch.long), init[user:user + 1],
                                 steps=40, lr=0.1)
        torch.testing.assert_close(together[user], alone[0], rtol=1e-5, atol=1e-6)


def test_rank_one_gets_weight_one_without_fitting(tiny_data):
    module = FewShotModule.from_basis(torch.randn(tiny_data.dim, 1), fewshot=settings(shots=3))
    tiny_trainer(1).fit(module, datamodule=tiny_data)
    assert list(module.parameters()) == []
    assert torch.equal(module.user_weights(), torch.ones(tiny_data.num_unseen_users, 1))
    assert torch.equal(adapt_users(torch.randn(5, 1), torch.zeros(5, dtype=torch.long), 1, settings(), 1.0),
                       torch.zeros(1, 1))


def test_shots_subsample_is_what_the_module_trains_on(tiny_data):
    module = FewShotModule.from_basis(torch.randn(tiny_data.dim, 2), fewshot=settings(shots=3))
    trainer = tiny_trainer(1)
    trainer.fit(module, datamodule=tiny_data)
    batch = next(iter(trainer.train_dataloader))
    assert torch.all(torch.bincount(batch["users"], minlength=tiny_data.num_unseen_users) == 3)
    assert torch.equal(batch["features"], module.shots_of(tiny_data.split("unseen_pool")).features)


def test_fitting_raises_accuracy_on_the_unseen_users(tiny_data):
    # with the true directions as the basis, a few shots recover each user's mix
    def test_accuracy(steps):
        module = FewShotModule.from_basis(tiny_data.true_directions.clone(), tau=1.0,
                                          fewshot=settings(shots=8, steps=steps, weight_init="zeros"))
        trainer = tiny_trainer(1)
        trainer.fit(module, datamodule=tiny_data)
        return trainer.test(module, datamodule=tiny_data, verbose=False)[0]["test/acc"]

    fitted, uniform = test_accuracy(150), test_accuracy(0)
    assert fitted > uniform + 0.02 and fitted > 0.9


def test_basis_from_a_checkpoint_and_from_an_export(tiny_data, trained_basis, tmp_path):
    trainer = tiny_trainer(1, default_root_dir=tmp_path)
    trainer.fit(trained_basis, datamodule=tiny_data)
    trainer.save_checkpoint(tmp_path / "basis.ckpt")
    basis, weights = trained_basis.kept_basis()
    exported = BasisFile(basis, 100.0, trained_basis.model.reference_head, tiny_data.seen_user_ids, weights)
    save_basis(tmp_path / "basis.safetensors", exported)

    from_ckpt = load_basis(tmp_path / "basis.ckpt")
    from_file = load_basis(tmp_path / "basis.safetensors")
    assert torch.equal(from_ckpt.basis, basis) and torch.equal(from_file.basis, basis)
    assert from_ckpt.user_ids == from_file.user_ids == tiny_data.seen_user_ids and from_file.tau == 100.0
    torch.testing.assert_close(from_file.reference_head, tiny_data.reference_head)
    module = FewShotModule(basis_path=str(tmp_path / "basis.safetensors"))
    assert torch.equal(module.basis_file.basis, basis)
    assert (module.basis_file.dim, module.basis_file.rank, module.tau) == (tiny_data.dim, basis.shape[1], 100.0)


def test_a_reloaded_fewshot_checkpoint_scores_identically(tiny_data, tmp_path):
    module = FewShotModule.from_basis(torch.randn(tiny_data.dim, 3), fewshot=settings())
    trainer = tiny_trainer(1)
    trainer.fit(module, datamodule=tiny_data)
    trainer.save_checkpoint(tmp_path / "fewshot.ckpt")
    reloaded = FewShotModule.load_from_checkpoint(tmp_path / "fewshot.ckpt", weights_only=True)
    split = tiny_data.split("unseen_test")
    assert torch.equal(reloaded(split.features, split.users), module(split.features, split.users))
    assert reloaded.model.user_ids == tiny_data.unseen_user_ids and reloaded.settings == module.settings


def test_bad_input_is_rejected(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="shots"):
        FewShotSettings(shots=0)
    with pytest.raises(ValueError, match="basis_path"):
        tiny_trainer(1).fit(FewShotModule(), datamodule=tiny_data)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tiny_trainer(1).fit(FewShotModule(basis_path=str(tmp_path / "missing.safetensors")), datamodule=tiny_data)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_basis(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="d=5 but"):
        tiny_trainer(1).fit(FewShotModule.from_basis(torch.randn(5, 2)), datamodule=tiny_data)


def test_the_pool_trains_as_one_batch_whatever_batch_size_says(tiny_data):
    tiny_data.batch_size = 4
    module = FewShotModule.from_basis(torch.randn(tiny_data.dim, 2), fewshot=settings(shots=None))
    trainer = tiny_trainer(1)
    trainer.fit(module, datamodule=tiny_data)
    assert trainer.num_training_batches == 1
    assert len(next(iter(trainer.train_dataloader))["users"]) == len(tiny_data.split("unseen_pool"))


def test_a_basis_from_another_embedder_is_refused(tiny_data, tmp_path):
    from lore_pl.errors import LoreDataError

    save_basis(tmp_path / "basis.safetensors", BasisFile(torch.randn(tiny_data.dim, 2), 100.0, embedder="other-model"))
    module = FewShotModule(basis_path=str(tmp_path / "basis.safetensors"))
    with pytest.raises(LoreDataError, match="'other-model'.*SyntheticPopulation"):
        tiny_trainer(1).fit(module, datamodule=tiny_data)
    # the same embedder, or an unknown one, is accepted
    same = BasisFile(torch.randn(tiny_data.dim, 2), 100.0, embedder=tiny_data.embedder)
    save_basis(tmp_path / "same.safetensors", same)
    tiny_trainer(1).fit(FewShotModule(basis_path=str(tmp_path / "same.safetensors")), datamodule=tiny_data)


def test_checkpoints_carry_the_embedder(tiny_data, tmp_path):
    trainer = tiny_trainer(1)
    trainer.fit(BasisModule(estimator="adam", rank=2), datamodule=tiny_data)
    trainer.save_checkpoint(tmp_path / "basis.ckpt")
    assert load_basis(tmp_path / "basis.ckpt").embedder == tiny_data.embedder
