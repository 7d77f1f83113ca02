"""The spectral start's time and peak memory against main's, in one process (issue 22).

Main's start (kept below as ``reference_start``) formed float64 ``[C, d]`` copies of the users' means
and a dense ``d x d`` Ledoit-Wolf moment with its Cholesky solve; ``estimator.spectral_subspace`` now
works on ``[C, k]`` and ``[d, k]`` sketches. Planted features: C users x m pairs in d dimensions, each
user leaning towards one of 5 directions. One JSON line per d: seconds and peak memory beyond the
features (MiB, the process's high-water mark reset before each run) of both, their ratios, and the
principal cosines between the two subspaces (1: the same subspace). Each start runs in a fresh child
process (Linux: it reads /proc/self/status).

    python benchmarks/spectral.py                          # d = 256, 1024, 4096, C = 1000, m = 30
    python benchmarks/spectral.py --dims 1024 --users 10000
    python benchmarks/spectral.py --diagnose d1024_iso_r10_m30   # can the start see the directions?

``--diagnose CASE`` (a case of ``benchmarks/quality.py``): the top singular values of the users'
whitened, sqrt(n)-weighted means, against the same with every pair given to a random user (no user
structure left: where the noise alone reaches), and the principal cosines of the true directions
to the start's subspace at r = 16 and 32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lore_pl.core import estimator as E


def reference_start(features, users, num_users: int, rank: int) -> torch.Tensor:
    """Main's ``spectral_subspace`` (whitened) at 5d05f32, verbatim but for the names: ``[C, d]`` float64 user
    sums and a dense Cholesky of ``E.ledoit_wolf`` (whose arithmetic the change kept; only its block size moved)."""
    dim = features.shape[1]
    rank = min(rank, dim, num_users)
    sums = torch.zeros(num_users, dim, dtype=torch.float64)
    for start in range(0, features.shape[0], 8192):
        sums.index_add_(0, users[start:start + 8192], features[start:start + 8192].double())
    weighted = sums / torch.bincount(users, minlength=num_users).clamp(min=1).double().sqrt()[:, None]
    cholesky = torch.linalg.cholesky(E.ledoit_wolf(features))
    whitened = torch.linalg.solve_triangular(cholesky, weighted.t(), upper=False).t()
    _, _, right = torch.linalg.svd(whitened, full_matrices=False)
    directions = torch.linalg.solve_triangular(cholesky.t(), right[:rank].t().contiguous(), upper=True)
    subspace, _ = torch.linalg.qr(directions)
    return subspace.float().contiguous()


def planted(users: int, pairs: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, 5, generator=generator)
    owner = torch.arange(users).repeat_interleave(pairs)
    lean = directions[:, torch.randint(0, 5, (users,), generator=generator)].t()  # [C, d]
    features = torch.randn(users * pairs, dim, generator=generator) + 0.3 * lean[owner]
    return features, owner


def kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


STARTS = {"main": reference_start, "sketch": E.spectral_subspace}


def child(start: str, dim: int, users: int, pairs: int, rank: int, output: str) -> None:
    """Measure one start in this fresh process: seconds and peak MiB above the memory held before it
    (the planted features and a warm-up excluded); the subspace goes to ``output``."""
    warm, warm_users = planted(50, 4, 64)
    STARTS[start](warm, warm_users, 50, 8)  # one-time library set-up is no one's cost
    features, owner = planted(users, pairs, dim)
    with open("/proc/self/clear_refs", "w") as clear:  # resets VmHWM to the current RSS
        clear.write("5")
    before = kib("VmRSS")
    began = time.perf_counter()
    subspace = STARTS[start](features, owner, users, rank)
    seconds, peak = time.perf_counter() - began, (kib("VmHWM") - before) / 1024
    torch.save(subspace, output)
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "features_mib": features.nbytes / 2**20}))


def measured(start: str, dim: int, args, folder: str) -> tuple[torch.Tensor, dict]:
    """(the subspace, the child's figures) of one start, run in a fresh process so that neither start
    inherits the other's freed but retained memory."""
    output = os.path.join(folder, f"{start}_{dim}.pt")
    command = [sys.executable, __file__, "--child", start, "--dims", str(dim), "--users", str(args.users),
               "--pairs", str(args.pairs), "--rank", str(args.rank), "--output", output]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return torch.load(output), json.loads(done.stdout.strip().splitlines()[-1])


def diagnose(case: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import case_data

    data = case_data(case)
    train = data.split("seen_train")
    features, users, count = train.features, train.users, train.num_users
    cholesky = torch.linalg.cholesky(E.ledoit_wolf(features))

    def top_singular_values(owner: torch.Tensor) -> list[float]:
        sums = torch.zeros(count, features.shape[1], dtype=torch.float64).index_add_(0, owner, features.double())
        weighted = sums / torch.bincount(owner, minlength=count).clamp(min=1).double().sqrt()[:, None]
        whitened = torch.linalg.solve_triangular(cholesky, weighted.t(), upper=False).t()
        return [round(float(v), 1) for v in torch.linalg.svdvals(whitened)[:12]]

    shuffled = users[torch.randperm(len(users), generator=torch.Generator().manual_seed(0))]
    truth, _ = torch.linalg.qr(data.true_directions.double())
    cosines = {f"cosines_r{rank}": [round(float(c), 2) for c in torch.linalg.svdvals(
        truth.t() @ E.spectral_subspace(features, users, count, rank).double())] for rank in (16, 32)}
    print(json.dumps({"case": case, "users": count, "dim": features.shape[1], "pairs": len(users),
                      "singular_values": top_singular_values(users),
                      "singular_values_users_shuffled": top_singular_values(shuffled), **cosines}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--diagnose", metavar="CASE", help="the start on a case of benchmarks/quality.py")
    parser.add_argument("--child", choices=sorted(STARTS), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.dims[0], args.users, args.pairs, args.rank, args.output)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    if args.diagnose:
        return diagnose(args.diagnose)
    with tempfile.TemporaryDirectory() as folder:
        for dim in args.dims:
            report(dim, args, folder)


def report(dim: int, args, folder: str) -> None:
    new, new_run = measured("sketch", dim, args, folder)
    old, old_run = measured("main", dim, args, folder)
    old_s, new_s, old_mib, new_mib = old_run["seconds"], new_run["seconds"], old_run["peak_mib"], new_run["peak_mib"]
    cosines = torch.linalg.svdvals(old.double().t() @ new.double())
    print(json.dumps({
        "dim": dim, "users": args.users, "pairs": args.pairs, "features_mib": round(new_run["features_mib"], 1),
        "main_s": round(old_s, 2), "sketch_s": round(new_s, 2), "time_ratio": round(old_s / new_s, 2),
        "main_peak_mib": round(old_mib, 1), "sketch_peak_mib": round(new_mib, 1),
        "memory_ratio": round(old_mib / max(new_mib, 0.1), 2),
        "cosines_top5_min": round(float(cosines[:5].min()), 4), "cosines_all_min": round(float(cosines.min()), 4),
    }), flush=True)


if __name__ == "__main__":
    main()
