"""The default fit at scale: wall time by phase and peak memory, one JSON line per case.

Each case is ``lightning fit --config configs/experiment/synthetic.yaml`` (the default run: MAP estimator,
K and strengths chosen on validation prompts, the protocol at the end) on the synthetic population with
C seen users x 30 train prompts at dimension d, its test splits kept on disk (``test_features_dir``, in the
case's temporary folder).
Each case runs in its own process, so its peak RSS is its own. Printed per case: the phases' seconds
(``data``: generation, checks and the validation hold-out; ``selection``: model selection, of which
``spectral`` is the spectral start; ``training``: the epochs of the full-space path with their validation;
``protocol``: the evaluation at fit end), the process's peak RSS (VmHWM: anonymous and mapped file pages)
after each phase, and the bytes of the training features (seen users' train and validation pairs), with
the target "peak RSS under 1.5x the training features' bytes plus 1 GiB". After the cases of a part,
a line with the growth exponents (slope of log time and log RSS against log C or log d).

    python benchmarks/scale.py --quick              # C = 1k at d = 256 and 1024
    python benchmarks/scale.py --part fit           # C = 1k / 10k / 100k at d = 1024
    python benchmarks/scale.py --part dims          # d = 256 / 1024 / 4096 at C = 1k
    python benchmarks/scale.py --part fit --users 100000 --dim 256   # one case of your own
    python benchmarks/scale.py --part fit --through data             # the data side alone: generate, check, no fit
    python benchmarks/scale.py --part scoring       # 100k candidates for 1 and 1000 users against E @ H
                                                    # (benchmarks/scale_scoring.py, which has more options)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = 30
#: the parts and their cases (seen users, d); ``--quick`` takes the cases marked quick
PARTS = {
    "fit": [(1_000, 1024, True), (10_000, 1024, False), (100_000, 1024, False)],
    "dims": [(1_000, 256, True), (1_000, 1024, True), (1_000, 4096, False)],
}
GIB = 2**30


def peak_rss_bytes() -> int:
    """VmHWM of this process: the peak of its resident set, mapped file pages included."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


# ------------------------------------------------------------------------------ one case (child)
class PhaseLog:
    """Seconds and peak RSS after each phase, rewritten to ``path`` as each one ends (a killed case
    leaves the phases it finished)."""

    def __init__(self, path: Path) -> None:
        self.path, self.phases, self.facts = path, {}, {}

    def record(self, name: str, seconds: float, cpu_seconds: float) -> None:
        before = self.phases.get(name, {})
        self.phases[name] = {"s": round(before.get("s", 0.0) + seconds, 3),
                             "cpu_s": round(before.get("cpu_s", 0.0) + cpu_seconds, 3),
                             "peak_rss_gib": round(peak_rss_bytes() / GIB, 3)}
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps({"phases": self.phases, **self.facts}))

    def timed(self, owner, name: str, phase: str, first_only: bool = False) -> None:
        """Time ``owner.name`` (a function or method) as ``phase``."""
        original = getattr(owner, name)
        log = self

        def wrapper(*args, **kwargs):
            if first_only and phase in log.phases:
                return original(*args, **kwargs)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                log.record(phase, time.perf_counter() - start, time.process_time() - cpu)

        setattr(owner, name, wrapper)


def data_only(users: int, dim: int) -> None:
    """The default run's data module at this size, generated and checked, and no fit."""
    import yaml

    from datamodules import SyntheticPopulationDataModule

    settings = yaml.safe_load((ROOT / "configs/data/synthetic.yaml").read_text())["init_args"]
    settings.update(num_seen_users=users, dim=dim, train_prompts_per_user=PAIRS,
                    test_features_dir=str(Path.cwd() / "test-features"))  # the case's folder
    SyntheticPopulationDataModule(**settings).data  # noqa: B018 - generates


def run_case(users: int, dim: int, report: Path, root: Path, through: str = "fit") -> None:
    import torch
    from lightning.pytorch.loops.fit_loop import _FitLoop

    import callbacks.protocol as protocol
    from datamodules.base import PreferenceDataModule
    from lore_pl import cli
    from lore_pl.core import estimator

    log = PhaseLog(report)
    loaded = PreferenceDataModule.data

    def data(self):
        if self._data is None:
            start, cpu = time.perf_counter(), time.process_time()
            value = loaded.fget(self)
            log.record("data", time.perf_counter() - start, time.process_time() - cpu)
            seen = [self.split(role) for role in ("seen_train", "seen_val") if self.has_split(role)]
            log.facts.update(
                train_pairs=sum(len(split) for split in seen),
                train_feature_bytes=sum(len(split) * split.dim * split.features.element_size() for split in seen),
                test_feature_bytes_on_disk=sum(split.source.stat().st_size for split in self.data.splits.values()
                                               if split.source is not None),
            )
            log.write()
            return value
        return loaded.fget(self)

    PreferenceDataModule.data = property(data)
    log.timed(estimator, "select_model", "selection")
    if hasattr(estimator, "spectral_subspace"):
        log.timed(estimator, "spectral_subspace", "spectral")
    log.timed(_FitLoop, "run", "training")
    log.timed(protocol.ProtocolEvaluation, "on_fit_end", "protocol")
    start, cpu = time.perf_counter(), time.process_time()
    if through == "data":
        data_only(users, dim)
        log.facts.update(total_s=round(time.perf_counter() - start, 3), total_cpu_s=round(time.process_time() - cpu, 3))
        log.write()
        return
    sys.argv = sys.argv[:1]  # the case's own arguments are not the CLI's
    cli.main([
        "fit", "--config", str(ROOT / "configs/experiment/synthetic.yaml"),
        f"--data.init_args.num_seen_users={users}", f"--data.init_args.dim={dim}",
        f"--data.init_args.train_prompts_per_user={PAIRS}",
        f"--data.init_args.test_features_dir={root / 'test-features'}",  # in the case's folder: removed even if killed
        f"--trainer.default_root_dir={root}",
    ])
    log.facts["total_s"] = round(time.perf_counter() - start, 3)
    log.facts["total_cpu_s"] = round(time.process_time() - cpu, 3)
    log.facts["threads"] = torch.get_num_threads()
    written = sorted(Path.cwd().rglob("protocol.json"))  # the case runs in a folder of its own
    results = json.loads(written[0].read_text()) if written else {}
    keys = ("unseen/test_acc", "baselines/shared/unseen/test_acc", "baselines/population/unseen/test_acc",
            "oracle/unseen/test_acc", "seen/test_acc")
    log.facts["results"] = {key: results.get(key) for key in keys}
    log.facts["chosen_rank"] = results.get("selection", {}).get("rank")
    log.write()


# ---------------------------------------------------------------------------------- the driver
def case_line(part: str, users: int, dim: int, timeout: float, through: str = "fit") -> dict:
    """Run one case in its own process; its line (phases, peak RSS, target, status)."""
    with tempfile.TemporaryDirectory(prefix="lore-scale-") as folder:
        report = Path(folder) / "report.json"
        run = Path(folder) / "run"  # the child's working folder: its logs and checkpoints go there
        run.mkdir()
        command = [sys.executable, str(Path(__file__).resolve()), "--case", str(users), str(dim),
                   "--report", str(report), "--root", str(run), "--through", through]
        start = time.perf_counter()
        load_before = os.getloadavg()[0]
        with open(Path(folder) / "output.log", "w") as output:
            child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=run)
            code, usage, status = wait_with_usage(child, timeout)
        wall = time.perf_counter() - start
        if status == "ok" and code != 0:
            status = f"exit {code}: " + (Path(folder) / "output.log").read_text()[-600:]
        found = json.loads(report.read_text()) if report.is_file() else {"phases": {}}
    phases = found.pop("phases")
    peak = max([entry["peak_rss_gib"] for entry in phases.values()], default=float("nan"))
    peak = max(peak, usage.ru_maxrss * 1024 / GIB)  # the child's own peak, from the kernel
    train_bytes = found.get("train_feature_bytes", users * PAIRS * dim * 4)
    target = 1.5 * train_bytes / GIB + 1.0
    total = found.get("total_s")
    line = {
        "benchmark": "scale", "part": part, "through": through, "users": users, "pairs_per_user": PAIRS, "d": dim,
        "status": status,
        "wall_s": round(wall, 1), "fit_s": total, "fit_cpu_s": found.pop("total_cpu_s", None),
        "phases_s": {name: entry["s"] for name, entry in phases.items()},
        "phases_cpu_s": {name: entry["cpu_s"] for name, entry in phases.items()},
        "peak_rss_gib": round(peak, 3),
        "peak_rss_after_gib": {name: entry["peak_rss_gib"] for name, entry in phases.items()},
        "train_feature_gib": round(train_bytes / GIB, 3), "target_rss_gib": round(target, 3),
        "rss_within_target": peak < target,
        "selection_share": round(phases["selection"]["s"] / total, 3) if total and "selection" in phases else None,
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        **{key: value for key, value in found.items() if key != "total_s"},
    }
    if "test_feature_bytes_on_disk" in line:
        line["test_feature_gib_on_disk"] = round(line.pop("test_feature_bytes_on_disk") / GIB, 3)
    return line


def wait_with_usage(child: subprocess.Popen, timeout: float):
    """(exit status, the child's resource usage, "ok" or why it was stopped): ``wait4`` gives this child's
    own peak RSS (``getrusage`` of all children would give the largest of them so far)."""
    deadline, status = time.monotonic() + timeout, "ok"
    while True:
        pid, code, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            child.kill()
            _, code, usage = os.wait4(child.pid, 0)
            status = f"killed after {timeout:.0f} s"
            break
        time.sleep(0.5)
    child.returncode = os.waitstatus_to_exitcode(code)
    return child.returncode, usage, status


def exponents(lines: list[dict], along: str) -> dict:
    """Slopes of log(fit time), log(each phase's time) and log(peak RSS) against log(``along``), between
    consecutive finished cases."""
    done = sorted((line for line in lines if line["status"] == "ok"), key=lambda line: line[along])
    slopes = {}
    for low, high in zip(done, done[1:]):
        span = math.log(high[along] / low[along])
        if span == 0:
            continue
        measures = {"fit": (low["fit_s"], high["fit_s"]), "peak_rss": (low["peak_rss_gib"], high["peak_rss_gib"])}
        measures.update({phase: (low["phases_s"][phase], high["phases_s"].get(phase))
                         for phase in low["phases_s"]})
        slopes[f"{low[along]}->{high[along]}"] = {
            name: round(math.log(b / a) / span, 2) for name, (a, b) in measures.items() if a and b
        }
    return slopes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", action="append", choices=sorted([*PARTS, "scoring"]),
                        help="which cases (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="only the small cases")
    parser.add_argument("--users", type=int, nargs="+", help="these seen-user counts instead of the part's")
    parser.add_argument("--dim", type=int, nargs="+", help="these dimensions instead of the part's")
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds before a case is killed")
    parser.add_argument("--through", choices=("fit", "data"), default="fit",
                        help="run the whole default fit, or only generate and check its data (the data side alone)")
    parser.add_argument("--case", type=int, nargs=2, metavar=("USERS", "DIM"), help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        run_case(*args.case, args.report, args.root, args.through)
        return
    measured: dict[tuple[int, int], dict] = {}
    if "scoring" in (args.part or ["scoring"]):
        from scale_scoring import scoring_rows  # the scoring cases: in process, against the matmul floor

        for row in scoring_rows():
            print(json.dumps({**row, "part": "scoring"}), flush=True)
    for part in [part for part in args.part or sorted(PARTS, reverse=True) if part != "scoring"]:
        cases = [(users, dim) for users, dim, quick in PARTS[part] if quick or not args.quick]
        if args.users or args.dim:
            cases = [(users, dim) for users in (args.users or sorted({u for u, _ in cases}))
                     for dim in (args.dim or sorted({d for _, d in cases}))]
        lines = []
        for users, dim in cases:
            if (users, dim) not in measured:  # a case in two parts (C=1k, d=1024) runs once
                measured[users, dim] = case_line(part, users, dim, args.case_timeout, args.through)
            lines.append({**measured[users, dim], "part": part})
            print(json.dumps(lines[-1]), flush=True)
        along = "users" if part == "fit" else "d"
        if len(lines) > 1:
            print(json.dumps({"benchmark": "scale", "part": part, "exponents_along": along,
                              "exponents": exponents(lines, along)}), flush=True)


if __name__ == "__main__":
    main()
