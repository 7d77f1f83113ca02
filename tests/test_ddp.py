"""DDP gives the one-process answer: 2 CPU processes (``ddp_spawn``) against 1, same seed.

The sharded runs are compared on what they train (V, W), what they log (the global train loss,
val accuracy) and the protocol's four accuracies, within 1e-5. The uneven sizes (99 pairs, batches
whose last shards hold 2 and 1 pairs) make a wrong normalisation or a padded sampler visible.
"""

import json

import pytest
import torch
import torch.distributed as dist
from lightning import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ProtocolEvaluation, RestoreBestCheckpoint
from callbacks.protocol import PROTOCOL_ROWS
from datamodules import SyntheticPopulationDataModule
from helpers import ROOT, TINY, tiny_trainer
from lore_pl import BasisModule, FewShotModule, FewShotSettings, LoreModel
from lore_pl.core import functional as LF
from lore_pl.data.preferences import IndexBatchSampler, PreferenceSplit

# 11 seen users x 9 pairs = 99 training pairs: the full-batch shards are 50 and 49 pairs
DATA = {**TINY, "num_seen_users": 11, "train_prompts_per_user": 9}
TOLERANCE = dict(rtol=0, atol=1e-5)
FEWSHOT = FewShotSettings(shots=4, steps=30)  # how the protocol adapts the unseen users


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    if dist.is_available() and dist.is_initialized():  # a failed run must not poison the next test
        dist.destroy_process_group()


class SaveRankZero(Callback):
    """ddp_spawn trains in child processes: rank 0 saves what the test compares."""

    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            state = {key: value.detach().cpu().clone() for key, value in pl_module.state_dict().items()
                     if torch.is_tensor(value)}
            torch.save({"state": state, "metrics": metrics}, self.path)


def train(make_model, out, devices, epochs, data_kwargs=(), protocol=True, best_checkpoint=False, **trainer_kwargs):
    """Fit with ``devices`` CPU processes; returns rank 0's state dict, logged metrics, protocol.

    ``best_checkpoint``: keep the best ``val/acc`` checkpoint and evaluate the protocol on it."""
    seed_everything(0, workers=True)
    data = SyntheticPopulationDataModule(**{**DATA, **dict(data_kwargs)})
    model = make_model()
    out.mkdir(parents=True)
    callbacks = [SaveRankZero(out / "rank0.pt")]
    if protocol:
        callbacks.insert(0, ProtocolEvaluation())
    if best_checkpoint:
        callbacks[:0] = [ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/acc", mode="max"),
                         RestoreBestCheckpoint()]
        trainer_kwargs["enable_checkpointing"] = True
    settings = {"limit_val_batches": 1.0, "check_val_every_n_epoch": epochs, **trainer_kwargs}
    trainer = tiny_trainer(
        epochs, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", default_root_dir=out,
        callbacks=callbacks, **settings,
    )
    trainer.fit(model, datamodule=data)
    saved = torch.load(out / "rank0.pt")
    results = json.loads((out / "protocol.json").read_text()) if protocol else {}
    return saved["state"], saved["metrics"], results


def assert_same_run(one, two, keys, nll_tolerance=1e-5):
    """``nll_tolerance``: for the last logged losses, where they may be those of a stage the MAP path then
    discarded (its L-BFGS iterates drift with the order of the shards' sums; the kept model is compared
    at ``TOLERANCE``)."""
    (state1, metrics1, protocol1), (state2, metrics2, protocol2) = one, two
    for key in keys:
        torch.testing.assert_close(state2[key], state1[key], **TOLERANCE)
    for key in ("train/loss", "train/acc", "val/acc", "val/acc_std", "val/nll"):
        tolerance = nll_tolerance if key in ("train/loss", "val/nll") else 1e-5
        assert metrics2[key] == pytest.approx(metrics1[key], abs=tolerance), key
    for key, _, _ in PROTOCOL_ROWS if protocol1 else ():
        assert protocol2[key] == pytest.approx(protocol1[key], abs=1e-5), key
    diffs = {key: float((state2[key] - state1[key]).abs().max()) for key in keys}
    diffs["logged"] = max(abs(metrics2[key] - metrics1[key]) for key in metrics1)
    numbers = [key for key, value in protocol1.items() if isinstance(value, (int, float))]
    diffs["protocol"] = max((abs(protocol2[key] - protocol1[key]) for key in numbers), default=0.0)
    words = [key for key in protocol1 if key not in numbers and key != "selection"]
    assert {k: protocol1[k] for k in words} == {k: protocol2[k] for k in words}
    if "selection" in protocol1:  # the same choices (the validation NLLs agree to float rounding)
        assert all(protocol1["selection"][k] == protocol2["selection"][k] for k in ("rank", "strengths", "ridge"))
    print(f"max |2 processes - 1 process|: {diffs}")  # shown with pytest -s
    return diffs


# ------------------------------------------------------------------------- fast, single process
def test_shards_are_disjoint_unpadded_and_cover_every_batch():
    split = PreferenceSplit(torch.randn(11, 2), torch.arange(11) % 3, ["a", "b", "c"])
    for batch_size in (None, 4):
        per_rank = [list(split.loader(batch_size, shuffle=True, seed=1, rank=r, world_size=3)) for r in range(3)]
        one = list(split.loader(batch_size, shuffle=True, seed=1))
        assert len({len(batches) for batches in per_rank}) == 1  # every rank takes the same number of steps
        for step, whole in enumerate(one):
            shards = [batches[step] for batches in per_rank]
            torch.testing.assert_close(torch.cat([s["features"] for s in shards]), whole["features"], rtol=0, atol=0)
            for shard in shards:  # the counts are the whole step's, on every rank
                assert torch.equal(shard["counts"], torch.bincount(whole["users"], minlength=3))
    # more ranks than pairs: some shards are empty rather than padded
    split = PreferenceSplit(torch.randn(2, 2), torch.tensor([0, 1]), ["a", "b"])
    shards = [next(iter(IndexBatchSampler(2, None, False, 0, r, 4))) for r in range(4)]
    assert [len(split[shard]["users"]) for shard in shards] == [1, 1, 0, 0]


@pytest.mark.parametrize("weighting", ["pair_mean", "user_mean"])
def test_scaled_shard_losses_average_to_the_one_process_loss(weighting):
    logits, users = torch.randn(7), torch.tensor([0, 0, 0, 1, 2, 2, 1])
    counts = torch.bincount(users, minlength=3)
    whole = LF.preference_loss(logits, users, 3, weighting)
    shards = [LF.preference_loss(logits[part], users[part], 3, weighting, counts, scale=2.0)
              for part in (slice(0, 4), slice(4, 7))]
    torch.testing.assert_close(sum(shards) / 2, whole)
    local_means = [LF.preference_loss(logits[part], users[part], 3, weighting) for part in (slice(0, 4), slice(4, 7))]
    assert abs(float(sum(local_means) / 2 - whole)) > 1e-3  # what DDP would give without the counts


def test_nothing_to_train_under_ddp_is_a_clear_error():
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    fitting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), world_size=2)
    reference = BasisModule(estimator="adam", rank=0)
    reference._install(LoreModel.initial(4, 0, 3, reference_head=torch.randn(4)))
    reference._trainer = fitting
    with pytest.raises(ValueError, match="K=0 has nothing to train.*devices=1"):
        reference.configure_model()
    trained = BasisModule(estimator="adam", rank=2)
    trained._install(LoreModel.initial(4, 2, 3))
    trained._trainer = fitting
    trained.configure_model()  # has parameters: DDP wraps it
    reference._trainer = SimpleNamespace(state=fitting.state, world_size=1)
    reference.configure_model()  # one process: nothing to wrap


def test_the_synthetic_experiment_runs_under_ddp_by_two_flags(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from lore_pl.cli import build_cli

    cli = build_cli(
        [
            "--config",
            str(ROOT / "configs/experiment/synthetic.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.num_devices == 2
    # the flags change nothing else: the logger, the callbacks and the model are the experiment's
    assert cli.trainer.logger.name == "synthetic" and cli.model.hparams.rank == "auto"


# ------------------------------------------------------------------- 2 processes against 1
@pytest.mark.slow
def test_ddp_joint_full_batch_equals_one_process(tmp_path):
    def make():
        return BasisModule(estimator="adam", rank=3, lr=0.1, prune_threshold=0.0, fewshot=FEWSHOT)

    one = train(make, tmp_path / "one", 1, epochs=25)
    two = train(make, tmp_path / "two", 2, epochs=25)
    assert_same_run(one, two, ["model.basis", "model.user_logits"])


@pytest.mark.slow
def test_ddp_alternating_minibatch_user_mean_equals_one_process(tmp_path):
    # 99 pairs in batches of 32: the last step's shards hold 2 and 1 pairs; eval batches are uneven too
    def make():
        return BasisModule(
            estimator="adam",
            rank=3,
            lr=0.1,
            schedule="alternating",
            loss_weighting="user_mean",
            regularizer="cosine",
            alpha=0.5,
            weight_init="rand",
            prune_threshold=0.0,
            fewshot=FEWSHOT,
        )

    data = {"batch_size": 32, "eval_batch_size": 25}
    one = train(make, tmp_path / "one", 1, epochs=4, data_kwargs=data)
    two = train(make, tmp_path / "two", 2, epochs=4, data_kwargs=data)
    assert_same_run(one, two, ["model.basis", "model.user_logits"])


@pytest.mark.slow
def test_ddp_fewshot_equals_one_process(tmp_path):
    basis = torch.randn(DATA["dim"], 3, generator=torch.Generator().manual_seed(1))

    def make():
        return FewShotModule.from_basis(basis.clone(), tau=1.0, fewshot=FewShotSettings(shots=3, steps=30))

    # 5 users x 3 shots = 15 pairs; every rank fits them all (no gradients to average), the
    # evaluation is sharded and its summed metrics are the one-process ones
    data = {"num_unseen_users": 5}
    one = train(make, tmp_path / "one", 1, epochs=1, data_kwargs=data, protocol=False)
    two = train(make, tmp_path / "two", 2, epochs=1, data_kwargs=data, protocol=False)
    assert_same_run(one, two, ["model.user_logits"])


@pytest.mark.slow
def test_ddp_held_out_validation_and_best_checkpoint_equal_one_process(tmp_path):
    # val_fraction holds pairs out of seen_train as seen_val (validated every 5 epochs); the protocol
    # is evaluated on the best val/acc checkpoint, on every rank the same file
    def make():
        return BasisModule(estimator="adam", rank=3, lr=0.3, prune_threshold=0.0, fewshot=FEWSHOT)

    data = {"val_fraction": 0.3}
    runs = [
        train(
            make, tmp_path / name, devices, epochs=20, data_kwargs=data, best_checkpoint=True, check_val_every_n_epoch=5
        )
        for name, devices in (("one", 1), ("two", 2))
    ]
    assert_same_run(*runs, ["model.basis", "model.user_logits"])
    best = [sorted((tmp_path / name / "checkpoints").glob("*.ckpt")) for name in ("one", "two")]
    assert [path.name for path in best[0]] == [path.name for path in best[1]] and len(best[0]) == 1
    assert best[0][0].name != "epoch=19-step=20.ckpt"  # the protocol ran on an earlier model than the last


@pytest.mark.slow
def test_ddp_map_estimator_equals_one_process(tmp_path):
    # the default estimator: the selection runs on every rank on the whole data (the same choice); each
    # L-BFGS evaluation averages the shards' gradients, and the line search sees the mean loss
    from lore_pl.core.estimator import MapSettings

    def make():
        return BasisModule(
            # ranks 2 and 3 only: the personalized path (V, W and the population mean), not K=1's
            map_settings=MapSettings(ranks=(2, 3), subspace=8, projected_iterations=50, stage_iterations=10),
            fewshot=FEWSHOT,
        )

    data = {"val_fraction": 0.3, "num_seen_users": 30, "num_train_prompts": 120}
    runs = [
        train(make, tmp_path / name, devices, epochs=8, data_kwargs=data, check_val_every_n_epoch=1)
        for name, devices in (("one", 1), ("two", 2))
    ]
    keys = ["model.basis", "model.user_logits", "model.prior_mean"]
    # the path's last stage (ridge 3) is worse and discarded, its val/nll is what was logged last: its
    # iterates agree to 4e-5 nats (1e-4 relative), the kept stage's model to 1.2e-7
    assert_same_run(*runs, keys, nll_tolerance=1e-4)
    assert [entry["ridge"] for entry in runs[0][2]["selection"]["path"]] == [10, 3]  # the case the tolerance is for


def test_a_gloo_process_group_is_destroyed_before_the_interpreter_finalizes(tmp_path):
    """The cause of the SIGABRT at exit: gloo's group left to finalization. The modules' setup
    registers a handler that destroys it while Python is alive (checked by a handler that runs after)."""
    import subprocess
    import sys

    script = f"""
import atexit, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
atexit.register(lambda: print("at exit, initialized:", dist.is_initialized(), flush=True))  # runs last
from lore_pl.modules.distributed import release_process_group_at_exit
release_process_group_at_exit(); release_process_group_at_exit()  # once, however often setup runs
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "at exit, initialized: False"
