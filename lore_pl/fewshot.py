"""Phase 2: V frozen, fit K simplex weights per new user from a few pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lore_pl import functional as LF
from lore_pl.errors import LoreDataError
from lore_pl.export import check_embedder, load_basis
from lore_pl.module import PreferenceModule
from lore_pl.preferences import PreferenceSplit


class FewShotModule(PreferenceModule):
    """Adapt new users to a frozen basis: K free logits per user, ``w = softmax(logits)``.

    All users are fitted together as one full batch (the data module's few-shot pool). Each user's
    pairs are first subsampled to ``shots`` (users with fewer keep all), and the kept features are
    projected through V once; every step after that costs O(N K). For K<=1 every user's weight is
    [1] and nothing is fitted. One training epoch is one Adam step (500 in the reference).

    Args:
        basis_path: a ``BasisModule`` checkpoint (``.ckpt``) or an exported ``.safetensors`` basis.
        shots: pairs per user to fit on (``null``: all of the user's pool).
        shot_seed: seed of the shots subsample.
        lr: Adam learning rate (0.1 in the reference).
        weight_init: initial logits: ``randn`` (the reference), ``zeros`` (uniform weights) or
            ``population`` (the seen users' mean weights; needs a basis with the seen weights).
        prior_strength: MAP pull of each user's logits towards the seen mean (0: none; see
            ``functional.fewshot_loss``).
        tau: logit temperature; ``null`` takes the basis file's.
        num_users: set from the data module; leave unset.
        feature_dim: set from the basis; leave unset.
        rank: set from the basis; leave unset.
    """

    population = "unseen"  # the data module serves the unseen users' pairs to this module

    def __init__(
        self,
        basis_path: str | None = None,
        shots: int | None = 10,
        shot_seed: int = 0,
        lr: float = 0.1,
        weight_init: Literal["randn", "zeros", "population"] = "randn",
        prior_strength: float = 0.0,
        tau: float | None = None,
        num_users: int | None = None,
        feature_dim: int | None = None,
        rank: int | None = None,
        has_population: bool | None = None,
    ) -> None:
        super().__init__()
        if shots is not None and shots <= 0:
            raise LoreDataError(f"shots must be a positive number of pairs per user (or null for all), got {shots}")
        if weight_init not in ("randn", "zeros", "population"):
            raise ValueError(f"weight_init must be 'randn', 'zeros' or 'population', got {weight_init!r}")
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        if feature_dim is None or rank is None:
            if basis_path is None:
                raise ValueError("FewShotModule needs basis_path (a BasisModule checkpoint or an exported basis file)")
            if not Path(basis_path).is_file():
                raise FileNotFoundError(f"basis file not found: {basis_path}")
        self.save_hyperparameters()
        # The basis is read in setup, not here: LightningCLI instantiates this module in a context
        # where a nested module (the BasisModule of a checkpoint) would take our hyper-parameters.
        known = feature_dim is not None and rank is not None
        self.register_buffer("basis", torch.zeros(feature_dim, rank) if known else None)
        # logits of the seen users' mean weights: the population start and the prior's centre
        self.register_buffer("prior_logits", torch.zeros(rank) if known and has_population else None)
        self._shots: tuple[Tensor, Tensor, Tensor | None] | None = None  # (X V, users, step counts)
        self.basis_embedder = ""  # identity of the features the basis was trained on (from its file)
        self._built = False
        if self.basis is not None and num_users is not None:  # reloading a checkpoint: the state dict fills these
            self._build(num_users)

    def load_basis_(self) -> None:
        """Read the frozen basis from ``basis_path`` (once); record its d, K and tau."""
        if self.basis is not None:
            return
        loaded = load_basis(self.hparams.basis_path)
        self.basis = loaded.basis.clone().float()
        self.basis_embedder = loaded.embedder
        if loaded.user_weights is not None:
            self.prior_logits = LF.population_logits(loaded.user_weights.float())
        tau = self.hparams.tau if self.hparams.tau is not None else loaded.tau
        self._record_hparams(feature_dim=loaded.dim, rank=loaded.rank, tau=tau,
                             has_population=loaded.user_weights is not None)

    @classmethod
    def from_basis(
        cls, basis: Tensor, tau: float = 100.0, seen_weights: Tensor | None = None, **kwargs
    ) -> "FewShotModule":
        """A module around an in-memory basis ``[d, K]`` (no file), optionally with the seen users' weights."""
        module = cls(tau=tau, feature_dim=basis.shape[0], rank=basis.shape[1],
                     has_population=seen_weights is not None, **kwargs)
        module.basis.copy_(basis)
        if seen_weights is not None:
            module.prior_logits.copy_(LF.population_logits(seen_weights))
        return module

    def _build(self, num_users: int) -> None:
        if self.hparams.rank >= 2:
            init = LF.initial_user_logits(num_users, self.hparams.rank, self.hparams.weight_init,
                                          prior_logits=self.prior_logits)
            self.user_logits = nn.Parameter(init)
        self._build_metrics(num_users)
        self._built = True

    def setup(self, stage: str) -> None:
        self.load_basis_()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            if self._built:
                return
            raise ValueError("FewShotModule needs a PreferenceDataModule with unseen users")
        check_embedder(self.basis_embedder, getattr(datamodule, "embedder", ""), self.hparams.basis_path)
        num_users, dim = datamodule.num_unseen_users, datamodule.dim
        if num_users == 0 or not datamodule.has_split("unseen_pool") or len(datamodule.split("unseen_pool")) == 0:
            raise LoreDataError(f"{type(datamodule).__name__} has no unseen users with few-shot pool pairs to adapt")
        if dim != self.hparams.feature_dim:
            raise LoreDataError(f"the basis {self.hparams.basis_path or '(in memory)'} has d={self.hparams.feature_dim} "
                                f"but {type(datamodule).__name__} has d={dim}")
        if self._built:
            if num_users != self.hparams.num_users:
                raise ValueError(
                    f"this FewShotModule was fitted for {self.hparams.num_users} users, "
                    f"but {type(datamodule).__name__} has {num_users} unseen users"
                )
            return
        self._record_hparams(num_users=num_users)
        self._build(num_users)

    # ------------------------------------------------------------------------------------ model
    def user_weights(self) -> Tensor:
        """Each new user's simplex weights ``[C, K]`` ([1] for K<=1)."""
        if self.hparams.rank <= 1:
            return self.basis.new_ones(self.hparams.num_users, 1)
        return LF.simplex_weights(self.user_logits)

    def forward(self, features: Tensor, users: Tensor) -> Tensor:
        return LF.pair_logits(features, users, self.basis, self.user_weights(), self.hparams.tau)

    # --------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        self._shots = None

    def training_pairs(self, split: PreferenceSplit) -> Tensor | None:
        """The shots subsample of the whole few-shot pool (``None``: all of it). The data module
        draws it on every rank before sharding, so DDP fits the pairs one process would."""
        if self.hparams.shots is None:
            return None
        return LF.sample_shots(split.users, self.hparams.shots, torch.Generator().manual_seed(self.hparams.shot_seed))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if batch_idx > 0:
            raise ValueError("FewShotModule fits on the whole few-shot pool as one batch: set data batch_size to null")
        if self._shots is None:  # V is frozen: project the shots once, reuse every step
            self._shots = (LF.project(batch["features"], self.basis), batch["users"], batch.get("counts"))
        projected, users, counts = self._shots
        logged = self._logs_step(self.trainer.global_step, int(self.trainer.estimated_stepping_batches))
        if self._train_accuracy_counts(logged):
            self.metrics["train_acc"].update(
                LF.projected_logits(projected, users, self.user_weights(), self.hparams.tau).detach(), users
            )
        if self.hparams.rank <= 1:
            return None
        scale = 1.0 if counts is None else float(self.trainer.world_size)
        loss = LF.fewshot_loss(projected, users, self.user_logits, self.hparams.tau, self.prior_logits,
                               self.hparams.prior_strength, counts, scale)
        if logged:  # loss is this rank's scaled share: sync_dist's mean over ranks is the global value
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=users.numel(),
                     sync_dist=True)
        return loss

    def configure_optimizers(self):
        if self.hparams.rank <= 1:
            return None
        return torch.optim.Adam([self.user_logits], lr=self.hparams.lr)
