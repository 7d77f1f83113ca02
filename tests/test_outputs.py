"""Output files (``lore_pl.data.outputs``): the score CSV of ``lightning predict``, the sweeps' results and
``PersonalRewardModel.save`` never replace an input of the command, a basis, a checkpoint or another
command's file unless told to; one writer per destination; killed writers' temporary files are cleaned."""

import csv
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT, TINY_DATA, one_error_line
from lore_pl import LoreDataError, PersonalRewardModel
from lore_pl.cli import main
from lore_pl.data.atomic import HOST_TAG, stale_temporaries, write_atomic
from lore_pl.data.basis_file import BasisFile, save_basis
from lore_pl.data.outputs import OutputLock, check_output, claim_outputs, lock_path
from lore_pl.modules.scoring import SCORE_CSV

USERS = ["u1", "u2", "u3"]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid():
    """The id of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run directory with a basis, its config and a checkpoint, and a candidates file; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml under the working directory
    generator = torch.Generator().manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_basis(run / "basis.safetensors", BasisFile(torch.randn(6, 2, generator=generator), 1.0, None, USERS,
                                                    torch.softmax(torch.randn(3, 2, generator=generator), -1)))
    (run / "config.yaml").write_text("model: {}\n")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    save_file({"embeddings": torch.randn(4, 6, generator=generator)}, str(tmp_path / "candidates.safetensors"))
    return run


def predict(run, output, *extra):
    main(["predict", "--config", str(ROOT / "configs/experiment/score.yaml"), f"--model.init_args.basis_path={run}",
          f"--data.init_args.path={run.parent / 'candidates.safetensors'}", f"--model.init_args.output={output}",
          "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false", *extra])


def refused(capsys, run, output, *extra):
    """Run predict, expect exit 2 with one ``error:`` line; returns that line."""
    return one_error_line(capsys, predict, run, output, *extra)


def test_predict_refuses_to_write_over_its_inputs_a_basis_a_checkpoint_or_another_file(run, tmp_path, capsys):
    foreign = tmp_path / "notes.csv"
    foreign.write_text("my,own,notes\n1,2,3\n")
    other_basis = tmp_path / "other.safetensors"
    save_basis(other_basis, BasisFile(torch.eye(6, 2), 1.0))
    protected = {
        run / "basis.safetensors": "an input of this command",  # --model.init_args.output=RUN/basis.safetensors
        run / "config.yaml": f"a file of {run}, an input of this command",
        run / "checkpoints" / "last.ckpt": "an input of this command",
        tmp_path / "candidates.safetensors": "an input of this command",
        other_basis: "refusing to replace a lore-pl basis",
        foreign: "refusing to replace a file that lightning predict did not write",
    }
    hashes = {path: digest(path) for path in protected}
    for path, reason in protected.items():
        line = refused(capsys, run, path)
        assert str(path) in line and reason in line, line
    # --overwrite replaces a file that is not an input; an input never
    for path in (run / "basis.safetensors", run / "config.yaml", tmp_path / "candidates.safetensors"):
        assert "an input of this command" in refused(capsys, run, path, "--overwrite=true")
    assert {path: digest(path) for path in protected} == hashes
    assert not list(tmp_path.rglob(".*.lock")) and not list(tmp_path.rglob(".*.tmp"))

    predict(run, foreign, "--overwrite=true")
    assert foreign.read_text().startswith("candidate,u1,u2,u3")
    # its own CSV is replaced without being told, in the run directory too
    predict(run, foreign)
    predict(run, run / "scores.csv")
    predict(run, run / "scores.csv")
    with open(run / "scores.csv", newline="") as stream:
        assert len(list(csv.reader(stream))) == 5


def test_predict_into_a_directory_is_one_line_before_any_scoring(run, tmp_path, capsys, monkeypatch):
    import lore_pl.modules.scoring as scoring

    loads = []
    monkeypatch.setattr(scoring, "load_basis", lambda *args: loads.append(args) or 1 / 0)  # the model's setup
    (tmp_path / "out").mkdir()
    line = refused(capsys, run, tmp_path / "out")
    assert line == f"error: {tmp_path / 'out'}: the output is a directory; give the path of a file to write"
    assert not loads  # refused before the basis was even read
    assert list((tmp_path / "out").iterdir()) == [] and not list(tmp_path.glob(".out.lock"))


def test_a_second_writer_of_one_destination_is_refused_and_the_file_stays_whole(run, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    predict(run, output)
    before = digest(output)
    with claim_outputs([output], SCORE_CSV):  # another predict writing it now (this process)
        line = refused(capsys, run, output)
        assert f"{output}: another lightning predict (pid {os.getpid()}) is writing it now" in line
        assert digest(output) == before
    predict(run, output)  # released: the next one writes
    assert not lock_path(output).exists()


def test_a_lock_of_a_live_process_holds_and_one_of_a_dead_process_is_taken_over(tmp_path):
    output = tmp_path / "scores.csv"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(output).write_text(json.dumps({"pid": sleeper.pid, "host": HOST_TAG, "command": "lightning predict"}))
        with pytest.raises(LoreDataError, match=rf"another lightning predict \(pid {sleeper.pid}\) is writing"):
            OutputLock(output, "lightning predict").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with claim_outputs([output], SCORE_CSV):  # its writer died: the lock is stale
        assert json.loads(lock_path(output).read_text())["pid"] == os.getpid()
        with pytest.raises(LoreDataError, match="is writing it now"):  # held by this process now
            OutputLock(output, "lightning predict").acquire()
    assert not lock_path(output).exists()
    # a lock of another machine cannot be judged by its pid: it holds
    lock_path(output).write_text(json.dumps({"pid": dead_pid(), "host": "0badc0de", "command": "lightning predict"}))
    with pytest.raises(LoreDataError, match="delete the lock if no such process runs"):
        OutputLock(output, "lightning predict").acquire()


CLAIMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lore_pl.data.atomic import write_atomic
    from lore_pl.data.outputs import OutputKind, claim_outputs, first_line_starts
    from lore_pl.errors import LoreDataError
    output, held, go = map(Path, sys.argv[1:])
    kind = OutputKind("lightning predict", first_line_starts("candidate,"), "a score CSV")  # no Lightning import
    try:
        with claim_outputs([output], kind):
            held.touch()
            while not go.exists():
                time.sleep(0.01)
            write_atomic(output, lambda stream: stream.write("candidate,u1\\n0,1\\n"))
        print("written")
    except LoreDataError as error:
        print("refused:", error)
""")


def test_two_processes_writing_one_destination_at_once_one_is_refused(tmp_path):
    output, held, go = tmp_path / "scores.csv", tmp_path / "held", tmp_path / "go"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", CLAIMER, output, held, go], env=environment,
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):  # the first holds the lock (waits for the go)
            if held.exists() or first.poll() is not None:
                break
            time.sleep(0.01)
        assert held.exists()
        second = subprocess.run([sys.executable, "-c", CLAIMER, output, tmp_path / "held2", go], env=environment,
                                capture_output=True, text=True, timeout=60)
        assert second.stdout.startswith(f"refused: {output}: another lightning predict (pid {first.pid})")
        go.touch()
        assert first.communicate(timeout=60)[0].strip() == "written"
    finally:
        first.kill()
    assert output.read_text().startswith("candidate,u1") and not lock_path(output).exists()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_and_nothing_else(tmp_path):
    output = tmp_path / "scores.csv"
    killed = textwrap.dedent(f"""
        import os, signal
        from lore_pl.data.atomic import write_atomic
        write_atomic({str(output)!r}, lambda stream: os.kill(os.getpid(), signal.SIGKILL))
    """)
    result = subprocess.run([sys.executable, "-c", killed], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == -9
    (left,) = tmp_path.glob(".scores.csv.*.tmp")
    assert left.stat().st_size == 0 and not output.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f".scores.csv.{sleeper.pid}-{HOST_TAG}.abcdefgh.tmp",  # a live writer's
                tmp_path / f".scores.csv.{dead_pid()}-0badc0de.abcdefgh.tmp",  # another machine's
                tmp_path / ".scores.csv.abcdefgh.tmp",  # no pid in its name
                tmp_path / f".other.csv.{dead_pid()}-{HOST_TAG}.abcdefgh.tmp",  # another destination's
                tmp_path / f"scores.csv.{dead_pid()}-{HOST_TAG}.abcdefgh.tmp"]  # not hidden: not ours
        for path in kept:
            path.write_text("")
        assert stale_temporaries(output) == [left]
        previous = os.umask(0o027)
        try:
            write_atomic(output, lambda stream: stream.write("candidate,u1\n"))
        finally:
            os.umask(previous)
        assert not left.exists() and all(path.exists() for path in kept)
        assert output.stat().st_mode & 0o777 == 0o640  # the umask's mode, not mkstemp's 0600
    finally:
        sleeper.kill()
        sleeper.wait()


def test_save_replaces_no_existing_file_unless_told_and_never_a_directory(run, tmp_path):
    model = PersonalRewardModel.load(run / "basis.safetensors")
    model.personalize("new", torch.randn(3, 6), torch.randn(3, 6))
    checkpoint, foreign = run / "checkpoints" / "last.ckpt", tmp_path / "notes.txt"
    foreign.write_text("mine")
    for path, what in [(run / "basis.safetensors", "a lore-pl basis"), (checkpoint, "a checkpoint"),
                       (foreign, "a file that PersonalRewardModel.save did not write")]:
        before = digest(path)
        with pytest.raises(LoreDataError, match=rf"refusing to replace {what} .*; pass overwrite=True to replace it"):
            model.save(path)
        assert digest(path) == before
    with pytest.raises(LoreDataError, match="the output is a directory"):
        model.save(run, overwrite=True)
    model.save(run / "basis.safetensors", overwrite=True)
    assert PersonalRewardModel.load(run / "basis.safetensors").user_ids == [*USERS, "new"]
    model.save(tmp_path / "new.safetensors")
    assert not list(tmp_path.rglob(".*.lock"))


def test_check_output_by_hand(tmp_path):
    mine, theirs = tmp_path / "mine.csv", tmp_path / "theirs.csv"
    mine.write_text("line,user_id,reward\n1,u,0.5\n")
    theirs.write_text("line,user,reward\n")
    assert check_output(mine, SCORE_CSV) == mine and check_output(tmp_path / "new.csv", SCORE_CSV)
    with pytest.raises(LoreDataError, match="refusing to replace a file that lightning predict did not write"):
        check_output(theirs, SCORE_CSV)
    assert check_output(theirs, SCORE_CSV, overwrite=True) == theirs
    (tmp_path / "link.csv").symlink_to(theirs)  # a link to an input is that input
    with pytest.raises(LoreDataError, match="an input of this command"):
        check_output(tmp_path / "link.csv", SCORE_CSV, inputs=[theirs], overwrite=True)
    with pytest.raises(LoreDataError, match="is a file"), claim_outputs([mine / "x.csv"], SCORE_CSV):
        pass


def test_sweep_results_are_recognised_and_foreign_ones_refused_before_the_sweep_runs(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lore_pl.experiments.sweeps import _write_outputs, main, sweep_output

    figure = plt.figure()
    _write_outputs(tmp_path / "shots", {"command": "lore-pl-sweep shots"}, ["shots", "reference_mean"], [[1, 0.5]],
                   figure)
    plt.close(figure)
    shots, rank = sweep_output("shots"), sweep_output("rank")
    for name in ("results.json", "results.csv", "results.png"):
        assert shots.recognises(tmp_path / "shots" / name) and not rank.recognises(tmp_path / "shots" / name)

    basis, out = tmp_path / "basis.safetensors", tmp_path / "out"
    save_basis(basis, BasisFile(torch.eye(16, 3), 1.0))
    out.mkdir()
    (out / "results.csv").write_text("my,table\n")
    before = digest(out / "results.csv")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["shots", "--config", str(ROOT / "configs/sweep/shots.yaml"), f"--basis_path={basis}", "--shots=[1]",
              "--trials=1", f"--out_dir={out}", *TINY_DATA])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out / 'results.csv'}: refusing to replace a file that lore-pl-sweep shots did not write "
        "(lore-pl-sweep shots replaces only the results.json/csv/png of a shots sweep); pass --overwrite=true "
        "to replace it")
    assert digest(out / "results.csv") == before and sorted(os.listdir(out)) == ["results.csv"]
