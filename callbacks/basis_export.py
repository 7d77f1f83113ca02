"""Write the learned basis into the run directory at the end of fit."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from lore_pl.data.basis_file import RUN_BASIS_FILE, BasisFile, save_basis
from lore_pl.modules.basis import BasisModule


class BasisExport(Callback):
    """At the end of a ``BasisModule`` fit, write its pruned basis, ``V_ref``, tau, the seen users'
    ids and weights and the embedder's identity as ``basis.safetensors`` (atomically) in the run
    directory: what ``FewShotModule``, ``PersonalRewardModel`` and scoring read. After a
    ``RestoreBestCheckpoint`` it writes the best checkpoint's model.

    Args:
        filename: the file's name in the run directory.
    """

    reads_final_model = True  # RestoreBestCheckpoint must run before this

    def __init__(self, filename: str = RUN_BASIS_FILE) -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, BasisModule) or trainer.interrupted:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank asks (a broadcast)
        if trainer.is_global_zero:
            self.path = save_basis(run_dir / self.filename, BasisFile.from_model(pl_module.model))
