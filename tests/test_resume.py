"""Resume and determinism: a fit killed with SIGKILL and resumed ends bit-identical to an unbroken
one; checkpoints and exports are written atomically; the same seed gives the same results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY_DATA
from lore_pl.cli import build_cli

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  deterministic: true
  max_epochs: {epochs}
  logger: {logger}
  default_root_dir: {root}
  check_val_every_n_epoch: 1000
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
{dirpath}        every_n_epochs: 1
        save_on_train_epoch_end: true   # validation (which would trigger saving) never runs here
        save_last: true
    - class_path: callbacks.ProtocolEvaluation
    - class_path: callbacks.BasisExport
model:
  class_path: lore_pl.BasisModule
  init_args:
    rank: 3
    estimator: adam
    lr: 0.1
    fewshot: {{shots: 4, steps: 50}}
data:
  class_path: datamodules.SyntheticPopulationDataModule
"""


#: the shipped layout: runs in <save_dir>/<name>/version_N, checkpoints in its checkpoints/
VERSIONED_LOGGER = "{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: %s, name: run}}"


def write_config(directory: Path, epochs: int, versioned: bool = False) -> Path:
    """A fit's config: checkpoints in a fixed ``dirpath`` and no logger, or (``versioned``) the shipped
    layout, where ``--ckpt_path last`` has to find the run's newest version itself."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    logger = VERSIONED_LOGGER % (directory / "logs") if versioned else "false"
    # fixed, so that --ckpt_path last finds it after a restart
    dirpath = "" if versioned else f"        dirpath: {directory}/checkpoints\n"
    path.write_text(CONFIG.format(epochs=epochs, root=directory, logger=logger, dirpath=dirpath))
    return path


def run_directory(directory: Path, versioned: bool) -> Path:
    return directory / "logs" / "run" / "version_0" if versioned else directory


def fit_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lore_pl", "fit", "--config", str(config), *TINY_DATA, *extra]


def env() -> dict:
    # one thread: the same float summation order in every run, and no fight for the shared cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # not there yet
        return -1


def final_state(directory: Path) -> dict:
    return torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("kill, versioned", [(signal.SIGKILL, True), (signal.SIGTERM, False)],
                         ids=["SIGKILL-versioned-run", "SIGTERM-fixed-dirpath"])
def test_a_fit_killed_with_sigkill_resumes_to_the_unbroken_result(tmp_path, kill, versioned):
    epochs = 400
    unbroken_dir, killed_dir = tmp_path / "unbroken", tmp_path / "killed"
    unbroken = subprocess.Popen(fit_command(write_config(unbroken_dir, epochs, versioned)), env=env(), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The killed run: SIGKILL (no cleanup at all) or SIGTERM (Lightning stops the fit) well into training.
    victim = subprocess.Popen(fit_command(write_config(killed_dir, epochs, versioned)), env=env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_directory(killed_dir, versioned) / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while checkpoint_epoch(last) <= 20:
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached epoch 20"
        time.sleep(0.02)
    os.kill(victim.pid, kill)
    victim.wait(timeout=120)
    # SIGKILL: killed outright; SIGTERM: Lightning stops the fit, our CLI exits 143 (not Lightning's 0)
    assert victim.returncode == (-signal.SIGKILL if kill == signal.SIGKILL else 143), victim.returncode
    killed_at = checkpoint_epoch(last)
    assert 20 < killed_at < epochs - 1, f"killed at epoch {killed_at}: not mid-run"
    assert not (run_directory(killed_dir, versioned) / "protocol.json").exists()

    resumed = subprocess.run(fit_command(killed_dir / "config.yaml", "--ckpt_path", "last"), env=env(), cwd=tmp_path,
                             capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    # a restart from scratch would also end equal (same seed): check that it really resumed
    assert f"Restored all states from the checkpoint at {last}" in (resumed.stdout + resumed.stderr).decode()
    assert unbroken.wait(timeout=300) == 0, unbroken.stderr.read().decode()[-3000:]
    if versioned:  # the run went on in its own directory, not in a new version
        assert sorted(p.name for p in (killed_dir / "logs" / "run").iterdir()) == ["version_0"]
    unbroken_dir, killed_dir = run_directory(unbroken_dir, versioned), run_directory(killed_dir, versioned)

    expected, got = final_state(unbroken_dir), final_state(killed_dir)
    assert got["epoch"] == expected["epoch"] == epochs - 1
    assert int(got["state_dict"]["iterations_done"]) == epochs
    for name in ("model.basis", "model.user_logits", "model.active_columns", "iterations_done"):
        assert torch.equal(got["state_dict"][name], expected["state_dict"][name]), name
    # the optimizer state too, so the equality is not an accident of the last steps
    for a, b in zip(got["optimizer_states"][0]["state"].values(), expected["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert json.loads((killed_dir / "protocol.json").read_text()) == json.loads(
        (unbroken_dir / "protocol.json").read_text()
    )
    from lore_pl import load_basis

    assert torch.equal(
        load_basis(killed_dir / "basis.safetensors").basis, load_basis(unbroken_dir / "basis.safetensors").basis
    )


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    import lore_pl.modules.checkpoint_io as checkpoint_io

    io = checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def die_half_way(obj, stream):
        stream.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for a kill between the first and the last byte

    monkeypatch.setattr(checkpoint_io.torch, "save", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}  # the old checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_basis_exports_are_atomic(tmp_path, monkeypatch):
    import lore_pl.data.basis_file as export

    path = tmp_path / "basis.safetensors"
    export.save_basis(path, export.BasisFile(torch.ones(4, 2), 100.0))
    real_save_file = export.save_file

    def die_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        export.save_basis(path, export.BasisFile(torch.zeros(4, 2), 1.0))
    monkeypatch.setattr(export, "save_file", real_save_file)
    assert torch.equal(export.load_basis(path).basis, torch.ones(4, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["basis.safetensors"]



@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_take_the_umask_mode(tmp_path, umask, mode):
    import numpy as np

    from lore_pl.data.atomic import write_json_atomic, write_npy_atomic
    from lore_pl.data.basis_file import BasisFile, save_basis
    from lore_pl.modules.checkpoint_io import AtomicCheckpointIO

    previous = os.umask(umask)
    try:
        written = [
            save_basis(tmp_path / "basis.safetensors", BasisFile(torch.ones(4, 2), 1.0)),
            write_json_atomic(tmp_path / "protocol.json", {"a": 1}),
            write_npy_atomic(tmp_path / "shard-00000.npy", np.zeros((2, 3), np.float32)),
        ]
        AtomicCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")
        written.append(tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import lore_pl.modules.checkpoint_io as checkpoint_io

    io = checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, stream):  # what torch raises when the device is full part way through
        stream.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"last\.ckpt: could not be written .*enforce fail.*unchanged"):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

def run_in_process(directory: Path, *extra: str):
    cli = build_cli(["fit", "--config", str(write_config(directory, 30)), *TINY_DATA, *extra])
    return cli


def test_the_same_seed_gives_identical_results_and_the_seed_is_saved(tmp_path):
    from lore_pl.modules.checkpoint_io import AtomicCheckpointIO

    first, second = run_in_process(tmp_path / "a"), run_in_process(tmp_path / "b")
    assert isinstance(first.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the CLI installs it
    for name in ("basis", "user_logits"):
        assert torch.equal(getattr(first.model.model, name), getattr(second.model.model, name)), name
    results = [json.loads((d / "protocol.json").read_text()) for d in (tmp_path / "a", tmp_path / "b")]
    assert results[0] == results[1]
    assert "seed_everything: 0\n" in (tmp_path / "a" / "config.yaml").read_text()

    other = run_in_process(tmp_path / "c", "--seed_everything=1")
    assert not torch.equal(
        other.model.model.basis, first.model.model.basis
    )  # the seed matters: V's start is drawn from it


def test_a_random_seed_is_written_into_the_saved_config(tmp_path):
    cli = run_in_process(tmp_path / "r", "--seed_everything=true", "--trainer.max_epochs=2")
    saved = (tmp_path / "r" / "config.yaml").read_text()
    seed = [line for line in saved.splitlines() if line.startswith("seed_everything:")]
    assert len(seed) == 1 and seed[0].split(":")[1].strip().isdigit(), seed  # an int, not "true"
    rerun = run_in_process(
        tmp_path / "r2", f"--seed_everything={seed[0].split(':')[1].strip()}", "--trainer.max_epochs=2"
    )
    assert torch.equal(rerun.model.model.basis, cli.model.model.basis)  # the saved seed reproduces the run


# ------------------------------------------------------------------ overwrite, finished runs, failed runs
def fixed_version_args(directory: Path, epochs: int, *extra: str) -> list[str]:
    """A fit into logs/run/version_0, fixed: the case where a second fit meets the first one's files
    (the protocol without its baselines, which would double the time)."""
    config = write_config(directory, epochs, versioned=True)
    config.write_text(config.read_text().replace("- class_path: callbacks.ProtocolEvaluation\n",
                                                 "- class_path: callbacks.ProtocolEvaluation\n"
                                                 "      init_args: {baselines: false}\n"))
    return ["fit", "--config", str(config), *TINY_DATA, "--trainer.logger.init_args.version=0", *extra]


def file_states(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def test_overwrite_replaces_the_old_run_so_that_last_resumes_the_new_one(tmp_path, capsys):
    from jsonargparse import Namespace

    from lore_pl.cli import main, resolve_last_checkpoint

    run = run_directory(tmp_path, versioned=True)
    build_cli(fixed_version_args(tmp_path, 3))
    assert (run / "protocol.json").is_file() and checkpoint_epoch(run / "checkpoints" / "last.ckpt") == 2
    old_events = set(run.glob("events.out.tfevents.*"))
    capsys.readouterr()

    # resuming the finished run: one line, exit 0, nothing rerun or written
    before = file_states(run)
    main(fixed_version_args(tmp_path, 3, "--ckpt_path=last"))
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "protocol.json was written after its last checkpoint" in err
    assert file_states(run) == before

    # a file no run writes: --overwrite refuses, names it, removes nothing
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main(fixed_version_args(tmp_path, 5, "--overwrite=true"))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"holds {run / 'notes.txt'}, which --overwrite does not remove" in err
    assert "nothing was removed" in err
    (run / "notes.txt").unlink()
    assert file_states(run) == before

    # a fit that reads the old run's own basis: --overwrite would remove its input; refused, nothing removed
    with pytest.raises(SystemExit) as stopped:
        main(fixed_version_args(tmp_path, 5, "--overwrite=true",
                                f"--model.init_args.initial_basis={run / 'basis.safetensors'}"))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "this fit reads model.init_args.initial_basis=" in err, err
    assert file_states(run) == before

    # a fit run with the old run's own config.yaml: --overwrite would remove the config it reads; refused
    saved = (run / "config.yaml").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(run / "config.yaml"), "--overwrite=true"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"this fit reads --config {run / 'config.yaml'}" in err, err
    assert file_states(run) == before and (run / "config.yaml").read_bytes() == saved

    # --overwrite: the old run's files go before the new run writes; last.ckpt is the new run's
    build_cli(fixed_version_args(tmp_path, 5, "--overwrite=true", "--model.init_args.lr=0.05"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any("-v" in name for name in names), names  # no last-v1.ckpt
    assert checkpoint_epoch(run / "checkpoints" / "last.ckpt") == 4
    assert "max_epochs: 5" in (run / "config.yaml").read_text() and "lr: 0.05" in (run / "hparams.yaml").read_text()
    assert not old_events & set(run.glob("events.out.tfevents.*"))
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(tmp_path / "logs"), name="run", version=0))
    config = Namespace(trainer=Namespace(logger=logger, callbacks=[], max_epochs=10))
    assert resolve_last_checkpoint(config) == (run / "checkpoints" / "last.ckpt", 0)


def test_a_run_is_finished_when_its_checkpoint_ends_the_last_epoch_or_its_results_came_after_it(tmp_path):
    from jsonargparse import Namespace

    from lore_pl.cli import finished_run

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    progress = {"current": {"ready": 3, "completed": 2, "started": 3, "processed": 3}}
    torch.save({"epoch": 2, "global_step": 3, "loops": {"fit_loop": {"epoch_progress": progress}}}, last)
    config = Namespace(trainer=Namespace(callbacks=[], max_epochs=3, max_steps=-1))
    assert finished_run(last, config) == "its last checkpoint ends epoch 3 of max_epochs=3"
    config.trainer.max_epochs = 6  # asked to train on
    assert finished_run(last, config) is None
    (tmp_path / "protocol.json").write_text("{}")  # written after the checkpoint: the fit ran to its end
    assert finished_run(last, config) == "protocol.json was written after its last checkpoint"
    os.utime(tmp_path / "protocol.json", ns=(0, 0))  # an older run's results
    assert finished_run(last, config) is None


def test_a_run_that_fails_on_its_way_in_leaves_no_version_directory(tmp_path, capsys):
    from lore_pl.cli import main

    config = write_config(tmp_path, 3, versioned=True)
    failing = ["fit", "--config", str(config), *TINY_DATA, "--model.init_args.rank=17"]  # K > d: found in setup
    with pytest.raises(SystemExit) as stopped:
        main(failing)
    assert stopped.value.code == 2 and "rank K=17 exceeds" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # save_dir, the run's name and version_0 were all new
    earlier = tmp_path / "logs" / "run" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "protocol.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(failing)
    assert sorted(p.name for p in (tmp_path / "logs" / "run").iterdir()) == ["version_0"]  # no empty version_1
    assert (earlier / "protocol.json").read_text() == "{}"


def test_overwrite_removes_no_checkpoint_from_a_folder_that_is_not_the_runs_own(tmp_path):
    """A ModelCheckpoint dirpath of the user's (or ./checkpoints without a logger) may hold any run's
    checkpoints: --overwrite refuses there and removes none of them."""
    from jsonargparse import Namespace

    from lore_pl.cli import refuse_overwrite
    from lore_pl.errors import LoreDataError

    shared = tmp_path / "shared_ckpts"
    shared.mkdir()
    for name in ("base_model.ckpt", "other-run-epoch=9.ckpt", "last.ckpt"):
        (shared / name).write_bytes(name.encode())
    before = file_states(shared)
    callback = Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                         init_args=Namespace(dirpath=str(shared), filename="mine-{epoch}"))
    no_logger = Namespace(trainer=Namespace(logger=False, callbacks=[callback]))
    for overwrite, message in ((False, "already holds a run"), (True, "which --overwrite does not remove")):
        with pytest.raises(LoreDataError, match=message):
            refuse_overwrite(no_logger, overwrite)
    default_root = Namespace(trainer=Namespace(logger=False, callbacks=[], default_root_dir=str(tmp_path)))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "someone.ckpt").write_bytes(b"x")
    with pytest.raises(LoreDataError, match="which --overwrite does not remove"):
        refuse_overwrite(default_root, True)
    assert file_states(shared) == before and (tmp_path / "checkpoints" / "someone.ckpt").read_bytes() == b"x"
