"""Training over a memory-mapped feature file larger than a comfortable share of RAM: prints one JSON
object with the file's size and the process's peak anonymous memory (RssAnon) during one epoch.

    python benchmarks/memmap.py                       # 8.5 GiB of float32 features, d=4096
    python benchmarks/memmap.py --gib 1 --keep DIR    # smaller, and keep the files in DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def anon_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


class PeakSampler(threading.Thread):
    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.running = every, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, anon_kib())
            time.sleep(self.every)


def write_features(directory: Path, rows: int, dim: int, pairs_per_user: int) -> None:
    features = np.lib.format.open_memmap(directory / "seen_train.features.npy", mode="w+", dtype=np.float32,
                                         shape=(rows, dim))
    generator = torch.Generator().manual_seed(0)
    for start in range(0, rows, 8192):  # chunk by chunk: never the whole array in memory
        stop = min(rows, start + 8192)
        features[start:stop] = torch.randn(stop - start, dim, generator=generator).numpy()
    features.flush()
    del features
    users = np.arange(rows, dtype=np.int64) // pairs_per_user
    np.save(directory / "seen_train.users.npy", users)
    (directory / "users.json").write_text(json.dumps({"seen_train": [str(u) for u in range(int(users[-1]) + 1)]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=8.5, help="size of the feature file")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32768)
    parser.add_argument("--keep", help="write the files here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)

    from lightning import Trainer

    from datamodules.memmap import MemmapPreferenceDataModule
    from lore_pl.modules.basis import BasisModule

    directory = Path(args.keep or tempfile.mkdtemp(prefix="lore-memmap-"))
    directory.mkdir(parents=True, exist_ok=True)
    rows = int(args.gib * 2**30 / (4 * args.dim)) // 30 * 30
    try:
        start = time.perf_counter()
        write_features(directory, rows, args.dim, 30)
        written = time.perf_counter() - start
        baseline = anon_kib()
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        model = BasisModule(estimator="adam", rank=5, prune_threshold=0.0)
        trainer.fit(model, datamodule=MemmapPreferenceDataModule(str(directory), batch_size=args.batch_size))
        trained = time.perf_counter() - start
        sampler.running = False
        sampler.join()
        size = (directory / "seen_train.features.npy").stat().st_size
        print(json.dumps({
            "benchmark": "memmap", "file_gib": size / 2**30, "rows": rows, "d": args.dim,
            "batch_size": args.batch_size, "steps": int(model.iterations_done), "write_s": written,
            "epoch_s": trained, "anon_before_fit_gib": baseline / 2**20, "peak_anon_gib": sampler.peak / 2**20,
            "batch_gib": args.batch_size * args.dim * 4 / 2**30,
        }))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
