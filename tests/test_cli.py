"""End to end: the README's main command with tiny overrides, in-process and as a console command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY_DATA, run_dir
from lore_pl import BasisModule, load_basis
from lore_pl.cli import build_cli

QUIET: list[str] = []  # the configs print one line per EpochSummary interval, no progress bar


@pytest.mark.slow
def test_synthetic_protocol_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs without a logger save their config.yaml in the working directory
    args = ["fit", "--config", str(ROOT / "configs/experiment/synthetic.yaml"), *TINY_DATA, *QUIET,
            "--trainer.max_epochs=30", "--trainer.check_val_every_n_epoch=10",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.rank=3"]
    build_cli(args)
    out = run_dir(tmp_path, "synthetic")
    results = json.loads((out / "protocol.json").read_text())
    # floors measured on this tiny population (0.996, 0.963, 0.984, 0.969), with room for other seeds
    floors = {"seen/train_acc": 0.95, "seen/test_acc": 0.9, "unseen/fewshot_acc": 0.9, "unseen/test_acc": 0.9}
    for key, floor in floors.items():
        assert results[key] >= floor and results[key + "_std"] >= 0.0, (key, results[key])
        assert results["oracle/" + key] == 1.0
    # the baselines on the same users and prompts, and the gain with its interval around it
    for name in ("shared", "population"):
        gain = results[f"gain/{name}/unseen/test_acc"]
        assert gain == pytest.approx(results["unseen/test_acc"] - results[f"baselines/{name}/unseen/test_acc"])
        assert results[f"gain/{name}/unseen/test_acc_low"] <= gain <= results[f"gain/{name}/unseen/test_acc_high"]
    assert results["rank"] == 3
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "config.yaml").read_text().count("seed_everything: 0") == 1
    table = capsys.readouterr().out
    assert "unseen users, unseen prompts" in table and f"{results['unseen/test_acc']:.4f}" in table

    # the checkpoint reloads to the same scores, and the export holds the same basis
    model = BasisModule.load_from_checkpoint(out / "checkpoints" / "last.ckpt")
    exported = load_basis(out / "basis.safetensors")
    assert torch.equal(model.kept_basis()[0], exported.basis)
    assert len(exported.user_ids) == 20

    # TensorBoard holds the protocol numbers and the hparams metric
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/nll", "val/acc", "unseen/test_acc", "oracle/unseen/test_acc"} <= tags
    assert {"basis/weights", "basis/weight_histograms", "basis/column_usage"} <= set(events.Tags()["images"])

    # phase 2 alone from the exported basis, and from the checkpoint
    for basis_path in (out / "basis.safetensors", out / "checkpoints" / "last.ckpt"):
        build_cli(["fit", "--config", str(ROOT / "configs/experiment/fewshot.yaml"), *TINY_DATA, *QUIET,
                   f"--model.init_args.basis_path={basis_path}", "--trainer.max_epochs=20",
                   "--trainer.check_val_every_n_epoch=20",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    fewshot = run_dir(tmp_path, "fewshot")
    assert (fewshot / "checkpoints" / "last.ckpt").is_file()

    # lightning predict: every user's score for every candidate, from the export and both checkpoints
    from safetensors.torch import save_file

    from lore_pl import PersonalRewardModel

    candidates = torch.randn(7, 16)
    save_file({"embeddings": candidates}, str(tmp_path / "candidates.safetensors"))
    fewshot_ckpt = fewshot / "checkpoints" / "last.ckpt"
    for basis_path in (out / "basis.safetensors", out / "checkpoints" / "last.ckpt", fewshot_ckpt):
        scores_csv = tmp_path / f"scores_{basis_path.stem}.csv"
        build_cli(
            [
                "predict",
                "--config",
                str(ROOT / "configs/experiment/score.yaml"),
                f"--model.init_args.basis_path={basis_path}",
                f"--data.init_args.path={tmp_path / 'candidates.safetensors'}",
                f"--model.init_args.output={scores_csv}",
            ]
        )
        rows = scores_csv.read_text().splitlines()
        header = rows[0].split(",")
        expected_users = 8 if basis_path == fewshot_ckpt else 20
        assert header[0] == "candidate" and len(header) == 1 + expected_users and len(rows) == 1 + 7
        reference = PersonalRewardModel.load(basis_path)
        user = header[3]
        column = torch.tensor([float(row.split(",")[3]) for row in rows[1:]])
        torch.testing.assert_close(column, reference.score(candidates, user), rtol=1e-5, atol=1e-5)

    # validate / test / predict on the trained basis
    ckpt = str(out / "checkpoints" / "last.ckpt")
    for subcommand in ("validate", "test", "predict"):
        build_cli(
            [
                subcommand,
                "--config",
                str(ROOT / "configs/experiment/synthetic.yaml"),
                *TINY_DATA,
                *QUIET,
                f"--ckpt_path={ckpt}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                "--model.init_args.rank=3",
            ]
        )


@pytest.mark.slow
def test_console_commands_are_installed_and_run(tmp_path):
    from importlib.metadata import entry_points

    bindir = Path(sys.executable).parent
    scripts = {point.name: point.value for point in entry_points(group="console_scripts")}
    assert scripts["lightning"] == scripts["lore-pl"] == "lore_pl.cli:main"
    assert scripts["lore-pl-sweep"] == "lore_pl.experiments.sweeps:main"
    # each start imports Lightning (about 10 s here): one help through python -m, one fit through the script
    help_text = subprocess.run([sys.executable, "-m", "lore_pl", "fit", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--config" in help_text and "--model" in help_text and "--run_name" in help_text
    done = subprocess.run(
        [
            str(bindir / "lightning"),
            "fit",
            "--config",
            str(ROOT / "configs/experiment/synthetic.yaml"),
            *TINY_DATA,
            *QUIET,
            "--trainer.max_epochs=5",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unseen users, unseen prompts" in done.stdout
    assert (run_dir(tmp_path, "synthetic") / "protocol.json").is_file()


@pytest.mark.slow
def test_the_default_run_keeps_its_headline(tmp_path, monkeypatch):
    # scripts/run.sh's command as it is: the headline (unseen users, unseen prompts) and the gain
    # over one shared model are what a user first sees
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", str(ROOT / "configs/experiment/synthetic.yaml"),
               f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    results = json.loads((run_dir(tmp_path, "synthetic") / "protocol.json").read_text())
    assert results["unseen/test_acc"] >= 0.99 and results["seen/test_acc"] >= 0.99
    assert results["selection"]["rank"] == 5  # the planted rank, chosen on the validation prompts
    assert results["gain/shared/unseen/test_acc_low"] > 0.05  # personalization pays here, and clearly
