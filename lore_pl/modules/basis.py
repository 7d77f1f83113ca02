"""Phase 1: learn the shared basis V and the seen users' weights W jointly."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
from torch import Tensor

from lore_pl.core import functional as LF
from lore_pl.core.fewshot import FewShotSettings
from lore_pl.core.model import LoreModel
from lore_pl.data.basis_file import load_basis, read_reference_head
from lore_pl.data.preferences import DataRequest
from lore_pl.errors import LoreDataError
from lore_pl.modules.base import PreferenceModule


class BasisModule(PreferenceModule):
    """Low-rank reward model: a basis ``V`` ``[d, K]`` and per-user logits ``W`` ``[C, K]``.

    User u prefers chosen with probability ``sigmoid(x . V softmax(W[u]) / tau)``. ``rank`` K=0 is
    the reference model (the data's reference head ``V_ref``, nothing trained, every user weight
    [1]); K=1 is plain Bradley-Terry (one shared direction, no per-user weights); K>=2 is LoRe.
    The model (``self.model``, a ``LoreModel``) is built in ``setup`` from the data module's seen
    users, feature dimension and ``V_ref``, or from ``initial_basis``; a checkpoint carries its
    sizes, so it reloads without the data.

    Args:
        rank: K, the number of basis columns (0: reference head, 1: Bradley-Terry, >=2: LoRe).
        tau: temperature dividing every logit (100 in the reference).
        lr: Adam learning rate (0.5 in the reference).
        schedule: ``joint`` (one Adam over V and W) or ``alternating`` (per iteration a W step with
            V frozen, then a V step with W frozen; counts two optimizer steps in ``global_step``).
        loss_weighting: ``pair_mean`` (mean over all pairs, the default) or ``user_mean`` (sum of
            each user's mean, the reference's older class).
        regularizer: pull of the basis columns towards ``V_ref``: ``none``, ``cosine`` or ``l2``.
        alpha: regularizer strength, ramped 0 -> alpha between 20% and 80% of the iterations.
        weight_init: initial W logits: ``randn`` (the joint reference), ``rand`` (the alternating
            reference) or ``zeros`` (uniform weights).
        basis_weight_decay: L2 penalty on V: Adam adds this times V to V's gradient (0: none). It
            keeps V from memorizing when d is large against the number of pairs.
        prune_threshold: at the end of fit keep column k only if some user's weight on it is at
            least this (1e-2 in the reference; 0 keeps every column).
        cpu_kernel: train on the CPU with the fused C kernel, which reads the features once per step
            (compiled on first use; without a C compiler the PyTorch path, same results).
        initial_basis: start from this basis instead of a random one: a ``basis.safetensors`` or a
            ``BasisModule`` checkpoint of K columns (and its users' weights, when it has the same users).
        reference_head_file: read ``V_ref`` from this file instead of the data module's (a basis file or
            checkpoint with a reference head, a ``.safetensors`` with a tensor ``reference_head``, or
            a ``.npy`` vector).
        fewshot: how new users are adapted to this basis (phase 2: ``ProtocolEvaluation`` uses it).
    """

    checkpoint_kind = "basis"

    def __init__(
        self,
        rank: int = 5,
        tau: float = 100.0,
        lr: float = 0.5,
        schedule: Literal["joint", "alternating"] = "joint",
        loss_weighting: LF.LossWeighting = "pair_mean",
        regularizer: LF.Regularizer = "none",
        alpha: float = 0.0,
        weight_init: Literal["randn", "rand", "zeros"] = "randn",
        basis_weight_decay: float = 0.0,
        prune_threshold: float = 1e-2,
        cpu_kernel: bool = True,
        initial_basis: str | None = None,
        reference_head_file: str | None = None,
        fewshot: FewShotSettings | None = None,
    ) -> None:
        super().__init__()
        if isinstance(fewshot, dict):  # a checkpoint's hyper-parameters
            fewshot = FewShotSettings(**fewshot)
        self.fewshot = fewshot if fewshot is not None else FewShotSettings()
        if rank < 0:
            raise LoreDataError(f"rank must be >= 0, got {rank}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if schedule not in ("joint", "alternating"):
            raise ValueError(f"schedule must be 'joint' or 'alternating', got {schedule!r}")
        if loss_weighting not in ("pair_mean", "user_mean"):
            raise ValueError(f"loss_weighting must be 'pair_mean' or 'user_mean', got {loss_weighting!r}")
        if regularizer not in ("none", "cosine", "l2"):
            raise ValueError(f"regularizer must be 'none', 'cosine' or 'l2', got {regularizer!r}")
        if weight_init not in ("randn", "rand", "zeros"):
            raise ValueError(f"weight_init must be 'randn', 'rand' or 'zeros', got {weight_init!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if basis_weight_decay < 0:
            raise ValueError(f"basis_weight_decay must be >= 0, got {basis_weight_decay}")
        if not 0 <= prune_threshold <= 1:
            raise ValueError(f"prune_threshold must be in [0, 1], got {prune_threshold}")
        self.save_hyperparameters(ignore=["fewshot"])
        self.hparams["fewshot"] = asdict(self.fewshot)  # plain values: checkpoints load with weights_only=True
        # Manual optimization: the alternating schedule takes two optimizer steps per batch, and
        # K=0 trains nothing; one code path serves all three.
        self.automatic_optimization = False
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))
        self._initial: LoreModel | None = None

    @classmethod
    def from_initial(cls, model: LoreModel, **kwargs) -> BasisModule:
        """A module that starts from ``model``'s V and W (tensors you made) instead of random ones.

        ``rank`` is the model's K; its users must be the data's seen users (checked in ``setup``).
        """
        module = cls(rank=model.rank, tau=model.temperature, **kwargs)
        module._initial = model
        return module

    # ----------------------------------------------------------------------------- construction
    @property
    def data_request(self) -> DataRequest:
        return DataRequest(population="seen")

    def _trains_basis(self) -> bool:
        return self.hparams.rank >= 1

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            if self.built:
                return
            raise ValueError("BasisModule needs a PreferenceDataModule (it reads the users, d and V_ref from it)")
        self._connect(datamodule)
        if not (datamodule.has_split("seen_train") or datamodule.has_split("seen_test")):
            raise ValueError(f"{type(datamodule).__name__} has no seen users for BasisModule")
        num_users, dim = datamodule.num_users, datamodule.dim
        if self.built:
            if (num_users, dim) != (self.model.num_users, self.model.dim):
                raise LoreDataError(
                    f"this BasisModule was built for {self.model.num_users} users x d={self.model.dim}, "
                    f"but {type(datamodule).__name__} has {num_users} seen users x d={dim}"
                )
            return
        self._install(self._initial_model(datamodule))

    def _initial_model(self, datamodule) -> LoreModel:
        hp = self.hparams
        path = hp.reference_head_file
        reference = datamodule.reference_head if path is None else read_reference_head(path)
        if reference is not None and reference.shape != (datamodule.dim,):
            raise LoreDataError(f"V_ref {path or ''} has d={reference.shape[0]}, the data have d={datamodule.dim}")
        if hp.rank == 0 or hp.regularizer != "none":
            if reference is None:
                what = "rank K=0 (the reference model)" if hp.rank == 0 else f"regularizer={hp.regularizer!r}"
                raise LoreDataError(f"{what} needs a reference head V_ref, and the data module provides none")
        user_ids, embedder = list(datamodule.seen_user_ids), datamodule.embedder
        initial = self._initial
        if initial is None and hp.initial_basis is not None:
            initial = load_basis(hp.initial_basis).to_model()
        if initial is None:
            return LoreModel.initial(datamodule.dim, hp.rank, datamodule.num_users, tau=hp.tau, reference_head=reference,
                                     weight_init=hp.weight_init, user_ids=user_ids, embedder=embedder)
        where = hp.initial_basis or "the initial model"
        if initial.dim != datamodule.dim or initial.rank != max(hp.rank, 1):
            raise LoreDataError(f"{where} is d={initial.dim} x K={initial.rank}, but this run has d={datamodule.dim} "
                                f"and rank={hp.rank}")
        logits = initial.user_logits
        if hp.rank >= 2 and (initial.num_users != datamodule.num_users
                             or (initial.user_ids and initial.user_ids != user_ids)):
            if self._initial is not None:
                raise LoreDataError(f"{where} has {initial.num_users} users, the data's seen users are {datamodule.num_users}")
            logits = None  # another population: start their weights by weight_init
        if hp.rank >= 2 and logits is None:
            logits = LF.initial_user_logits(datamodule.num_users, hp.rank, hp.weight_init)
        return LoreModel(initial.basis, logits if hp.rank >= 2 else None, tau=hp.tau,
                         reference_head=reference if reference is not None else initial.reference_head,
                         num_users=datamodule.num_users, user_ids=user_ids, embedder=embedder,
                         train_basis=hp.rank >= 1)

    def checkpoint_metadata(self) -> dict:
        return {"prune_threshold": float(self.hparams.prune_threshold)}

    # ------------------------------------------------------------------------------------ model
    @property
    def rank(self) -> int:
        return self.hparams.rank

    def kept_basis(self) -> tuple[Tensor, Tensor]:
        """The basis and the users' weights restricted to the columns that survived pruning."""
        return self.model.kept()

    def prune_(self) -> int:
        """Drop the columns no user weighs at ``prune_threshold`` or more. Idempotent; returns K kept."""
        return self.model.prune_(self.hparams.prune_threshold)

    # --------------------------------------------------------------------------------- training
    def _pair_loss(self, features: Tensor, users: Tensor, counts: Tensor | None) -> tuple[Tensor, Tensor]:
        """(this rank's NLL, the detached logits) of a training batch: one pass of ``LF.pair_loss``."""
        return LF.pair_loss(features, users, self.model.basis, self.model.user_weights(), self.model.temperature,
                            self.hparams.loss_weighting, counts, self._loss_scale(counts),
                            fused=self.hparams.cpu_kernel)

    def _regularizer(self) -> Tensor:
        if self.hparams.regularizer == "none":
            return self.model.basis.new_zeros(())
        return LF.basis_regularizer(self.model.basis, self.model.reference_head, self.hparams.regularizer)

    def total_iterations(self) -> int:
        """Iterations (batches) this fit will run; the alpha ramp is laid over them."""
        total = self.trainer.estimated_stepping_batches
        if self.hparams.schedule == "alternating" and self.rank >= 2 and self.trainer.max_steps != -1:
            total = min(total, self.trainer.max_steps // 2)  # two optimizer steps per iteration
        if total == float("inf"):
            raise ValueError("set trainer.max_epochs or trainer.max_steps: the alpha ramp needs a finite length")
        return int(total)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        features, users, counts = batch["features"], batch["users"], batch.get("counts")
        alpha = 0.0
        if self.hparams.regularizer != "none" and self.rank >= 1:
            alpha = LF.alpha_at(int(self.iterations_done), self.total_iterations(), self.hparams.alpha)
        if self.rank == 0:
            with torch.no_grad():
                nll, logits = self._pair_loss(features, users, counts)
                regularizer = nll.new_zeros(())
        elif self.hparams.schedule == "joint" or self.rank == 1:
            logits, nll, regularizer = self._optimize(self.optimizers(), features, users, alpha, counts)
        else:
            opt_weights, opt_basis = self.optimizers()
            logits, nll, _ = self._optimize(opt_weights, features, users, 0.0, counts)  # W step, V frozen
            _, _, regularizer = self._optimize(opt_basis, features, users, alpha, counts)  # V step, new W
        iteration, total = int(self.iterations_done), self.total_iterations()
        self.iterations_done += 1
        if self.rank >= 2 and iteration + 1 >= total:
            self.prune_()  # before the final checkpoint is written
        logged = self._logs_step(iteration, total)
        if self._train_accuracy_counts(logged):
            self.metrics["train_acc"].update(logits, users)
        if logged:
            # nll is this rank's scaled share: sync_dist's mean over ranks is the global value. The
            # regularizer and alpha are the same on every rank: no collective needed.
            self.log_dict({"train/loss": nll + alpha * regularizer, "train/nll": nll},
                          on_step=True, on_epoch=False, batch_size=users.numel(), sync_dist=True)
            self.log_dict({"train/regularizer": regularizer, "train/alpha": alpha},
                          on_step=True, on_epoch=False, batch_size=users.numel())
        return nll

    def _optimize(
        self, optimizer, features: Tensor, users: Tensor, alpha: float, counts: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One Adam step of ``nll + alpha * regularizer`` on ``optimizer``'s parameters alone."""
        # toggle_optimizer freezes the other parameter group before the forward pass, so its
        # gradient is never computed (the V gradient is the expensive one).
        self.toggle_optimizer(optimizer)
        nll, logits = self._pair_loss(features, users, counts)
        regularizer = self._regularizer()
        optimizer.zero_grad()
        if self._reduces_gradients_itself():
            # DDP's reducer expects a gradient for every parameter in every backward and fails on
            # the frozen group. Bypass it and average only the group being stepped: this works
            # under plain strategy=ddp (find_unused_parameters would need a strategy flag, a graph
            # search per backward, and all-reduces V and W in both steps of an iteration).
            with self.trainer.strategy.block_backward_sync():
                self.manual_backward(nll + alpha * regularizer)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad.copy_(self.trainer.strategy.reduce(param.grad, reduce_op="mean"))
        else:
            self.manual_backward(nll + alpha * regularizer)
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        return logits, nll.detach(), regularizer.detach()

    def _reduces_gradients_itself(self) -> bool:
        """The alternating schedule under DDP averages its gradients over ranks by hand."""
        return (self.hparams.schedule == "alternating" and self.rank >= 2 and self._trainer is not None
                and self.trainer.world_size > 1)

    def on_train_end(self) -> None:
        self.prune_()

    def configure_optimizers(self):
        if self.rank == 0:
            return None
        lr, decay = self.hparams.lr, self.hparams.basis_weight_decay
        basis_group = {"params": [self.model.basis], "weight_decay": decay}
        if self.rank == 1:
            return torch.optim.Adam([basis_group], lr=lr)
        if self.hparams.schedule == "joint":
            return torch.optim.Adam([basis_group, {"params": [self.model.user_logits]}], lr=lr)
        return [torch.optim.Adam([self.model.user_logits], lr=lr), torch.optim.Adam([basis_group], lr=lr)]
