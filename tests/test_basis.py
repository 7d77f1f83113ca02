import pytest
import torch
from lightning.pytorch.loggers import Logger

from helpers import tiny_trainer
from lore_pl import BasisModule
from lore_pl.core import functional as LF
from lore_pl.core.stats import mean_std_over_users, per_user_accuracy


def fit(model, data, epochs=20, **kwargs):
    tiny_trainer(epochs, **kwargs).fit(model, datamodule=data)
    return model


def test_parameters_are_built_from_the_data(tiny_data):
    model = fit(BasisModule(estimator="adam", rank=3, lr=0.1), tiny_data, epochs=1)
    assert model.model.basis.shape == (tiny_data.dim, 3)
    assert model.model.user_logits.shape == (tiny_data.num_users, 3)
    assert model.model.num_users == tiny_data.num_users and model.model.dim == tiny_data.dim
    assert model.model.user_ids == tiny_data.seen_user_ids and model.model.embedder == tiny_data.embedder


def test_joint_training_lowers_the_loss_and_moves_v_and_w(tiny_data):
    model = BasisModule(estimator="adam", rank=3, lr=0.1, prune_threshold=0.0)
    model.trainer = None
    trainer = tiny_trainer(1)
    trainer.fit(model, datamodule=tiny_data)
    split = tiny_data.split("seen_train")
    before_loss = model._loss(model(split.features, split.users), split.users, "pair_mean").item()
    basis, logits = model.model.basis.detach().clone(), model.model.user_logits.detach().clone()
    tiny_trainer(60).fit(model, datamodule=tiny_data)
    after_loss = model._loss(model(split.features, split.users), split.users, "pair_mean").item()
    assert after_loss < before_loss
    assert not torch.equal(model.model.basis, basis) and not torch.equal(model.model.user_logits, logits)
    assert int(model.iterations_done) == 61


def test_rank_zero_is_the_reference_head_and_trains_nothing(tiny_data):
    model = fit(BasisModule(estimator="adam", rank=0), tiny_data, epochs=3)
    assert list(model.parameters()) == []
    torch.testing.assert_close(model.model.basis[:, 0], tiny_data.reference_head)
    assert torch.equal(model.user_weights(), torch.ones(tiny_data.num_users, 1))
    split = tiny_data.split("seen_test")
    torch.testing.assert_close(model(split.features, split.users), split.features @ tiny_data.reference_head / 100.0)


def test_rank_one_is_plain_bradley_terry(tiny_data):
    model = fit(BasisModule(estimator="adam", rank=1, lr=0.1), tiny_data, epochs=3)
    assert model.model.user_logits is None
    assert torch.equal(model.user_weights(), torch.ones(tiny_data.num_users, 1))
    split = tiny_data.split("seen_test")
    torch.testing.assert_close(model(split.features, split.users), (split.features @ model.model.basis)[:, 0] / 100.0)


def test_rank_zero_or_a_regularizer_without_a_reference_head_is_an_error(tiny_data):
    tiny_data.data.reference_head = None
    with pytest.raises(ValueError, match="K=0.*reference head"):
        fit(BasisModule(estimator="adam", rank=0), tiny_data, epochs=1)
    with pytest.raises(ValueError, match="regularizer='cosine' needs a reference head"):
        fit(BasisModule(estimator="adam", rank=2, regularizer="cosine", alpha=1.0), tiny_data, epochs=1)


def test_rank_above_dim_is_an_error(tiny_data):
    with pytest.raises(ValueError, match="exceeds the feature dimension"):
        fit(BasisModule(estimator="adam", rank=tiny_data.dim + 1), tiny_data, epochs=1)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="schedule"):
        BasisModule(estimator="adam", rank=2, schedule="sgd")
    with pytest.raises(ValueError, match="lr, schedule: options of the Adam estimator"):
        BasisModule(lr=0.1, schedule="alternating")  # the MAP estimator would ignore them: say so
    with pytest.raises(ValueError, match="rank 'auto' chooses K .* MAP estimator"):
        BasisModule(estimator="adam")
    with pytest.raises(ValueError, match="tau = 1"):
        BasisModule(tau=100.0)
    with pytest.raises(ValueError, match="rank"):
        BasisModule(estimator="adam", rank=-1)
    with pytest.raises(ValueError, match="prune_threshold"):
        BasisModule(estimator="adam", rank=2, prune_threshold=1.5)


def test_alternating_w_step_leaves_v_and_v_step_leaves_w(tiny_data):
    model = BasisModule(estimator="adam", rank=3, schedule="alternating", lr=0.1)
    trainer = tiny_trainer(1)
    trainer.fit(model, datamodule=tiny_data)
    opt_weights, opt_basis = model.optimizers()
    split = tiny_data.split("seen_train")
    basis, logits = model.model.basis.detach().clone(), model.model.user_logits.detach().clone()
    model.model.basis.grad = None
    model._optimize(opt_weights, split.features, split.users, 0.0)
    assert torch.equal(model.model.basis, basis) and not torch.equal(model.model.user_logits, logits)
    assert model.model.basis.grad is None  # V's gradient was not even computed
    logits = model.model.user_logits.detach().clone()
    model._optimize(opt_basis, split.features, split.users, 1.0)
    assert torch.equal(model.model.user_logits, logits) and not torch.equal(model.model.basis, basis)


def test_alternating_with_max_steps_counts_iterations(tiny_data):
    model = fit(BasisModule(estimator="adam", rank=3, schedule="alternating", lr=0.1, regularizer="cosine", alpha=1.0),
                tiny_data, epochs=-1, max_steps=20)
    assert int(model.iterations_done) == 10  # two optimizer steps per iteration
    assert model.total_iterations() == 10


def test_regularizer_pulls_the_basis_towards_the_reference(tiny_data):
    def cosine(model):
        return torch.nn.functional.cosine_similarity(model.model.basis, tiny_data.reference_head[:, None], dim=0).mean()

    torch.manual_seed(0)
    free = fit(BasisModule(estimator="adam", rank=2, lr=0.1), tiny_data, epochs=30)
    torch.manual_seed(0)
    pulled = fit(BasisModule(estimator="adam", rank=2, lr=0.1, regularizer="cosine", alpha=100.0), tiny_data, epochs=30)
    assert cosine(pulled) > cosine(free) + 0.1


def test_pruning_at_the_end_of_fit(tiny_data):
    model = fit(
        BasisModule(estimator="adam", rank=4, lr=0.1, weight_init="zeros", prune_threshold=0.3), tiny_data, epochs=2
    )
    weights = LF.simplex_weights(model.model.user_logits)  # unmasked
    expected = weights.max(dim=0).values >= 0.3
    assert torch.equal(model.model.active_columns, expected)
    kept_basis, kept_weights = model.kept_basis()
    assert kept_basis.shape[1] == int(expected.sum())
    torch.testing.assert_close(kept_weights.sum(dim=1), torch.ones(tiny_data.num_users))
    assert model.prune_() == int(expected.sum())  # idempotent


def test_a_reloaded_checkpoint_scores_identically(tiny_data, tmp_path):
    model = BasisModule(estimator="adam", rank=3, lr=0.1)
    trainer = tiny_trainer(15, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=tiny_data)
    path = tmp_path / "basis.ckpt"
    trainer.save_checkpoint(path)
    reloaded = BasisModule.load_from_checkpoint(path, weights_only=True)
    split = tiny_data.split("seen_test")
    assert torch.equal(reloaded(split.features, split.users), model(split.features, split.users))
    assert torch.equal(reloaded.model.active_columns, model.model.active_columns)


def test_checkpoint_for_other_data_is_a_clear_error(tiny_data, tmp_path):
    from datamodules import SyntheticPopulationDataModule
    from helpers import TINY

    model = fit(BasisModule(estimator="adam", rank=3, lr=0.1), tiny_data, epochs=1)
    other = SyntheticPopulationDataModule(**{**TINY, "dim": 8})
    with pytest.raises(ValueError, match="built for 12 users x d=16"):
        tiny_trainer(1).fit(model, datamodule=other)


def test_validation_and_test_log_per_user_accuracy(tiny_data):
    model = BasisModule(estimator="adam", rank=3, lr=0.1)
    trainer = tiny_trainer(5, limit_val_batches=1.0)
    trainer.fit(model, datamodule=tiny_data)
    assert float(trainer.callback_metrics["val/acc"]) > 0.6  # 5 Adam steps already beat chance (0.5)
    assert "train/acc" in trainer.callback_metrics
    result = trainer.test(model, datamodule=tiny_data, verbose=False)[0]
    split = tiny_data.split("seen_test")
    from callbacks.protocol import accuracy

    expected = accuracy(model(split.features, split.users), split)
    assert result["test/acc"] == pytest.approx(expected[0], abs=1e-6)
    assert result["test/acc_std"] == pytest.approx(expected[1], abs=1e-6)


def test_basis_weight_decay_shrinks_v(tiny_data):
    torch.manual_seed(0)
    free = fit(BasisModule(estimator="adam", rank=2, lr=0.1), tiny_data, epochs=40)
    torch.manual_seed(0)
    decayed = fit(BasisModule(estimator="adam", rank=2, lr=0.1, basis_weight_decay=50.0), tiny_data, epochs=40)
    assert decayed.model.basis.norm() < 0.5 * free.model.basis.norm()
    with pytest.raises(ValueError, match="basis_weight_decay"):
        BasisModule(estimator="adam", rank=2, basis_weight_decay=-1.0)


def test_protocol_on_the_best_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from callbacks import BasisExport, ProtocolEvaluation, RestoreBestCheckpoint, evaluate_protocol
    from callbacks.protocol import shared_baseline
    from datamodules import SyntheticPopulationDataModule
    from helpers import TINY
    from lore_pl import FewShotSettings, load_basis

    data = SyntheticPopulationDataModule(**{**TINY, "labels": "bradley_terry"}, val_fraction=0.3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    protocol, export = ProtocolEvaluation(), BasisExport()
    fewshot = FewShotSettings(shots=4, steps=20)
    model = BasisModule(estimator="adam", rank=3, lr=0.5, fewshot=fewshot)
    trainer = tiny_trainer(
        40,
        limit_val_batches=1.0,
        check_val_every_n_epoch=2,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        callbacks=[
            checkpoint,
            EarlyStopping("val/acc", mode="max", patience=3),
            RestoreBestCheckpoint(),
            protocol,
            export,
        ],
    )
    trainer.fit(model, datamodule=data)
    assert checkpoint.best_model_path and model.best_checkpoint_path == checkpoint.best_model_path
    best = BasisModule.load_from_checkpoint(checkpoint.best_model_path, weights_only=True)
    best.prune_()
    expected = evaluate_protocol(best.model, data, fewshot, shared=shared_baseline(best.model, data)[0])
    assert {k: v for k, v in protocol.results.items() if k in expected} == expected
    assert torch.equal(load_basis(export.path).basis, best.kept_basis()[0])  # the export is the best one too
    # the validation split, not the test split, chose it: the best score is the checkpoint's val accuracy
    assert checkpoint.monitor == "val/acc" and data.has_split("seen_val")
    chosen = BasisModule.load_from_checkpoint(checkpoint.best_model_path, weights_only=True)  # as scored: unpruned
    val = data.split("seen_val")
    with torch.no_grad():
        val_acc = mean_std_over_users(per_user_accuracy(chosen(val.features, val.users), val.users, val.num_users))[0]
    assert float(checkpoint.best_model_score) == pytest.approx(val_acc, abs=1e-6)


@pytest.mark.parametrize("schedule", ["joint", "alternating"])
def test_the_fused_cpu_kernel_trains_as_the_pytorch_path(tiny_data, schedule):
    trained = []
    for kernel in (True, False):
        torch.manual_seed(0)
        model = fit(
            BasisModule(estimator="adam", rank=3, lr=0.1, schedule=schedule, prune_threshold=0.0, cpu_kernel=kernel),
            tiny_data,
            epochs=15,
        )
        trained.append((model.model.basis.detach(), model.model.user_logits.detach()))
    for fused, plain in zip(*trained):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


class RecordingLogger(Logger):
    """The steps at which the logger wrote each metric."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.written = {}

    def log_metrics(self, metrics, step=None):
        for key in metrics:
            self.written.setdefault(key, []).append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_full_batch_training_logs_every_n_steps_and_the_last(tiny_data):
    logger = RecordingLogger()
    fit(
        BasisModule(estimator="adam", rank=3, lr=0.1),
        tiny_data,
        epochs=12,
        logger=logger,
        log_every_n_steps=5,
        limit_val_batches=0,
    )
    # iterations 5, 10 and the last (12) log; the logger writes step metrics every 5 steps (4 and 9),
    # and the last iteration's reach callback_metrics (EpochSummary's final line)
    assert logger.written["train/nll"] == [4, 9]
    assert len(logger.written["train/acc"]) == 3  # the train accuracy of exactly those one-batch epochs


def test_initial_basis_and_weights_from_a_file_and_v_ref_from_a_file(tiny_data, tmp_path):
    import numpy as np

    from lore_pl import BasisFile, LoreModel, save_basis

    start = LoreModel.initial(tiny_data.dim, 3, tiny_data.num_users, user_ids=tiny_data.seen_user_ids)
    save_basis(tmp_path / "start.safetensors", BasisFile.from_model(start))
    head = torch.randn(tiny_data.dim)
    np.save(tmp_path / "head.npy", head.numpy())
    model = fit(
        BasisModule(
            estimator="adam",
            rank=3,
            initial_basis=str(tmp_path / "start.safetensors"),
            reference_head_file=str(tmp_path / "head.npy"),
        ),
        tiny_data,
        epochs=0,
    )
    assert torch.equal(model.model.basis, start.basis)
    torch.testing.assert_close(model.user_weights(), start.user_weights(), rtol=0, atol=1e-6)
    assert torch.equal(model.model.reference_head, head)  # from the file, not the data module's
    # the file's users are not this data's: V is kept, W starts afresh
    other = LoreModel.initial(tiny_data.dim, 3, 5, user_ids=[f"x{i}" for i in range(5)])
    save_basis(tmp_path / "other.safetensors", BasisFile.from_model(other))
    model = fit(
        BasisModule(estimator="adam", rank=3, initial_basis=str(tmp_path / "other.safetensors")), tiny_data, epochs=0
    )
    assert torch.equal(model.model.basis, other.basis) and model.model.num_users == tiny_data.num_users
    with pytest.raises(ValueError, match="K=3, but this run has .* rank=2"):
        fit(
            BasisModule(estimator="adam", rank=2, initial_basis=str(tmp_path / "start.safetensors")),
            tiny_data,
            epochs=0,
        )
    with pytest.raises(FileNotFoundError, match="nowhere.npy"):
        fit(
            BasisModule(estimator="adam", rank=0, reference_head_file=str(tmp_path / "nowhere.npy")),
            tiny_data,
            epochs=0,
        )


def test_initial_tensors_are_where_training_starts(tiny_data):
    from lore_pl import LoreModel

    start = LoreModel(torch.randn(tiny_data.dim, 2), torch.randn(tiny_data.num_users, 2), tau=7.0)
    untrained = fit(BasisModule.from_initial(start, estimator="adam"), tiny_data, epochs=0)
    assert torch.equal(untrained.model.basis, start.basis) and torch.equal(
        untrained.model.user_logits, start.user_logits
    )
    assert untrained.model.temperature == 7.0 and untrained.hparams.rank == 2
    trained = fit(BasisModule.from_initial(start, estimator="adam", lr=0.1), tiny_data, epochs=5)
    assert not torch.equal(trained.model.basis, start.basis)
    with pytest.raises(ValueError, match="has 3 users, the data's seen users are 12"):
        fit(
            BasisModule.from_initial(LoreModel(torch.randn(tiny_data.dim, 2), torch.randn(3, 2)), estimator="adam"),
            tiny_data,
            epochs=0,
        )
