"""The LoRe model as one plain ``nn.Module``: what phase 1 trains, phase 2 extends and scoring uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lore_pl.core import functional as LF
from lore_pl.errors import LoreDataError


class LoreModel(nn.Module):
    """A basis ``V`` ``[d, K]``, per-user logits ``W`` ``[C, K]``, a pruning mask and ``tau``.

    User u's reward of a response with embedding e is ``e . V w_u``, ``w_u = softmax(W[u])`` over
    the columns that survived pruning; the Bradley-Terry logit of a pair is ``x . V w_u / tau``.
    Without logits (K = 1, or the K = 0 reference model, whose one column is ``V_ref``) every
    user's weight is [1].

    Args:
        basis: V ``[d, K]``.
        user_logits: W ``[C, K]`` (``None``: every user weighs the columns [1]; needs K = 1).
        tau: the temperature dividing every logit.
        reference_head: ``V_ref`` ``[d]``, the reward model's own head, where there is one.
        num_users: C when there are no logits.
        user_ids: the users' names, row by row (kept with the weights for export and scoring).
        embedder: identity of the embedder whose features the model was trained on ("" unknown).
        embedder_weights: digest of that embedder's model weights (``weights_digest``; "" unknown).
        prior_mean: ``mu`` ``[K]``, the population's mean logits: new users start there and are pulled
            towards it (learned with W when ``train_logits``).
        prior_precision: the diagonal precision ``[K]`` of that Gaussian prior on a user's logits.
        weight_covariance: each user's posterior covariance of their weights ``[C, K, K]`` (Laplace).
        train_basis: V is a parameter (phase 1) or a frozen buffer (phase 2, scoring).
        train_logits: W (and ``mu``) are parameters, or buffers (scoring).
    """

    def __init__(
        self,
        basis: Tensor,
        user_logits: Tensor | None = None,
        *,
        tau: float = 100.0,
        reference_head: Tensor | None = None,
        num_users: int | None = None,
        user_ids: Sequence[str] = (),
        embedder: str = "",
        embedder_weights: str = "",
        prior_mean: Tensor | None = None,
        prior_precision: Tensor | None = None,
        weight_covariance: Tensor | None = None,
        train_basis: bool = True,
        train_logits: bool = True,
    ) -> None:
        super().__init__()
        if basis.ndim != 2 or basis.shape[1] < 1:
            raise LoreDataError(f"a basis must be [d, K] with K >= 1, got shape {tuple(basis.shape)}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        dim, rank = basis.shape
        if user_logits is not None and user_logits.shape[1] != rank:
            raise LoreDataError(f"user logits {tuple(user_logits.shape)} do not match a basis of K={rank} columns")
        if user_logits is None and rank != 1:
            raise LoreDataError(f"a basis of K={rank} columns needs per-user logits")
        if reference_head is not None and reference_head.shape != (dim,):
            raise LoreDataError(f"V_ref has shape {tuple(reference_head.shape)}, the basis has d={dim}")
        for name, tensor, shape in (("prior mean", prior_mean, (rank,)), ("prior precision", prior_precision, (rank,)),
                                    ("weight covariance", weight_covariance, (None, rank, rank))):
            if tensor is not None and (tensor.ndim != len(shape)
                                       or any(a is not None and a != b for a, b in zip(shape, tensor.shape))):
                raise LoreDataError(f"the {name} has shape {tuple(tensor.shape)}, expected {shape} for K={rank}")
        for name, tensor in (("basis", basis), ("user logits", user_logits), ("V_ref", reference_head),
                             ("prior mean", prior_mean), ("prior precision", prior_precision),
                             ("weight covariance", weight_covariance)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise LoreDataError(f"the {name} holds NaN or Inf")
        if not basis.is_floating_point():
            raise LoreDataError(f"a basis must be floating point, got {basis.dtype}")
        basis = basis.detach().clone()
        if train_basis:
            self.basis = nn.Parameter(basis)
        else:
            self.register_buffer("basis", basis)
        if user_logits is None:
            self.user_logits = None
            self.num_users = int(num_users or 0)
        else:
            logits = user_logits.detach().clone().to(basis.dtype)
            if train_logits:
                self.user_logits = nn.Parameter(logits)
            else:
                self.register_buffer("user_logits", logits)
            self.num_users = logits.shape[0]
        if user_ids and len(user_ids) != self.num_users:
            raise LoreDataError(f"{len(user_ids)} user ids for {self.num_users} users")
        self.user_ids = list(user_ids)
        self.embedder = embedder
        self.embedder_weights = embedder_weights
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float64))
        self.register_buffer(
            "reference_head", None if reference_head is None else reference_head.detach().clone().to(basis.dtype)
        )
        self.register_buffer("active_columns", torch.ones(rank, dtype=torch.bool))
        if prior_mean is not None and train_logits and user_logits is not None:
            self.prior_mean = nn.Parameter(prior_mean.detach().clone().to(basis.dtype))
        else:
            self.register_buffer(
                "prior_mean", None if prior_mean is None else prior_mean.detach().clone().to(basis.dtype)
            )
        self.register_buffer(
            "prior_precision", None if prior_precision is None else prior_precision.detach().clone().to(basis.dtype)
        )
        self.register_buffer(
            "weight_covariance",
            None if weight_covariance is None else weight_covariance.detach().clone().to(basis.dtype),
        )

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def initial(
        cls,
        dim: int,
        rank: int,
        num_users: int,
        *,
        tau: float = 100.0,
        reference_head: Tensor | None = None,
        weight_init: str = "randn",
        generator: torch.Generator | None = None,
        user_ids: Sequence[str] = (),
        embedder: str = "",
        embedder_weights: str = "",
    ) -> LoreModel:
        """A model to train: ``V ~ randn(d, K)`` and ``W`` by ``weight_init`` (the reference's starts).

        ``rank`` 0 is the reference model: its one column is ``reference_head``, frozen.
        """
        if rank < 0:
            raise LoreDataError(f"rank must be >= 0, got {rank}")
        if rank > dim:
            raise LoreDataError(f"rank K={rank} exceeds the feature dimension d={dim}: V is [d, K] with K <= d")
        if rank == 0:
            if reference_head is None:
                raise LoreDataError(
                    "rank K=0 (the reference model) needs a reference head V_ref, and the data module provides none"
                )
            return cls(
                reference_head[:, None],
                tau=tau,
                reference_head=reference_head,
                num_users=num_users,
                user_ids=user_ids,
                embedder=embedder,
                embedder_weights=embedder_weights,
                train_basis=False,
            )
        basis = torch.randn(dim, rank, generator=generator)
        logits = LF.initial_user_logits(num_users, rank, weight_init, generator) if rank >= 2 else None
        return cls(
            basis,
            logits,
            tau=tau,
            reference_head=reference_head,
            num_users=num_users,
            user_ids=user_ids,
            embedder=embedder,
            embedder_weights=embedder_weights,
        )

    @classmethod
    def from_state_dict(cls, state: dict, *, train_basis: bool = True, train_logits: bool = True) -> LoreModel:
        """The model a ``state_dict()`` came from (shapes, users and all)."""
        extra = state.get("_extra_state", {})
        model = cls(
            state["basis"],
            state.get("user_logits"),
            tau=float(state["tau"]),
            reference_head=state.get("reference_head"),
            num_users=extra.get("num_users"),
            user_ids=extra.get("user_ids", ()),
            embedder=extra.get("embedder", ""),
            embedder_weights=extra.get("embedder_weights", ""),
            prior_mean=state.get("prior_mean"),
            prior_precision=state.get("prior_precision"),
            weight_covariance=state.get("weight_covariance"),
            train_basis=train_basis,
            train_logits=train_logits,
        )
        model.load_state_dict(state)
        return model

    def get_extra_state(self) -> dict:
        # plain values only: a checkpoint loads with torch.load(weights_only=True)
        return {"num_users": self.num_users, "user_ids": list(self.user_ids), "embedder": self.embedder,
                "embedder_weights": self.embedder_weights}

    def set_extra_state(self, state: dict) -> None:
        self.num_users = int(state.get("num_users", self.num_users))
        self.user_ids = list(state.get("user_ids", self.user_ids))
        self.embedder = str(state.get("embedder", self.embedder))
        self.embedder_weights = str(state.get("embedder_weights", self.embedder_weights))

    # ------------------------------------------------------------------------------------ shape
    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        """K, the number of basis columns (pruned ones included)."""
        return self.basis.shape[1]

    @property
    def personalized(self) -> bool:
        """Whether users have weights of their own (K >= 2)."""
        return self.user_logits is not None

    @property
    def temperature(self) -> float:
        return float(self.tau)

    # ------------------------------------------------------------------------------------ model
    def user_weights(self) -> Tensor:
        """Every user's simplex weights ``[C, K]`` (0 on pruned columns; [1] without logits)."""
        if self.user_logits is None:
            return self.basis.new_ones(self.num_users, self.rank)
        return LF.simplex_weights(self.user_logits, self.active_columns)

    def forward(self, features: Tensor, users: Tensor) -> Tensor:
        """Bradley-Terry logits ``x_i . V w_{u_i} / tau`` of the pairs ``features`` ``[N, d]``."""
        return LF.pair_logits(features, users, self.basis, self.user_weights(), self.temperature)

    def heads(self) -> Tensor:
        """Every user's reward direction ``V w_u`` as the columns of ``[d, C]``."""
        return self.basis @ self.user_weights().t()

    @torch.no_grad()
    def head_spread(self) -> float:
        """How much the users' reward directions differ: the largest ``|V w_u - V w_mean|`` over users,
        relative to ``|V w_mean|`` (0: every user has the population's direction)."""
        if not self.personalized or self.num_users == 0:
            return 0.0
        weights = self.user_weights().detach()
        heads = self.basis.detach() @ weights.t()
        mean = self.basis.detach() @ weights.mean(0)
        return float((heads - mean[:, None]).norm(dim=0).max() / mean.norm().clamp(min=1e-12))

    def population_logits(self) -> Tensor | None:
        """``mu``: the learned prior mean where there is one, else the log of the users' mean weights."""
        if self.rank <= 1:
            return None
        if self.prior_mean is not None:
            return self.prior_mean.detach()
        if self.num_users == 0:
            return None
        return LF.population_logits(self.user_weights().detach())

    def kept(self) -> tuple[Tensor, Tensor]:
        """The basis and the users' weights restricted to the columns that survived pruning (detached)."""
        keep = self.active_columns
        return self.basis[:, keep].detach(), self.user_weights()[:, keep].detach()

    @torch.no_grad()
    def prune_(self, threshold: float) -> int:
        """Drop the columns no user weighs at ``threshold`` or more. Idempotent; returns the K kept."""
        if self.personalized and threshold > 0:
            self.active_columns &= LF.prune_mask(self.user_weights(), threshold)
        return int(self.active_columns.sum())

    def extra_repr(self) -> str:
        return f"d={self.dim}, K={self.rank}, users={self.num_users}, tau={self.temperature:g}"
