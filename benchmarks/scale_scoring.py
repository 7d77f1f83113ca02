"""Scoring at scale (issue 22): ``PersonalRewardModel`` on 100k candidates (d=1024) for one user and for
1000 users, against the matrix-product floor (``E @ h``, ``E @ H``) timed in the same process, and the
scoring path of main before issue 22 (``old_score`` below, kept verbatim in logic) on the same data.
Optionally ``lightning predict``'s wall time and peak RSS per output format. One JSON line per case.

    python benchmarks/scale_scoring.py                         # the two scoring cases
    python benchmarks/scale_scoring.py --predict               # and lightning predict (CSV, Parquet, .npy)
    python benchmarks/scale_scoring.py --candidates 20000      # smaller

Timings are the fastest of ``--repeats`` interleaved runs (the floor, the new path and the old one take
turns, so a busy machine slows them alike). The old path scores users one at a time at O(C) each; its
1000-user time is extrapolated from ``--loop-users`` users, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lore_pl import BasisFile, PersonalRewardModel, save_basis

ROOT = Path(__file__).resolve().parents[1]


def old_score(model: PersonalRewardModel, embeddings: torch.Tensor, user: str) -> torch.Tensor:
    """``PersonalRewardModel.score`` as main had it before issue 22: an [n, d] mask and ``nonzero`` to check the
    input, every user's softmax to find one user's weights, then the product and its check."""
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    bad = (~torch.isfinite(embeddings)).nonzero()
    if len(bad):
        raise ValueError("non-finite embeddings")
    weights = model.model.user_weights()[model._row[user]]
    rewards = embeddings @ (model.basis @ weights)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("overflow")
    return rewards


def random_model(users: int, dim: int, rank: int, seed: int = 0) -> PersonalRewardModel:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(users, rank, generator=generator), dim=1)
    basis = torch.randn(dim, rank, generator=generator) / dim**0.5
    ids = [f"user-{number:05d}" for number in range(users)]
    return PersonalRewardModel(BasisFile(basis, 1.0, None, ids, weights))


def fastest(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest wall time of each run, the runs interleaved ``repeats`` times (after one warm-up each)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def scoring_rows(candidates: int = 100_000, dim: int = 1024, users: int = 1000, rank: int = 8, repeats: int = 3,
                 loop_users: int = 3, seed: int = 0) -> list[dict]:
    """The two scoring cases as JSON-able rows: one user, and ``users`` users (a model of ``users`` users)."""
    model = random_model(users, dim, rank, seed)
    embeddings = torch.randn(candidates, dim, generator=torch.Generator().manual_seed(seed + 1))
    user, every = model.user_ids[0], model.user_ids
    common = {"candidates": candidates, "dim": dim, "rank": rank, "model_users": users,
              "threads": torch.get_num_threads(), "repeats": repeats}
    head = model.head(user)
    one = fastest({"floor": lambda: embeddings @ head, "score": lambda: model.score(embeddings, user),
                   "top_k_10": lambda: model.top_k(embeddings, user, 10),
                   "old_score": lambda: old_score(model, embeddings, user)}, repeats)
    rows = [{"case": "scoring one user", **common, "floor_seconds": one["floor"], "seconds": one["score"],
             "ratio": one["score"] / one["floor"], "top_k_10_ratio": one["top_k_10"] / one["floor"],
             "old_seconds": one["old_score"], "old_ratio": one["old_score"] / one["floor"], "target_ratio": 2.0}]
    heads = model.heads(every)
    many = fastest({"floor": lambda: embeddings @ heads, "score_users": lambda: model.score_users(embeddings, every)},
                   repeats)
    loop = fastest({"new_loop": lambda: [model.score(embeddings, u) for u in every[:loop_users]],
                    "old_loop": lambda: [old_score(model, embeddings, u) for u in every[:loop_users]]}, 1)
    scale = len(every) / loop_users
    rows.append({"case": f"scoring {len(every)} users", **common, "floor_seconds": many["floor"],
                 "seconds": many["score_users"], "ratio": many["score_users"] / many["floor"],
                 "score_each_user_in_turn_ratio": loop["new_loop"] * scale / many["floor"],
                 "old_seconds": loop["old_loop"] * scale, "old_ratio": loop["old_loop"] * scale / many["floor"],
                 "old_extrapolated_from_users": loop_users, "target_ratio": 3.0})
    return rows


def predict_rows(candidates: int = 100_000, dim: int = 1024, users: int = 1000, rank: int = 8,
                 formats: tuple[str, ...] = ("parquet", "npy", "csv"), code: Path = ROOT,
                 label: str = "this checkout", seed: int = 0) -> list[dict]:
    """``lightning predict`` of ``candidates`` x ``users`` scores into each format, run by ``code`` (a checkout
    of lore-pl: this one, or another to compare): wall time and the process's peak RSS (``/usr/bin/time``)."""
    from safetensors.torch import save_file

    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-scoring-") as folder:
        folder = Path(folder)
        model = random_model(users, dim, rank, seed)
        save_basis(folder / "basis.safetensors", BasisFile.from_model(model.model))
        generator = torch.Generator().manual_seed(seed + 1)
        save_file({"embeddings": torch.randn(candidates, dim, generator=generator)},
                  str(folder / "candidates.safetensors"))
        environment = {**os.environ, "PYTHONPATH": str(code)}
        for suffix in formats:
            output = folder / f"scores.{suffix}"
            command = ["/usr/bin/time", "-f", "%M %e", str(Path(sys.executable).parent / "lore-pl"), "predict",
                       "--config", str(code / "configs/experiment/score.yaml"),
                       f"--model.init_args.basis_path={folder / 'basis.safetensors'}",
                       f"--data.init_args.path={folder / 'candidates.safetensors'}",
                       f"--model.init_args.output={output}", "--trainer.accelerator=cpu",
                       "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
            done = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"case": f"lightning predict .{suffix}", "code": label, "error": done.stderr[-400:]})
                continue
            peak_kib, seconds = done.stderr.strip().splitlines()[-1].split()
            rows.append({"case": f"lightning predict .{suffix}", "code": label, "candidates": candidates,
                         "users": users, "dim": dim, "seconds": float(seconds),
                         "peak_rss_gib": int(peak_kib) / 2**20, "output_mib": output.stat().st_size / 2**20})
            output.unlink()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-users", type=int, default=3, help="users the old path scores, to extrapolate from")
    parser.add_argument("--no-scoring", action="store_true", help="skip the in-process scoring cases")
    parser.add_argument("--predict", action="store_true", help="also time lightning predict per output format")
    parser.add_argument("--formats", default="parquet,npy,csv")
    parser.add_argument("--compare-with", type=Path, help="another checkout (e.g. main) to run lightning predict with")
    parser.add_argument("--compare-users", type=int, help="users for the other checkout's run (default --users)")
    args = parser.parse_args(argv)
    shape = {"candidates": args.candidates, "dim": args.dim, "rank": args.rank}
    rows = [] if args.no_scoring else scoring_rows(users=args.users, repeats=args.repeats,
                                                   loop_users=args.loop_users, **shape)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.predict:
        for row in predict_rows(users=args.users, formats=tuple(args.formats.split(",")), **shape):
            print(json.dumps(row), flush=True)
    if args.compare_with is not None:
        for row in predict_rows(users=args.compare_users or args.users, formats=("csv",), code=args.compare_with,
                                label=str(args.compare_with), **shape):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
