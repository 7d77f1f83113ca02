"""Speed and memory of lore-pl against baselines run in the same process. Prints one JSON object per
benchmark, one per line. The machine is shared and noisy: read the ratios and medians.

    python benchmarks/run.py --quick          # a small subset, under 2 minutes on 2 cores
    python benchmarks/run.py                  # the full set (the reference-loop baseline at 5000 users is slow)
    python benchmarks/run.py --only fewshot   # one benchmark: basis_step, fewshot, fewshot_module, lightning, memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lore_pl.core import cpu_kernel  # noqa: E402
from lore_pl.core import fewshot as FS  # noqa: E402
from lore_pl.core import functional as LF  # noqa: E402


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def population(num_users: int, pairs: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_users * pairs, dim, generator=generator)
    users = torch.arange(num_users).repeat_interleave(pairs)
    return features, users


def lean_trainer(**kwargs):
    """A Trainer with nothing but the loop: no logger, checkpoints, progress bar, summary or validation."""
    from lightning import Trainer

    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def interleaved(fn, baseline, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``fn`` and of ``baseline``, and the median of their per-round ratio.

    The two alternate, so a burst of load from other jobs hits both sides of one ratio.
    """
    fn(), baseline()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        middle = time.perf_counter()
        baseline()
        rounds.append((middle - start, time.perf_counter() - middle))
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    return median([a for a, _ in rounds]), median([b for _, b in rounds]), median([a / b for a, b in rounds])


def training_step(features, users, basis, logits, optimizer, tau=100.0, fused=True):
    """The project's full-batch step: ``LF.pair_loss`` (the fused CPU kernel unless ``fused=False``)."""
    optimizer.zero_grad()
    loss, _ = LF.pair_loss(features, users, basis, LF.simplex_weights(logits), tau, "user_mean", fused=fused)
    loss.backward()
    optimizer.step()


def reference_loop_step(per_user, basis, logits, optimizer, tau=100.0):
    """The reference's joint class: all users' directions V softmax(W)^T, then a Python loop."""
    optimizer.zero_grad()
    directions = basis @ torch.softmax(logits, dim=1).T
    loss = 0.0
    for user, x in enumerate(per_user):
        loss = loss - torch.log(torch.sigmoid(x @ directions[:, user] / tau)).sum() / len(x)
    loss.backward()
    optimizer.step()


def bench_bfloat16(features, users, basis, logits, optimizer, bound: float, repeats: int) -> dict:
    """The same step on a bfloat16 copy of the features (freed on return): its time against float32,
    against its own bound (half the bytes: half the float32 read) and its loss error."""
    narrow = features.to(torch.bfloat16)
    narrow_step, _, ratio = interleaved(lambda: training_step(narrow, users, basis, logits, optimizer),
                                        lambda: training_step(features, users, basis, logits, optimizer), repeats)
    with torch.no_grad():
        weights = LF.simplex_weights(logits)
        exact, _ = LF.pair_loss(features, users, basis, weights, 100.0, "user_mean")
        rounded, _ = LF.pair_loss(narrow, users, basis, weights, 100.0, "user_mean")
    return {"bf16_step_ms": narrow_step * 1e3, "bf16_speedup_vs_float32": 1 / ratio,
            "bf16_ratio_to_bound": narrow_step / (bound / 2), "bf16_loss_rel_error": float(abs(rounded / exact - 1))}


def bench_basis_step(cases, loop_max_users: int, repeats: int = 9) -> list[dict]:
    """Our step against one streaming read of the features (the bound), the PyTorch path and the
    reference's per-user loop. ``ratio_to_bound`` is the median of per-round ratios to a sum of X."""
    rows = []
    for num_users, dim, rank in cases:
        features, users = population(num_users, 30, dim)
        basis = torch.randn(dim, rank, requires_grad=True)
        logits = torch.randn(num_users, rank, requires_grad=True)
        optimizer = torch.optim.Adam([basis, logits], lr=0.5)
        ours, bound, ratio = interleaved(lambda: training_step(features, users, basis, logits, optimizer),
                                         lambda: features.sum(), repeats)
        pytorch = median_seconds(lambda: training_step(features, users, basis, logits, optimizer, fused=False), 3)
        row = {"benchmark": "basis_step", "users": num_users, "d": dim, "K": rank, "pairs": features.shape[0],
               "fused_kernel": cpu_kernel.applies(features, basis), "step_ms": ours * 1e3,
               "one_read_bound_ms": bound * 1e3, "ratio_to_bound": ratio, "pytorch_path_ms": pytorch * 1e3,
               "speedup_vs_pytorch_path": pytorch / ours}
        row.update(bench_bfloat16(features, users, basis, logits, optimizer, bound, repeats))
        if num_users <= loop_max_users:
            per_user = list(features.split(30))
            slow = num_users > 1000  # ~3 minutes a step at 5000 users: time one, no warm-up
            loop = median_seconds(lambda: reference_loop_step(per_user, basis, logits, optimizer), 1 if slow else 3,
                                  warmup=0 if slow else 1)
            row.update(reference_loop_ms=loop * 1e3, speedup=loop / ours)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_fewshot(num_users: int = 500, shots: int = 50, rank: int = 5, steps: int = 500,
                  loop_sample: int = 10) -> dict:
    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(num_users * shots, rank, generator=generator) * 30
    users = torch.arange(num_users).repeat_interleave(shots)
    init = torch.randn(num_users, rank, generator=generator)
    batched = median_seconds(lambda: FS.fit_user_weights(projected, users, init, steps=steps), 3)
    one = torch.zeros(shots, dtype=torch.long)
    per_fit = (
        median_seconds(
            lambda: [
                FS.fit_user_weights(projected[u * shots : (u + 1) * shots], one, init[u : u + 1], steps=steps)
                for u in range(loop_sample)
            ],
            1,
        )
        / loop_sample
    )
    return {
        "benchmark": "fewshot",
        "users": num_users,
        "shots": shots,
        "K": rank,
        "steps": steps,
        "batched_s": batched,
        "loop_s_estimated": per_fit * num_users,
        "loop_fits_timed": loop_sample,
        "speedup": per_fit * num_users / batched,
    }


def bench_fewshot_module(
    num_users: int = 500, shots: int = 50, dim: int = 4096, rank: int = 5, steps: int = 500, repeats: int = 3
) -> dict:
    """Phase 2 through ``Trainer.fit`` (``FewShotModule``: loaders, the shots subsample, projection, the
    solver, checkpoint-free) against the bare solver on the same pairs (projection + ``adapt_users``)."""

    from datamodules.base import PreferenceData, PreferenceDataModule
    from lore_pl.cli import quiet
    from lore_pl.core.fewshot import FewShotSettings, adapt_users
    from lore_pl.data.preferences import PreferenceSplit
    from lore_pl.modules.fewshot import FewShotModule

    quiet()
    features, users = population(num_users, shots, dim)
    ids = [str(u) for u in range(num_users)]
    basis = torch.randn(dim, rank, generator=torch.Generator().manual_seed(1))
    settings = FewShotSettings(shots=shots, steps=steps, lr=0.1)

    class InMemory(PreferenceDataModule):
        def load(self):
            pool = PreferenceSplit(features, users, ids)
            return PreferenceData({"unseen_pool": pool, "unseen_test": pool})

    data = InMemory()
    data.setup("fit")

    def lightning_fit() -> float:
        trainer = lean_trainer(max_epochs=1, log_every_n_steps=1)
        module = FewShotModule.from_basis(basis, 100.0, fewshot=settings)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        return time.perf_counter() - start

    def bare() -> tuple[float, float]:
        start = time.perf_counter()
        kept = LF.sample_shots(users, shots, settings.shot_generator())
        projected = LF.project(features[kept], basis)
        middle = time.perf_counter()
        adapt_users(projected, users[kept], num_users, settings, 100.0)
        end = time.perf_counter()
        return end - start, end - middle

    lightning_fit(), bare()  # warm-up
    rounds = [(*bare(), lightning_fit()) for _ in range(repeats)]
    solver, fit_only, fit = (sorted(values)[len(values) // 2] for values in zip(*rounds))
    return {
        "benchmark": "fewshot_module",
        "users": num_users,
        "shots": shots,
        "d": dim,
        "K": rank,
        "steps": steps,
        "bare_solver_s": solver,
        "bare_solver_without_projection_s": fit_only,
        "lightning_fit_s": fit,
        "ratio": fit / solver,
    }


def bench_lightning(num_users: int = 1000, dim: int = 256, rank: int = 5, steps: int = 200) -> dict:
    """``Trainer.fit`` against a bare loop of the same math (the same ``LF.pair_loss`` step, Adam and
    per-user accuracy counts). ``ratio`` compares the training loops (a callback times Lightning's
    from ``on_train_start`` to ``on_train_end``); ``fit_ratio`` also counts ``fit``'s set-up."""
    from lightning import Callback

    from datamodules.base import PreferenceData, PreferenceDataModule
    from lore_pl.data.preferences import PreferenceSplit
    from lore_pl.modules.basis import BasisModule

    features, users = population(num_users, 30, dim)
    ids = [str(u) for u in range(num_users)]

    class InMemory(PreferenceDataModule):
        def load(self):
            return PreferenceData({"seen_train": PreferenceSplit(features, users, ids)})

    class LoopTimer(Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    def lightning_fit() -> tuple[float, float]:
        torch.manual_seed(0)
        timer = LoopTimer()
        trainer = lean_trainer(max_epochs=steps, log_every_n_steps=50, callbacks=[timer])
        start = time.perf_counter()
        trainer.fit(BasisModule(estimator="adam", rank=rank, prune_threshold=0.0), datamodule=InMemory())
        return timer.seconds, time.perf_counter() - start

    def bare_loop() -> float:
        torch.manual_seed(0)
        basis = torch.randn(dim, rank, requires_grad=True)
        logits = torch.randn(num_users, rank, requires_grad=True)
        optimizer = torch.optim.Adam([basis, logits], lr=0.5)
        metric_correct = torch.zeros(num_users, dtype=torch.long)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            loss, pair = LF.pair_loss(features, users, basis, LF.simplex_weights(logits), 100.0)
            loss.backward()
            optimizer.step()
            metric_correct += torch.bincount(users[pair > 0], minlength=num_users)  # same work as the metric
        return time.perf_counter() - start

    lightning_fit()  # warm-up: imports, kernel build
    rounds = [(bare_loop(), *lightning_fit()) for _ in range(3)]
    bare, loop, fit = (sorted(values)[1] for values in zip(*rounds))
    return {
        "benchmark": "lightning",
        "users": num_users,
        "d": dim,
        "K": rank,
        "steps": steps,
        "bare_ms_per_step": bare / steps * 1e3,
        "lightning_ms_per_step": loop / steps * 1e3,
        "ratio": loop / bare,
        "fit_ms_per_step_with_setup": fit / steps * 1e3,
        "fit_ratio": fit / bare,
    }


MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from lore_pl.core import functional as LF
num_users, dim, rank = {num_users}, {dim}, {rank}
def status(field):  # kB, from the kernel's view of this process
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
base = status("VmRSS")
features = torch.randn(num_users * 30, dim)
users = torch.arange(num_users).repeat_interleave(30)
basis = torch.randn(dim, rank, requires_grad=True)
logits = torch.randn(num_users, rank, requires_grad=True)
optimizer = torch.optim.Adam([basis, logits], lr=0.5)
for _ in range(5):
    optimizer.zero_grad()
    loss, _ = LF.pair_loss(features, users, basis, LF.simplex_weights(logits), 100.0, fused={fused})
    loss.backward()
    optimizer.step()
print((status("VmHWM") - base) * 1024, features.numel() * 4)
"""


def bench_memory(num_users: int = 1000, dim: int = 4096, rank: int = 5) -> list[dict]:
    """Peak resident memory a fresh process gains over 5 training steps, against the features' size,
    for the fused CPU kernel and the PyTorch path."""
    rows = []
    for fused in (True, False):
        code = MEMORY_CHILD.format(root=str(ROOT), num_users=num_users, dim=dim, rank=rank, fused=fused)
        grown, feature_bytes = map(
            int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        )
        rows.append(
            {
                "benchmark": "memory",
                "path": "fused_kernel" if fused else "pytorch",
                "users": num_users,
                "d": dim,
                "K": rank,
                "feature_bytes": feature_bytes,
                "peak_growth_bytes": grown,
                "ratio": grown / feature_bytes,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset, under 2 minutes")
    parser.add_argument(
        "--only", choices=["basis_step", "fewshot", "fewshot_module", "lightning", "memory"], action="append"
    )
    parser.add_argument("--users", type=int, nargs="+", help="basis_step: only these numbers of users C")
    parser.add_argument("--dims", type=int, nargs="+", help="basis_step: only these feature dimensions d")
    parser.add_argument("--ranks", type=int, nargs="+", help="basis_step: only these ranks K")
    args = parser.parse_args(argv)
    chosen = set(args.only or ["basis_step", "fewshot", "fewshot_module", "lightning", "memory"])
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}))
    if "basis_step" in chosen:
        cases = (
            [(100, 1024, 5), (1000, 1024, 5)]
            if args.quick
            else [(c, d, k) for d in (1024, 4096) for k in (5, 20) for c in (100, 1000, 5000)]
        )
        cases = [
            (c, d, k)
            for c, d, k in cases
            if (not args.users or c in args.users)
            and (not args.dims or d in args.dims)
            and (not args.ranks or k in args.ranks)
        ]
        bench_basis_step(cases, loop_max_users=1000 if args.quick else 5000)
    if "fewshot" in chosen:
        print(json.dumps(bench_fewshot(steps=100 if args.quick else 500)), flush=True)
    if "fewshot_module" in chosen:
        print(json.dumps(bench_fewshot_module(**({"dim": 1024, "steps": 100} if args.quick else {}))), flush=True)
    if "lightning" in chosen:
        print(json.dumps(bench_lightning(steps=50 if args.quick else 200)), flush=True)
        if not args.quick:  # the basis_step headline size: there Lightning's fixed cost is a small share
            print(json.dumps(bench_lightning(dim=4096, steps=50)), flush=True)
    if "memory" in chosen:
        for row in bench_memory(dim=1024 if args.quick else 4096):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
