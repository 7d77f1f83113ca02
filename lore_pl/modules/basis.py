"""Phase 1: learn the shared basis V and the seen users' weights W jointly."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from lore_pl.core import estimator as E
from lore_pl.core import functional as LF
from lore_pl.core.fewshot import FewShotSettings, weight_covariance
from lore_pl.core.model import LoreModel
from lore_pl.core.threads import threads_for
from lore_pl.data.basis_file import load_basis, read_reference_head
from lore_pl.data.preferences import DataRequest
from lore_pl.errors import LoreDataError, LoreDataWarning
from lore_pl.modules.base import PreferenceModule
from lore_pl.modules.distributed import release_process_group_at_exit

Estimator = Literal["map", "adam"]
#: under this many validation pairs the held-out choice is mostly noise: a warning says so
FEW_VALIDATION_PAIRS = 100
#: users' reward directions closer than this (relative to their norm) are one shared direction
SAME_HEADS = 1e-3
#: the Adam estimator's options, and their defaults: set with ``estimator: map`` they would be ignored
ADAM_OPTIONS = {"lr": 0.5, "schedule": "joint", "loss_weighting": "pair_mean", "regularizer": "none", "alpha": 0.0,
                "weight_init": "randn", "basis_weight_decay": 0.0}


@rank_zero_only
def say(text: str) -> None:
    print(text, flush=True)


class BasisModule(PreferenceModule):
    """Low-rank reward model: a basis ``V`` ``[d, K]`` and per-user logits ``W`` ``[C, K]``.

    User u prefers chosen with probability ``sigmoid(x . V softmax(W[u]) / tau)``. ``rank`` K=0 is
    the reference model (the data's reference head ``V_ref``, nothing trained, every user weight
    [1]); K=1 is plain Bradley-Terry (one shared direction, no per-user weights); K>=2 is LoRe;
    ``auto`` (the default) chooses among ``map_settings.ranks``, K=1 included, on the validation pairs.

    Two estimators:

    - ``map`` (the default): the MAP fit of ``lore_pl.core.estimator`` with a spectral start; in
      ``setup`` it chooses K and the strengths of its priors (a ridge on V, a Gaussian on the users'
      logits around a learned population mean) on the validation pairs, printing the held-out curve;
      then every training epoch is one L-BFGS stage of a ridge path from strong to weak, each
      validated, until the validation NLL gets worse (the best stage is kept). It needs validation
      pairs (the data module's ``val_fraction``) and full-batch training; its models have tau = 1.
    - ``adam``: the reference code's estimator: full-batch Adam on the mean NLL, joint or alternating,
      with the reference's options (``lr``, ``schedule``, ``loss_weighting``, the pull to ``V_ref``, ...).

    The model (``self.model``, a ``LoreModel``) is built in ``setup`` from the data module's seen
    users, feature dimension and ``V_ref``, or from ``initial_basis``; a checkpoint carries its
    sizes, so it reloads without the data.

    Args:
        rank: K (0: reference head, 1: Bradley-Terry, >=2: LoRe), or ``auto``: chosen on validation pairs.
        estimator: ``map`` (held-out selection, priors, L-BFGS) or ``adam`` (the reference's).
        tau: temperature dividing every logit (``null``: 1 for ``map``, 100 for ``adam`` as in the reference).
        map_settings: the MAP estimator's candidates, grids and iterations.
        lr: Adam learning rate (0.5 in the reference).
        schedule: ``joint`` (one Adam over V and W) or ``alternating`` (per iteration a W step with
            V frozen, then a V step with W frozen; counts two optimizer steps in ``global_step``).
        loss_weighting: ``pair_mean`` (mean over all pairs, the default) or ``user_mean`` (sum of
            each user's mean, the reference's older class).
        regularizer: pull of the basis columns towards ``V_ref``: ``none``, ``cosine`` or ``l2``.
        alpha: regularizer strength, ramped 0 -> alpha between 20% and 80% of the iterations.
        weight_init: initial W logits: ``randn`` (the joint reference), ``rand`` (the alternating
            reference) or ``zeros`` (uniform weights).
        basis_weight_decay: L2 penalty on V: Adam adds this times V to V's gradient (0: none).
        prune_threshold: at the end of fit keep column k only if some user's weight on it is at
            least this (1e-2 in the reference; 0 keeps every column).
        cpu_kernel: train on the CPU with the fused C kernel, which reads the features once per step
            (compiled on first use; without a C compiler the PyTorch path, same results).
        initial_basis: start from this basis instead of a random one (``map``: instead of the spectral
            selection): a ``basis.safetensors`` or a ``BasisModule`` checkpoint of K columns (and its
            users' weights, when it has the same users).
        reference_head_file: read ``V_ref`` from this file instead of the data module's (a basis file or
            checkpoint with a reference head, a ``.safetensors`` with a tensor ``reference_head``, or
            a ``.npy`` vector).
        fewshot: how new users are adapted to this basis (phase 2: ``ProtocolEvaluation`` uses it).
    """

    checkpoint_kind = "basis"

    def __init__(
        self,
        rank: int | Literal["auto"] = "auto",
        estimator: Estimator = "map",
        tau: float | None = None,
        map_settings: E.MapSettings | None = None,
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
        if isinstance(map_settings, dict):
            map_settings = E.MapSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in map_settings.items()})
        self.fewshot = fewshot if fewshot is not None else FewShotSettings()
        self.map_settings = map_settings if map_settings is not None else E.MapSettings()
        if rank != "auto" and (not isinstance(rank, int) or rank < 0):
            raise LoreDataError(f"rank must be 'auto' or an int >= 0, got {rank!r}")
        if estimator not in ("map", "adam"):
            raise ValueError(f"estimator must be 'map' or 'adam', got {estimator!r}")
        if rank == "auto" and estimator != "map":
            raise ValueError("rank 'auto' chooses K on validation pairs with the MAP estimator: set estimator: map "
                             "or an int rank")
        if tau is not None and tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if estimator == "map":
            if tau not in (None, 1.0):
                raise ValueError("the MAP estimator fits V on the logit scale (tau = 1): set tau only with "
                                 "estimator: adam")
            given = {
                "lr": lr,
                "schedule": schedule,
                "loss_weighting": loss_weighting,
                "regularizer": regularizer,
                "alpha": alpha,
                "weight_init": weight_init,
                "basis_weight_decay": basis_weight_decay,
            }
            ignored = sorted(name for name, value in given.items() if value != ADAM_OPTIONS[name])
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)}: options of the Adam estimator; set estimator: adam to use them"
                )
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
        self.save_hyperparameters(ignore=["fewshot", "map_settings"])
        # plain values: checkpoints load with weights_only=True
        self.hparams["fewshot"] = asdict(self.fewshot)
        self.hparams["map_settings"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.map_settings).items()
        }
        # Manual optimization: the alternating schedule takes two optimizer steps per batch, L-BFGS
        # evaluates several times per step, and K=0 trains nothing; one code path serves them all.
        self.automatic_optimization = False
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))
        self._initial: LoreModel | None = None
        self.selection: dict = {}  # the held-out curve and what was chosen (map), for the logs and reports
        self._finished = False  # the MAP fit's best stage is restored and final
        self._val_pair_nll: list[Tensor] = []  # this validation's per-pair NLLs (the MAP path's stages)
        self._best_pair_nll: Tensor | None = None  # the best stage's, for a stage past the path's edge

    @classmethod
    def from_initial(cls, model: LoreModel, **kwargs) -> BasisModule:
        """A module that starts from ``model``'s V and W (tensors you made) instead of random ones.

        ``rank`` is the model's K; its users must be the data's seen users (checked in ``setup``).
        """
        kwargs.setdefault("tau", model.temperature if kwargs.get("estimator", "map") == "adam" else None)
        module = cls(rank=model.rank, **kwargs)
        module._initial = model
        return module

    # ----------------------------------------------------------------------------- construction
    @property
    def data_request(self) -> DataRequest:
        return DataRequest(population="seen")

    @property
    def tau(self) -> float:
        if self.hparams.tau is not None:
            return float(self.hparams.tau)
        return 1.0 if self.hparams.estimator == "map" else 100.0

    def _trains_basis(self) -> bool:
        return self.hparams.rank != 0

    def setup(self, stage: str) -> None:
        release_process_group_at_exit()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            if self.built:
                return
            raise LoreDataError("BasisModule needs a PreferenceDataModule (it reads the users, d and V_ref from it)")
        self._connect(datamodule)
        if not (datamodule.has_split("seen_train") or datamodule.has_split("seen_test")):
            raise LoreDataError(f"{type(datamodule).__name__} has no seen users for BasisModule")
        num_users, dim = datamodule.num_users, datamodule.dim
        if self.built:
            if (num_users, dim) != (self.model.num_users, self.model.dim):
                raise LoreDataError(
                    f"this BasisModule was built for {self.model.num_users} users x d={self.model.dim}, "
                    f"but {type(datamodule).__name__} has {num_users} seen users x d={dim}"
                )
            return
        if self.hparams.estimator == "map" and self.hparams.rank != 0:
            self._install(self._selected_model(datamodule))
        else:
            self._install(self._initial_model(datamodule))

    def _reference_head(self, datamodule) -> Tensor | None:
        hp = self.hparams
        path = hp.reference_head_file
        reference = datamodule.reference_head if path is None else read_reference_head(path)
        if reference is not None and reference.shape != (datamodule.dim,):
            raise LoreDataError(f"V_ref {path or ''} has d={reference.shape[0]}, the data have d={datamodule.dim}")
        if (hp.rank == 0 or hp.regularizer != "none") and reference is None:
            what = "rank K=0 (the reference model)" if hp.rank == 0 else f"regularizer={hp.regularizer!r}"
            raise LoreDataError(f"{what} needs a reference head V_ref, and the data module provides none")
        return reference

    def _given_initial(self) -> LoreModel | None:
        if self._initial is not None:
            return self._initial
        if self.hparams.initial_basis is not None:
            return load_basis(self.hparams.initial_basis).to_model()
        return None

    def _initial_model(self, datamodule) -> LoreModel:
        hp = self.hparams
        reference = self._reference_head(datamodule)
        user_ids, embedder = list(datamodule.seen_user_ids), datamodule.embedder
        initial = self._given_initial()
        if initial is None:
            return LoreModel.initial(
                datamodule.dim,
                hp.rank,
                datamodule.num_users,
                tau=self.tau,
                reference_head=reference,
                weight_init=hp.weight_init,
                user_ids=user_ids,
                embedder=embedder,
                embedder_weights=getattr(datamodule, "embedder_weights", ""),
            )
        where = hp.initial_basis or "the initial model"
        rank = initial.rank if hp.rank == "auto" else hp.rank
        if initial.dim != datamodule.dim or initial.rank != max(rank, 1):
            raise LoreDataError(
                f"{where} is d={initial.dim} x K={initial.rank}, but this run has d={datamodule.dim} and rank={hp.rank}"
            )
        logits = initial.user_logits
        if rank >= 2 and (
            initial.num_users != datamodule.num_users or (initial.user_ids and initial.user_ids != user_ids)
        ):
            if self._initial is not None:
                raise LoreDataError(
                    f"{where} has {initial.num_users} users, the data's seen users are {datamodule.num_users}"
                )
            logits = None  # another population: start their weights by weight_init
        if rank >= 2 and logits is None:
            logits = LF.initial_user_logits(datamodule.num_users, rank, hp.weight_init)
        mean = None
        if hp.estimator == "map" and rank >= 2:
            mean = initial.prior_mean if initial.prior_mean is not None else logits.detach().mean(0)
        return LoreModel(
            initial.basis,
            logits if rank >= 2 else None,
            tau=self.tau,
            reference_head=reference if reference is not None else initial.reference_head,
            num_users=datamodule.num_users,
            user_ids=user_ids,
            embedder=embedder,
            embedder_weights=getattr(datamodule, "embedder_weights", ""),
            prior_mean=mean,
            prior_precision=None if mean is None else torch.full((rank,), self.map_settings.start_prior),
            train_basis=rank >= 1,
        )

    def checkpoint_metadata(self) -> dict:
        return {"prune_threshold": float(self.hparams.prune_threshold), "selection": self.selection}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.selection = dict(checkpoint.get("lore_pl", {}).get("selection", {}))

    # ------------------------------------------------------------------------------------ model
    @property
    def rank(self) -> int:
        """K: the chosen rank once the model is built (``auto`` before), 0 for the reference model."""
        if self.hparams.rank == 0:
            return 0
        return self.model.rank if self.built else self.hparams.rank

    def kept_basis(self) -> tuple[Tensor, Tensor]:
        """The basis and the users' weights restricted to the columns that survived pruning."""
        return self.model.kept()

    def prune_(self) -> int:
        """Drop the columns no user weighs at ``prune_threshold`` or more. Idempotent; returns K kept."""
        return self.model.prune_(self.hparams.prune_threshold)

    # ------------------------------------------------------------------- training: the Adam estimator
    def _pair_loss(self, features: Tensor, users: Tensor, counts: Tensor | None) -> tuple[Tensor, Tensor]:
        """(this rank's NLL, the detached logits) of a training batch: one pass of ``LF.pair_loss``."""
        return LF.pair_loss(
            features,
            users,
            self.model.basis,
            self.model.user_weights(),
            self.model.temperature,
            self.hparams.loss_weighting,
            counts,
            self._loss_scale(counts),
            fused=self.hparams.cpu_kernel,
        )

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
            raise LoreDataError("set trainer.max_epochs or trainer.max_steps: the alpha ramp needs a finite length")
        return int(total)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.hparams.estimator == "map" and self.rank >= 1:
            return self._map_step(batch)
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
            self.log_dict(
                {"train/loss": nll + alpha * regularizer, "train/nll": nll},
                on_step=True,
                on_epoch=False,
                batch_size=users.numel(),
                sync_dist=True,
            )
            self.log_dict(
                {"train/regularizer": regularizer, "train/alpha": alpha},
                on_step=True,
                on_epoch=False,
                batch_size=users.numel(),
            )
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
        # DDP's reducer expects a gradient for every parameter in every backward and fails on the
        # frozen group: _backward bypasses it and averages only the group being stepped (this works
        # under plain strategy=ddp; find_unused_parameters would need a strategy flag, a graph search
        # per backward, and all-reduces V and W in both steps of an iteration).
        self._backward(nll + alpha * regularizer, [p for group in optimizer.param_groups for p in group["params"]])
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        return logits, nll.detach(), regularizer.detach()

    def _reduces_gradients_itself(self) -> bool:
        """The alternating schedule under DDP averages its gradients over ranks by hand."""
        return (
            self._trainer is not None
            and self.trainer.world_size > 1
            and (self.hparams.estimator == "map" or (self.hparams.schedule == "alternating" and self.rank >= 2))
        )

    def _backward(self, loss: Tensor, parameters) -> None:
        """``manual_backward``; where the step is not DDP's one backward per forward (the alternating
        schedule, L-BFGS's several evaluations), the gradients are averaged over ranks by hand."""
        if not self._reduces_gradients_itself():
            self.manual_backward(loss)
            return
        with self.trainer.strategy.block_backward_sync():
            self.manual_backward(loss)
        for param in parameters:
            if param.grad is not None:
                param.grad.copy_(self.trainer.strategy.reduce(param.grad, reduce_op="mean"))

    # -------------------------------------------------------------------- training: the MAP estimator
    def _selected_model(self, datamodule) -> LoreModel:
        """The model the full-space path starts from: chosen in the spectral subspace on validation pairs."""
        if not datamodule.has_split("seen_val") or len(datamodule.split("seen_val")) == 0:
            raise LoreDataError(
                f"the MAP estimator chooses K and its strengths on validation pairs, and "
                f"{type(datamodule).__name__} has none: give it a val_fraction > 0 (or use "
                "estimator: adam with an int rank)"
            )
        settings, hp = self.map_settings, self.hparams
        reference = self._reference_head(datamodule)
        initial = self._given_initial()
        if initial is not None:
            model = self._initial_model(datamodule)
            self.selection = {
                "rank": model.rank,
                "strengths": asdict(E.Strengths(max(settings.start_ridges), 1.0, settings.start_prior)),
                "curve": [],
                "start": hp.initial_basis or "given tensors",
            }
            return model
        train, val = datamodule.split("seen_train"), datamodule.split("seen_val")
        if len(val) < FEW_VALIDATION_PAIRS:
            rank_zero_warn(f"only {len(val)} validation pairs choose K and the strengths: the choice is mostly "
                           "noise (one shared model, K=1, wins ties); more data or a larger val_fraction helps",
                           category=LoreDataWarning)
        ranks = settings.ranks if hp.rank == "auto" else (hp.rank,)
        started = time.perf_counter()
        selected = E.select_model(train.features, train.users, val.features, val.users, train.num_users, settings,
                                  ranks, extend_ranks=hp.rank == "auto")
        seconds = time.perf_counter() - started
        best, curve = selected.best, selected.curve
        self.selection = {
            "rank": best.rank,
            "strengths": asdict(best.strengths),
            "val_pairs": len(val),
            "curve": [
                {"rank": c.rank, **asdict(c.strengths), "val_nll": c.val_nll, "val_acc": c.val_acc} for c in curve
            ],
            "extended": selected.extended,
            "notes": selected.notes,
            "seconds": round(seconds, 2),
        }
        extended = "".join(f"\n  extended past the grid's edge: {line}" for line in selected.extended)
        extended += "".join(f"\n  {line}" for line in selected.notes)
        say(
            f"model selection on {len(val)} validation pairs (held-out {getattr(datamodule, 'held_out', 'prompts')}) "
            f"in a {settings.subspace}-dim "
            f"spectral subspace:\n" + "\n".join(f"  {c.describe()}" for c in curve) + extended
            + f"\n  chosen: {best.describe()} ({len(curve)} fits in {seconds:.1f} s)"
        )
        prior = torch.full((best.rank,), best.strengths.prior) if best.rank >= 2 else None
        return LoreModel(
            best.state.basis,
            best.state.logits,
            tau=self.tau,
            reference_head=reference,
            num_users=train.num_users,
            user_ids=list(datamodule.seen_user_ids),
            embedder=datamodule.embedder,
            embedder_weights=getattr(datamodule, "embedder_weights", ""),
            prior_mean=best.state.mean,
            prior_precision=prior,
        )

    def _install(self, model: LoreModel) -> None:
        super()._install(model)
        if self.hparams.estimator == "map" and self.hparams.rank != 0:
            # where the ridge path is and its best stage so far (buffers: a resumed fit goes on from them)
            self.register_buffer("path_stage", torch.zeros((), dtype=torch.long))
            self.register_buffer("best_val_nll", torch.tensor(float("inf"), dtype=torch.float64))
            for name, tensor in self._map_parameters().items():
                self.register_buffer(f"best_{name}", tensor.detach().clone())
            self.metrics["val_nll"] = MeanMetric()

    def _map_parameters(self) -> dict[str, Tensor]:
        model = self.model
        found = {"basis": model.basis, "user_logits": model.user_logits, "prior_mean": model.prior_mean}
        return {name: tensor for name, tensor in found.items() if tensor is not None}

    def _chosen(self) -> E.Strengths:
        if self.selection.get("strengths"):
            return E.Strengths(**self.selection["strengths"])
        return E.Strengths(max(self.map_settings.start_ridges), 1.0, self.map_settings.start_prior)

    @property
    def ridge_path(self) -> tuple[float, ...]:
        """The full-space ridges, strong to weak: around the one chosen in the subspace (K >= 2), or
        the wide ``shared_path`` (K = 1)."""
        if self.model.rank == 1:
            path = self.map_settings.shared_path
        else:
            path = tuple(self._chosen().ridge * factor for factor in self.map_settings.path)
        for _ in range(int(self.selection.get("path_extended", 0))):  # past the weak edge, where it was the best
            path = path + (E.past_edge(path, path[-1]),)
        return path

    def _strengths(self) -> E.Strengths:
        path = self.ridge_path
        return replace(self._chosen(), ridge=path[min(int(self.path_stage), len(path) - 1)])

    def _map_step(self, batch: dict[str, Tensor]) -> Tensor:
        if self.trainer.num_training_batches != 1:
            raise LoreDataError(
                "the MAP estimator trains full-batch (L-BFGS): set the data module's batch_size to null"
            )
        features, users, counts = batch["features"], batch["users"], batch.get("counts")
        optimizer = self.optimizers()
        # each epoch is a stage with its own objective: L-BFGS's curvature pairs from the last one
        # would mislead it (a stale gradient difference), so every stage starts afresh
        optimizer.optimizer.state.clear()
        strengths = self._strengths()
        state = E.MapState(self.model.basis, self.model.user_logits, self.model.prior_mean)
        parameters = list(self._map_parameters().values())
        outputs = {}

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss, nll, logits = E.map_loss(
                features,
                users,
                self.model.num_users,
                state,
                strengths,
                counts,
                self._loss_scale(counts),
                fused=self.hparams.cpu_kernel,
            )
            self._backward(loss, parameters)
            outputs.update(loss=loss.detach(), nll=nll.detach(), logits=logits)
            # the line search must see the one objective on every rank: the mean over ranks of the shares
            if self._reduces_gradients_itself():
                return self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
            return loss.detach()

        with threads_for(features.numel(), features.device):  # one policy for the small-op loops
            optimizer.step(closure=closure)
        self.iterations_done += 1
        if self.current_epoch + 1 >= self.trainer.max_epochs:
            self._finish()  # max_epochs ends the path: the final checkpoint must hold the final model
        self.metrics["train_acc"].update(outputs["logits"], users)
        self.log_dict(
            {"train/loss": outputs["loss"], "train/nll": outputs["nll"]},
            on_step=True,
            on_epoch=False,
            batch_size=users.numel(),
            sync_dist=True,
        )
        self.log("train/ridge", strengths.ridge, on_step=True, on_epoch=False, batch_size=users.numel())
        return outputs["nll"]

    def _after_validation(self, val_nll: float, pair_nll: Tensor | None = None) -> None:
        """The ridge path: a better stage is kept and the next, weaker ridge comes; a worse one ends the
        fit with the best stage restored (K = 1: the whole wide path is validated, the best kept). A stage
        past the path's edge is better only where clearly so (``E.clearly_lower`` on ``pair_nll``, the
        per-pair validation NLLs), as in ``E.ridge_path``."""
        if self._finished:  # max_epochs ended the path and the best stage is back: nothing to compare
            self.trainer.should_stop = True
            return
        stage, path = int(self.path_stage), self.ridge_path
        better = val_nll < float(self.best_val_nll)
        past_edge = stage >= len(path) - int(self.selection.get("path_extended", 0))
        if better and past_edge and pair_nll is not None and self._best_pair_nll is not None:
            better = E.clearly_lower(pair_nll, self._best_pair_nll)
        if better:
            self._best_pair_nll = pair_nll
        self.selection.setdefault("path", []).append({"ridge": path[min(stage, len(path) - 1)], "val_nll": val_nll})
        if better:
            self.best_val_nll.fill_(val_nll)
            for name, tensor in self._map_parameters().items():
                getattr(self, f"best_{name}").copy_(tensor.detach())
            self.selection["ridge"] = path[min(stage, len(path) - 1)]
        at_end = stage + 1 >= len(path)
        if better and at_end and self._extends_path(len(path)):
            self.selection["path_extended"] = int(self.selection.get("path_extended", 0)) + 1
            at_end = False
        if (not better and self.model.rank >= 2) or at_end:
            # the fit ends here: the checkpoint saved after this validation holds the final model
            self._finish()
            self.trainer.should_stop = True
            steps = ", ".join(f"{entry['ridge']:g}: {entry['val_nll']:.4f}" for entry in self.selection["path"])
            extended = self.selection.get("path_extended", 0)
            note = (f" (extended {extended} step(s) past its weak edge, where it kept improving; a stage there is kept "
                    "only where clearly better, by one paired standard error)") if extended else ""
            say(f"full-space ridge path (validation NLL){note}: {steps}; kept ridge "
                f"{self.selection.get('ridge', 0):g}")
        else:
            self.path_stage += 1

    def _extends_path(self, length: int) -> bool:
        """Whether the path goes on past its weakest ridge, which was its best stage so far: up to
        ``EDGE_STEPS`` more stages, while ``max_epochs`` leaves room for them."""
        extended = int(self.selection.get("path_extended", 0))
        max_epochs = self.trainer.max_epochs
        return (extended < E.EDGE_STEPS and length >= 3
                and (max_epochs is None or max_epochs < 0 or self.current_epoch + 1 < max_epochs))

    def _restore_best(self) -> None:
        if torch.isfinite(self.best_val_nll):
            with torch.no_grad():
                for name, tensor in self._map_parameters().items():
                    tensor.copy_(getattr(self, f"best_{name}"))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if "val_nll" not in self.metrics or not self.metrics["val_nll"].update_called:
            return
        metric = self.metrics["val_nll"]
        val_nll = float(metric.compute())
        metric.reset()
        pair_nll = torch.cat(self._val_pair_nll) if self._val_pair_nll else None
        self._val_pair_nll = []
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            if pair_nll is not None:
                pair_nll = self.all_gather(pair_nll).reshape(-1)  # every process's share, in one order
            self._after_validation(val_nll, pair_nll)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if "val_nll" in self.metrics:
            logits = self(batch["features"], batch["users"])
            pair_nll = F.softplus(-logits.detach().double())
            self.metrics["val_nll"].update(pair_nll)
            self._val_pair_nll.append(pair_nll)
        return super().validation_step(batch, batch_idx)

    def _posterior(self, datamodule) -> None:
        """The seen users' posterior covariance of their weights (Laplace), for the export."""
        if not (self.model.personalized and datamodule is not None and datamodule.has_split("seen_train")):
            return
        train = datamodule.split("seen_train")
        with torch.no_grad():
            projected = LF.project(train.features.to(self.model.basis.device), self.model.basis.detach())
            covariance = weight_covariance(
                projected,
                train.users.to(projected.device),
                self.model.user_logits.detach(),
                self.model.temperature,
                self.model.prior_precision,
            )
        self.model.weight_covariance = covariance.to(self.model.basis.dtype)

    def _finish(self) -> None:
        """The best stage, its users' posterior covariance, and the pruned columns (idempotent)."""
        if not self._finished:
            self._restore_best()
            self._posterior(getattr(self.trainer, "datamodule", None))
            self._finished = True
        self.prune_()

    def on_train_end(self) -> None:
        if self.hparams.estimator == "map" and self.hparams.rank != 0:
            self._finish()  # where max_epochs ended the path before it finished (it prunes)
        else:
            self.prune_()
        self._warn_if_not_personal()

    def _warn_if_not_personal(self) -> None:
        """Say so where the fit kept fewer columns than its K, or where its users' reward directions
        ``V w_u`` are all the same: a K>1 model that is, in fact, a smaller one."""
        model = self.model
        if not model.personalized:
            return
        kept, threshold = int(model.active_columns.sum()), self.hparams.prune_threshold
        how = "forced" if self.hparams.rank != "auto" else "chosen"
        if kept < model.rank:
            rank_zero_warn(
                f"rank K={model.rank} ({how}) kept {kept} column(s): no seen user weighs the other "
                f"{model.rank - kept} at prune_threshold={threshold:g} or more, so this is a K={kept} model"
                + (" (one shared direction, no personalization)" if kept == 1 else "")
                + "; the training data support no more columns (rank: auto chooses K on validation pairs)",
                category=LoreDataWarning,
            )
        elif kept > 1 and (spread := model.head_spread()) < SAME_HEADS:
            rank_zero_warn(
                f"rank K={model.rank} ({how}) kept {kept} columns, but every seen user's reward direction V w_u "
                f"is the same (they differ by {spread:.1e} of their norm): this is one shared "
                "direction, no personalization (rank: auto chooses K on validation pairs)",
                category=LoreDataWarning,
            )

    def configure_optimizers(self):
        if self.rank == 0:
            return None
        if self.hparams.estimator == "map":
            return E.lbfgs(list(self._map_parameters().values()), self.map_settings.stage_iterations)
        lr, decay = self.hparams.lr, self.hparams.basis_weight_decay
        basis_group = {"params": [self.model.basis], "weight_decay": decay}
        if self.rank == 1:
            return torch.optim.Adam([basis_group], lr=lr)
        if self.hparams.schedule == "joint":
            return torch.optim.Adam([basis_group, {"params": [self.model.user_logits]}], lr=lr)
        return [torch.optim.Adam([self.model.user_logits], lr=lr), torch.optim.Adam([basis_group], lr=lr)]
