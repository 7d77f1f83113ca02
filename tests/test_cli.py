"""End to end: the README's main command with tiny overrides, in-process and as a console command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY_DATA, run_dir
from lore_pl import BasisModule, LoreDataError, load_basis
from lore_pl.cli import build_cli
from lore_pl.core.stats import mean_std_over_users, per_user_accuracy


@pytest.mark.slow
def test_synthetic_protocol_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs without a logger save their config.yaml in the working directory
    args = ["fit", "--config", str(ROOT / "configs/experiment/synthetic.yaml"), *TINY_DATA,
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
        build_cli(["fit", "--config", str(ROOT / "configs/experiment/fewshot.yaml"), *TINY_DATA,
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

    # validate / test / predict on the trained basis: each runs on the checkpoint and they agree
    ckpt = str(out / "checkpoints" / "last.ckpt")
    trainers = {}
    for subcommand in ("validate", "test", "predict"):
        trainers[subcommand] = build_cli(
            [
                subcommand,
                "--config",
                str(ROOT / "configs/experiment/synthetic.yaml"),
                *TINY_DATA,
                f"--ckpt_path={ckpt}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                "--model.init_args.rank=3",
            ]
        ).trainer
    assert trainers["validate"].callback_metrics["val/acc"] >= 0.9  # the seen users' held-out prompts
    test_acc = float(trainers["test"].callback_metrics["test/acc"])
    assert test_acc == pytest.approx(results["seen/test_acc"], abs=0.02)  # the protocol's, up to pruning
    # predict yields the logits of the seen users' test pairs: the same accuracy as `test`
    batches = trainers["predict"].predict_loop.predictions
    logits, users = (torch.cat([batch[key] for batch in batches]) for key in ("logits", "users"))
    test_split = trainers["test"].datamodule.split("seen_test")
    assert torch.equal(users, test_split.users)
    per_user = per_user_accuracy(logits, users, test_split.num_users)
    assert mean_std_over_users(per_user)[0] == pytest.approx(test_acc, abs=1e-6)


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


def run_main(capsys, *args: str) -> tuple[int, str]:
    from lore_pl.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(ROOT / "configs/experiment/synthetic.yaml"), *TINY_DATA, *args])
    return stopped.value.code, capsys.readouterr().err


def test_a_fixed_version_that_holds_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "logs" / "mine" / "version_3"
    run.mkdir(parents=True)
    (run / "protocol.json").write_text("{}")
    logger = [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--run_name=mine",
              "--trainer.logger.init_args.version=3"]
    code, err = run_main(capsys, *logger)
    assert code == 2 and f"{run} already holds a run" in err and "--overwrite" in err
    assert "Traceback" not in err and (run / "protocol.json").read_text() == "{}"
    # --overwrite goes past the check (and then fails on a setting, before anything is written)
    code, err = run_main(capsys, *logger, "--overwrite=true", "--model.init_args.prune_threshold=2")
    assert code == 2 and "already holds" not in err and (run / "protocol.json").read_text() == "{}"


def test_a_bad_setting_is_one_line_that_names_it(tmp_path, capsys):
    code, err = run_main(capsys, f"--trainer.logger.init_args.save_dir={tmp_path}",
                         "--model.init_args.prune_threshold=2")
    assert code == 2
    assert err.strip() == "error: prune_threshold must be in [0, 1], got 2.0"


def test_ckpt_path_last_without_a_checkpoint_says_where_it_looked(tmp_path, capsys):
    code, err = run_main(capsys, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--ckpt_path=last")
    assert code == 2 and "no checkpoint to resume from" in err
    assert str(tmp_path / "logs" / "synthetic" / "version_*" / "checkpoints" / "last.ckpt") in err
    assert not (tmp_path / "logs").exists()  # no new run was started


def test_ckpt_path_last_takes_the_newest_version_that_has_a_checkpoint(tmp_path):
    from jsonargparse import Namespace

    from lore_pl.cli import resolve_last_checkpoint

    root = tmp_path / "logs" / "mine"
    for version, has_checkpoint in ((0, True), (2, True), (10, True), (11, False)):
        (root / f"version_{version}" / "checkpoints").mkdir(parents=True)
        if has_checkpoint:
            (root / f"version_{version}" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(tmp_path / "logs"), name="mine", version=None))
    config = Namespace(trainer=Namespace(logger=logger, callbacks=[]))
    assert resolve_last_checkpoint(config) == (root / "version_10" / "checkpoints" / "last.ckpt", 10)
    logger.init_args.version = 2  # a fixed version resumes that one only
    assert resolve_last_checkpoint(config) == (root / "version_2" / "checkpoints" / "last.ckpt", 2)


# ------------------------------------------------------------------ user errors: one line, exit 2
def run_command(capsys, argv: list[str]) -> tuple[int, str]:
    """``lightning ARGV`` in-process, or ``lore-pl-sweep ...`` when ARGV starts with that."""
    from lore_pl.cli import main
    from lore_pl.experiments.sweeps import main as sweep

    with pytest.raises(SystemExit) as stopped:
        sweep(argv[1:]) if argv[0] == "lore-pl-sweep" else main(argv)
    return stopped.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *expected: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err[-3000:]
    assert all(part in lines[0] for part in expected), lines[0]
    return lines[0]


@pytest.mark.parametrize("name, why", [
    ("../../escape", "path separator"), ("/tmp/abs", "path separator"), ("a\\b", "path separator"),
    (".", "directory reference"), ("..", "directory reference"), ("x" * 10_000, "10000 characters"),
    ("a\x00b", "control character"), ("a\nb", "control character"), (" ", "empty"), ("", "empty"),
])
def test_a_run_name_is_one_path_component(name, why):
    from lore_pl.cli import check_run_name

    with pytest.raises(LoreDataError, match=f"--run_name .*{why}") as error:
        check_run_name(name)
    assert len(str(error.value)) < 400  # a 10k-character name is shown cut
    check_run_name("my-run_2.b é")  # a name, whatever its letters


@pytest.mark.parametrize("name", ["../../escape", "a\x00b"])
def test_a_run_name_that_is_a_path_writes_nothing(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, f"--trainer.logger.init_args.save_dir={tmp_path / 'a' / 'b' / 'logs'}",
                         f"--run_name={name}")
    assert_one_error_line(code, err, "--run_name")
    assert list(tmp_path.iterdir()) == []  # nothing was written, inside save_dir or out of it


@pytest.mark.parametrize("version", ["..", "../x", "a/b"])
def test_a_logger_version_given_as_a_string_is_a_name_too(tmp_path, capsys, monkeypatch, version):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                         f"--trainer.logger.init_args.version={version}")
    assert_one_error_line(code, err, "the logger's version")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def scoring_files(tmp_path_factory):
    """A basis of 3 users at d=16 and 5 candidate embeddings: what `lightning predict` scores."""
    from safetensors.torch import save_file

    from lore_pl.data.basis_file import BasisFile, save_basis

    root = tmp_path_factory.mktemp("scoring")
    generator = torch.Generator().manual_seed(0)
    save_basis(root / "basis.safetensors", BasisFile(torch.randn(16, 2, generator=generator), 1.0,
                                                     user_ids=["a", "b", "c"], user_weights=torch.full((3, 2), 0.5)))
    save_file({"embeddings": torch.randn(5, 16, generator=generator)}, str(root / "candidates.safetensors"))
    one_user = root / "one_user.jsonl"
    one_user.write_text("".join(json.dumps({"user_id": "only", "prompt": f"question {i}", "chosen": "yes please",
                                            "rejected": "no thanks"}) + "\n" for i in range(6)))
    return root


def predict_args(root: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(ROOT / "configs/experiment/score.yaml"), "--trainer.accelerator=cpu",
            "--trainer.devices=1", f"--trainer.default_root_dir={root / 'predict'}",
            f"--model.init_args.basis_path={root / 'basis.safetensors'}",
            f"--data.init_args.path={root / 'candidates.safetensors'}", f"--model.init_args.output={root / 's.csv'}",
            *extra]


def fit_args(root: Path, command: str = "fit", *extra: str) -> list[str]:
    return [command, "--config", str(ROOT / "configs/experiment/synthetic.yaml"), *TINY_DATA,
            f"--trainer.logger.init_args.save_dir={root / 'logs'}", *extra]


def preference_args(root: Path, model: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/experiment/tulu1.yaml"),
            f"--data.init_args.path={root / 'one_user.jsonl'}", f"--data.init_args.cache_dir={root / 'cache'}",
            f"--data.init_args.embedder.model={model}", "--data.init_args.embedder.kind=reward_model",
            f"--trainer.logger.init_args.save_dir={root / 'logs'}", *extra]


USER_ERRORS = {
    # predict (score.yaml)
    "predict: the output is a directory": (lambda root, model: predict_args(root, f"--model.init_args.output={root}"),
                                           "is a directory"),
    "predict: an unknown user": (lambda root, model: predict_args(root, "--model.init_args.users=[nobody]"),
                                 "unknown user(s) ['nobody']"),
    "predict: no such basis file": (lambda root, model: predict_args(root, f"--model.init_args.basis_path={root}/no"),
                                    "no such run directory or basis file"),
    "predict: batch_size 0": (lambda root, model: predict_args(root, "--data.init_args.batch_size=0"),
                              "batch_size must be >= 1"),
    "predict text: batch_size 0": (lambda root, model: [
        "predict", "--config", str(ROOT / "configs/experiment/score_text.yaml"), f"--model.init_args.basis_path={root}",
        "--model.init_args.batch_size=0", f"--data.init_args.path={root / 'r.jsonl'}"], "batch_size must be a number"),
    # the sweeps
    "sweep: no such basis file": (lambda root, model: [
        "lore-pl-sweep", "shots", "--config", str(ROOT / "configs/sweep/shots.yaml"), f"--basis_path={root}/no",
        f"--out_dir={root}/sweep"], "basis file not found"),
    "sweep: an unknown method": (lambda root, model: [
        "lore-pl-sweep", "shots", "--config", str(ROOT / "configs/sweep/shots.yaml"),
        f"--basis_path={root}/basis.safetensors", "--methods=[bogus]", f"--out_dir={root}/sweep"],
                                 "unknown few-shot methods ['bogus']"),
    "sweep: a rank that is not an int": (lambda root, model: [
        "lore-pl-sweep", "rank", "--config", str(ROOT / "configs/sweep/rank.yaml"), "--ranks=[0.5]"],
                                         "ranks: Expected a <class 'int'>"),
    # fit, validate, test
    "fit: a preference file with one user": (lambda root, model: preference_args(root, model),
                                             "(1 user(s), 6 prompt(s)); seen users train the basis"),
    "fit: min_pairs_per_user 2.5": (lambda root, model: preference_args(
        root, model, "--data.init_args.min_pairs_per_user=2.5"), "min_pairs_per_user: Expected a <class 'int'>"),
    "fit: batch_size 0": (lambda root, model: fit_args(root, "fit", "--data.init_args.batch_size=0"),
                          "batch_size must be a number of pairs >= 1"),
    "fit: an option that does not exist": (lambda root, model: fit_args(root, "fit", "--trainer.max_epochz=3"),
                                           "max_epochz"),
    "fit: a config file that does not exist": (lambda root, model: ["fit", "--config", f"{root}/no.yaml"],
                                               "config: File does not exist"),
    "fit: K > d, found in setup": (lambda root, model: fit_args(root, "fit", "--model.init_args.estimator=adam",
                                                                "--model.init_args.rank=17"), "rank K=17 exceeds"),
    "validate: no such checkpoint": (lambda root, model: fit_args(root, "validate", f"--ckpt_path={root}/no.ckpt"),
                                     "no.ckpt: no such checkpoint file"),
    "test: a setting out of range": (lambda root, model: fit_args(root, "test", "--model.init_args.prune_threshold=2"),
                                     "prune_threshold must be in [0, 1]"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_every_user_error_of_every_command_is_one_line_and_exit_2(case, scoring_files, tiny_reward_model, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(scoring_files)  # lightning_logs/ of the runs without a save_dir stays in here
    build, expected = USER_ERRORS[case]
    code, err = run_command(capsys, build(scoring_files, tiny_reward_model))
    assert_one_error_line(code, err, expected)
    assert not (scoring_files / "s.csv").exists()
