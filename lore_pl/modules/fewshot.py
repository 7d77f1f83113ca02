"""Phase 2: V frozen, fit K simplex weights per new user from a few pairs."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import Tensor

from lore_pl.core import functional as LF
from lore_pl.core.fewshot import FewShotSettings, adapt_users, choose_prior, weight_covariance, weights_logit_variance
from lore_pl.core.model import LoreModel
from lore_pl.data.basis_file import BasisFile, check_embedder, load_basis
from lore_pl.data.preferences import DataRequest, PreferenceSplit
from lore_pl.errors import LoreDataError
from lore_pl.modules.base import PreferenceModule
from lore_pl.modules.distributed import release_process_group_at_exit


class FewShotModule(PreferenceModule):
    """Adapt new users to a frozen basis: K free logits per user, ``w = softmax(logits)``.

    It runs the project's one few-shot solver (``lore_pl.core.fewshot.adapt_users``, the same the
    protocol, the sweeps and ``PersonalRewardModel.personalize`` run) on the data module's few-shot
    pool: each user's pairs subsampled to ``fewshot.shots``, projected through V once, and all users'
    logits fitted together by ``fewshot.steps`` full-batch Adam steps. Those steps are one training
    step, so one epoch fits (``trainer.max_epochs: 1``); validation and test then score the unseen
    users' held-out pairs. For K<=1 every user's weight is [1] and nothing is fitted.

    The prior: users start at the population's mean logits (the basis file's learned ``prior_mean``,
    else the log of the seen users' mean weights) and are pulled towards them with the precision
    ``fewshot.prior_strength``; ``null`` chooses it on the unseen users' validation pairs
    (``choose_prior``; the choice is ``prior_choice``), or takes the basis's own prior when there are
    none. Each user's posterior covariance of their weights (Laplace) is kept in the model.

    Args:
        basis_path: a ``BasisModule`` checkpoint (``.ckpt``) or an exported ``.safetensors`` basis.
        fewshot: how the users are adapted (shots, seed, Adam steps and lr, start, prior).
        tau: logit temperature; ``null`` takes the basis file's.
    """

    checkpoint_kind = "fewshot"

    def __init__(self, basis_path: str | None = None, fewshot: FewShotSettings | None = None,
                 tau: float | None = None) -> None:
        super().__init__()
        if isinstance(fewshot, dict):  # a checkpoint's hyper-parameters
            fewshot = FewShotSettings(**fewshot)
        self.settings = fewshot if fewshot is not None else FewShotSettings()
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        # plain values only, so a checkpoint loads with torch.load(weights_only=True)
        self.save_hyperparameters({"basis_path": basis_path, "fewshot": asdict(self.settings), "tau": tau})
        self.automatic_optimization = False  # the solver takes its own Adam steps
        # the population's mean logits: the start and the prior's centre; the prior's precision [K]
        self.register_buffer("prior_logits", None)
        self.register_buffer("prior_precision", None)
        self.prior_choice = ""  # which prior choose_prior picked, and the validation curve
        self.prior_curve: list[tuple[str, float]] = []
        self._basis: BasisFile | None = None
        self._val: PreferenceSplit | None = None

    @classmethod
    def from_basis(cls, basis: Tensor, tau: float = 100.0, seen_weights: Tensor | None = None,
                   fewshot: FewShotSettings | None = None, embedder: str = "") -> FewShotModule:
        """A module around an in-memory basis ``[d, K]`` (no file), optionally with the seen users' weights."""
        module = cls(fewshot=fewshot, tau=tau)
        module._basis = BasisFile(basis.detach(), tau, user_weights=seen_weights,
                                  user_ids=[] if seen_weights is None else [str(i) for i in range(len(seen_weights))],
                                  embedder=embedder)
        return module

    @classmethod
    def from_model(cls, model: LoreModel, fewshot: FewShotSettings | None = None) -> FewShotModule:
        """A module around a trained model's kept basis, its users' weights and its population prior."""
        module = cls(fewshot=fewshot, tau=model.temperature)
        module._basis = BasisFile.from_model(model)
        return module

    # ----------------------------------------------------------------------------- construction
    @property
    def data_request(self) -> DataRequest:
        # every rank fits every user: the solve is milliseconds, and no gradient needs averaging
        return DataRequest(population="unseen", shots=self.settings.shots, shot_seed=self.settings.shot_seed,
                           shard=False)

    @property
    def basis_file(self) -> BasisFile:
        """The frozen basis (read from ``basis_path`` once)."""
        if self._basis is None:
            if self.hparams.basis_path is None:
                raise LoreDataError(
                    "FewShotModule needs basis_path (a BasisModule checkpoint or an exported basis file)"
                )
            self._basis = load_basis(self.hparams.basis_path)
        return self._basis

    @property
    def tau(self) -> float:
        return float(self.hparams.tau) if self.hparams.tau is not None else float(self.basis_file.tau)

    def new_users(self, num_users: int, user_ids: list[str] | None = None, embedder: str = "") -> LoreModel:
        """A model of ``num_users`` new users on the frozen basis, at the settings' initial logits."""
        basis = self.basis_file
        if basis.rank >= 2 and basis.prior_mean is not None:
            self.prior_logits = basis.prior_mean.float().clone()
        elif basis.user_weights is not None and len(basis.user_weights):
            self.prior_logits = LF.population_logits(basis.user_weights.float())
        if basis.rank >= 2 and basis.prior_precision is not None:
            self.prior_precision = basis.prior_precision.float().clone()
        logits = None
        if basis.rank >= 2:
            init = self.settings.weight_init
            if init == "population" and self.prior_logits is None:
                self.prior_logits = torch.zeros(basis.rank)  # a basis without users: uniform weights
            logits = LF.initial_user_logits(
                num_users, basis.rank, init, self.settings.init_generator(), self.prior_logits
            )
        return LoreModel(
            basis.basis.float(),
            logits,
            tau=self.tau,
            reference_head=basis.reference_head,
            num_users=num_users,
            user_ids=user_ids or (),
            embedder=embedder or basis.embedder,
            embedder_weights=basis.embedder_weights,
            train_basis=False,
        )

    def setup(self, stage: str) -> None:
        release_process_group_at_exit()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            if self.built:
                return
            raise LoreDataError("FewShotModule needs a PreferenceDataModule with unseen users")
        self._connect(datamodule)
        basis = self.basis_file
        check_embedder(basis.embedder, getattr(datamodule, "embedder", ""), self.hparams.basis_path)
        num_users, dim = datamodule.num_unseen_users, datamodule.dim
        if num_users == 0 or not datamodule.has_split("unseen_pool") or len(datamodule.split("unseen_pool")) == 0:
            raise LoreDataError(f"{type(datamodule).__name__} has no unseen users with few-shot pool pairs to adapt")
        if dim != basis.dim:
            raise LoreDataError(
                f"the basis {self.hparams.basis_path or '(in memory)'} has d={basis.dim} "
                f"but {type(datamodule).__name__} has d={dim}"
            )
        if self.built:
            if num_users != self.model.num_users:
                raise LoreDataError(
                    f"this FewShotModule was fitted for {self.model.num_users} users, "
                    f"but {type(datamodule).__name__} has {num_users} unseen users"
                )
            return
        self._install(self.new_users(num_users, list(datamodule.unseen_user_ids), datamodule.embedder))
        if datamodule.has_split("unseen_val") and len(datamodule.split("unseen_val")):
            self._val = datamodule.split("unseen_val")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        for name in ("prior_logits", "prior_precision"):  # a None buffer takes no state: give it a tensor first
            if name in checkpoint["state_dict"]:
                setattr(self, name, torch.zeros_like(checkpoint["state_dict"][name]))

    # --------------------------------------------------------------------------------- fitting
    def fit_users(self, projected: Tensor, users: Tensor, val: PreferenceSplit | None = None) -> Tensor:
        """Fit the users' logits from their projected pairs ``X V`` (the one solver); returns them.

        With ``fewshot.prior_strength`` null and validation pairs ``val``, the prior is chosen on them first.
        """
        if not self.model.personalized:
            return adapt_users(projected, users, self.model.num_users, self.settings, self.tau)
        if self.settings.prior_strength is None and val is not None and self.prior_logits is not None:
            variance = None
            basis = self.basis_file
            if basis.user_weights is not None and len(basis.user_weights):
                variance = weights_logit_variance(basis.user_weights.float(), self.prior_logits)
            device = projected.device
            projected_val = LF.project(val.features.to(device), self.model.basis)
            precision, self.prior_choice, self.prior_curve = choose_prior(
                projected,
                users,
                projected_val,
                val.users.to(device),
                self.model.num_users,
                self.settings,
                self.tau,
                self.prior_logits,
                variance,
            )
            self.prior_precision = precision.to(projected)
        logits = adapt_users(
            projected,
            users,
            self.model.num_users,
            self.settings,
            self.tau,
            self.prior_logits,
            init_logits=self.model.user_logits,
            prior_precision=self.prior_precision,
        )
        precision = self.settings.precision(self.prior_precision)
        with torch.no_grad():
            self.model.user_logits.copy_(logits)
            self.model.weight_covariance = weight_covariance(projected, users, logits, self.tau, precision)
        return logits

    def adapt(self, pool: PreferenceSplit, val: PreferenceSplit | None = None) -> Tensor:
        """Without a Trainer: draw the shots of ``pool`` and fit its users (the prior chosen on ``val``
        where the settings say so); returns their weights ``[C, K]``."""
        if not self.built:
            self._install(self.new_users(pool.num_users, list(pool.user_ids)))
        shots = self.shots_of(pool)
        device = self.model.basis.device
        self.fit_users(LF.project(shots.features.to(device), self.model.basis), shots.users.to(device), val)
        return self.model.user_weights()

    def shots_of(self, pool: PreferenceSplit) -> PreferenceSplit:
        """The pairs the users are fitted on: ``shots`` per user drawn with ``shot_seed`` (``draw_shots``)."""
        return pool.draw_shots(self.settings.shots, self.settings.shot_seed, "unseen_shots")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if batch_idx > 0:
            raise LoreDataError("FewShotModule fits on the whole few-shot pool as one batch")
        features, users = batch["features"], batch["users"]
        projected = LF.project(features, self.model.basis)  # V is frozen: project once
        self.fit_users(projected, users, self._val)
        logits = LF.projected_logits(projected, users, self.model.user_weights(), self.tau)
        self.metrics["train_acc"].update(logits.detach(), users)
        self.log(
            "train/loss",
            LF.preference_loss(logits, users, self.model.num_users, "user_mean").detach(),
            on_step=True,
            on_epoch=False,
            batch_size=users.numel(),
        )
        return None

    def configure_optimizers(self):
        return None
