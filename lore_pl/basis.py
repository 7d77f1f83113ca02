"""Phase 1: learn the shared basis V and the seen users' weights W jointly."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lore_pl import functional as LF
from lore_pl.errors import LoreDataError
from lore_pl.module import PreferenceModule


class BasisModule(PreferenceModule):
    """Low-rank reward model: a basis ``V`` ``[d, K]`` and per-user logits ``W`` ``[C, K]``.

    User u prefers chosen with probability ``sigmoid(x . V softmax(W[u]) / tau)``. ``rank`` K=0 is
    the reference model (the data's reference head ``V_ref``, nothing trained, every user weight
    [1]); K=1 is plain Bradley-Terry (one shared direction, no per-user weights); K>=2 is LoRe.
    The number of users, the feature dimension and ``V_ref`` are read from the data module in
    ``setup`` and recorded in the hyper-parameters, so a checkpoint reloads without the data.

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
        num_users: set from the data module; leave unset.
        feature_dim: set from the data module; leave unset.
        has_reference_head: set from the data module; leave unset.
    """

    population = "seen"  # the data module serves the seen users' pairs to this module

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
        num_users: int | None = None,
        feature_dim: int | None = None,
        has_reference_head: bool | None = None,
    ) -> None:
        super().__init__()
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
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if basis_weight_decay < 0:
            raise ValueError(f"basis_weight_decay must be >= 0, got {basis_weight_decay}")
        self.save_hyperparameters()
        # Manual optimization: the alternating schedule takes two optimizer steps per batch, and
        # K=0 trains nothing; one code path serves all three.
        self.automatic_optimization = False
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))
        self._built = False
        if num_users is not None and feature_dim is not None:
            reference = torch.zeros(feature_dim) if has_reference_head else None
            self._build(num_users, feature_dim, reference)

    # ----------------------------------------------------------------------------- construction
    def _build(self, num_users: int, dim: int, reference_head: Tensor | None) -> None:
        rank = self.hparams.rank
        if rank > dim:
            raise LoreDataError(f"rank K={rank} exceeds the feature dimension d={dim}: V is [d, K] with K <= d")
        needs_reference = rank == 0 or self.hparams.regularizer != "none"
        if needs_reference and reference_head is None:
            what = "rank K=0 (the reference model)" if rank == 0 else f"regularizer={self.hparams.regularizer!r}"
            raise LoreDataError(f"{what} needs a reference head V_ref, and the data module provides none")
        self.register_buffer("reference_head", None if reference_head is None else reference_head.clone().float())
        if rank >= 1:
            self.basis = nn.Parameter(torch.randn(dim, rank))
        if rank >= 2:
            self.user_logits = nn.Parameter(LF.initial_user_logits(num_users, rank, self.hparams.weight_init))
        self.register_buffer("active_columns", torch.ones(max(rank, 1), dtype=torch.bool))
        self._build_metrics(num_users)
        self._built = True

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            if self._built:
                return
            raise ValueError("BasisModule needs a PreferenceDataModule (it reads num_users, dim and V_ref from it)")
        if datamodule.has_split("seen_train") or datamodule.has_split("seen_test"):
            num_users, dim = datamodule.num_users, datamodule.dim
        else:
            raise ValueError(f"{type(datamodule).__name__} has no seen users for BasisModule")
        if self._built:
            if (num_users, dim) != (self.hparams.num_users, self.hparams.feature_dim):
                raise LoreDataError(
                    f"this BasisModule was built for {self.hparams.num_users} users x d={self.hparams.feature_dim}, "
                    f"but {type(datamodule).__name__} has {num_users} seen users x d={dim}"
                )
            return
        reference = datamodule.reference_head
        self._record_hparams(num_users=num_users, feature_dim=dim, has_reference_head=reference is not None)
        self._build(num_users, dim, reference)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming (--ckpt_path) builds the module from the data first; a checkpoint of another
        # shape would fail deep in load_state_dict with a bare "size mismatch": say which file and why.
        saved = checkpoint.get("hyper_parameters", {})
        here = {"feature_dim": self.hparams.feature_dim, "rank": self.hparams.rank, "num_users": self.hparams.num_users}
        differ = {k: (saved.get(k), v) for k, v in here.items() if k in saved and v is not None and saved.get(k) != v}
        if differ:
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            what = ", ".join(f"{k}: checkpoint {a}, data/model {b}" for k, (a, b) in differ.items())
            raise LoreDataError(f"checkpoint {path or ''} does not match this run ({what})".replace("  ", " "))

    # ------------------------------------------------------------------------------------ model
    @property
    def rank(self) -> int:
        return self.hparams.rank

    def current_basis(self) -> Tensor:
        """V ``[d, K]`` (for K=0 the reference head as one column)."""
        if self.rank == 0:
            return self.reference_head[:, None]
        return self.basis

    def user_weights(self) -> Tensor:
        """Each seen user's simplex weights ``[C, K]`` (zero on pruned columns; [1] for K<=1)."""
        if self.rank <= 1:
            return self.active_columns.new_ones(self.hparams.num_users, 1, dtype=torch.float32).to(self.device)
        return LF.simplex_weights(self.user_logits, self.active_columns)

    def forward(self, features: Tensor, users: Tensor) -> Tensor:
        """Bradley-Terry logits of the pairs ``features`` for the seen users ``users``."""
        return LF.pair_logits(features, users, self.current_basis(), self.user_weights(), self.hparams.tau)

    def kept_basis(self) -> tuple[Tensor, Tensor]:
        """The basis and the users' weights restricted to the columns that survived pruning."""
        keep = self.active_columns
        return self.current_basis()[:, keep].detach(), self.user_weights()[:, keep].detach()

    @torch.no_grad()
    def prune_(self) -> int:
        """Drop the columns no user weighs at ``prune_threshold`` or more. Idempotent; returns K kept."""
        if self.rank >= 2 and self.hparams.prune_threshold > 0:
            self.active_columns &= LF.prune_mask(self.user_weights(), self.hparams.prune_threshold)
        return int(self.active_columns.sum())

    # --------------------------------------------------------------------------------- training
    def _nll(self, logits: Tensor, users: Tensor, counts: Tensor | None = None) -> Tensor:
        return self._loss(logits, users, self.hparams.loss_weighting, counts)

    def _pair_loss(self, features: Tensor, users: Tensor, counts: Tensor | None) -> tuple[Tensor, Tensor]:
        """(this rank's NLL, the detached logits) of a training batch: one pass of ``LF.pair_loss``."""
        return LF.pair_loss(features, users, self.current_basis(), self.user_weights(), self.hparams.tau,
                            self.hparams.loss_weighting, counts, self._loss_scale(counts),
                            fused=self.hparams.cpu_kernel)

    def _regularizer(self) -> Tensor:
        if self.hparams.regularizer == "none":
            return self.basis.new_zeros(())
        return LF.basis_regularizer(self.basis, self.reference_head, self.hparams.regularizer)

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
        basis_group = {"params": [self.basis], "weight_decay": decay}
        if self.rank == 1:
            return torch.optim.Adam([basis_group], lr=lr)
        if self.hparams.schedule == "joint":
            return torch.optim.Adam([basis_group, {"params": [self.user_logits]}], lr=lr)
        return [torch.optim.Adam([self.user_logits], lr=lr), torch.optim.Adam([basis_group], lr=lr)]
