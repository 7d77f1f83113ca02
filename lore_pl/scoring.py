"""Use a learned basis without Lightning: score responses for a user, rank candidates, add a user.

    model = PersonalRewardModel.load("lightning_logs/synthetic/version_0/basis.safetensors")
    rewards = model.score(embeddings, "seen-00001")          # [n] rewards e . V w_u
    best_first = model.rank(candidate_embeddings, "seen-00001")
    model.personalize("new-user", chosen_embeddings, rejected_embeddings)  # K numbers, milliseconds

Embeddings must come from the embedder the basis was trained on (``model.embedder``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lore_pl import functional as LF
from lore_pl.export import BasisFile, load_basis, save_basis


class PersonalRewardModel:
    """A basis V, tau, and named users' simplex weights; every user's reward is ``e . V w_u``."""

    def __init__(self, exported: BasisFile) -> None:
        self.basis = exported.basis.float()
        self.tau = float(exported.tau)
        self.reference_head = exported.reference_head
        self.embedder = exported.embedder
        weights = exported.user_weights
        if weights is None:
            weights = torch.empty(0, self.basis.shape[1])
        if len(exported.user_ids) != weights.shape[0]:
            raise ValueError(f"{len(exported.user_ids)} user ids but {weights.shape[0]} rows of user weights")
        self.user_ids: list[str] = list(exported.user_ids)
        self.user_weights = weights.float()
        self._row = {user: i for i, user in enumerate(self.user_ids)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PersonalRewardModel":
        return cls(load_basis(path))

    def save(self, path: str | os.PathLike) -> None:
        save_basis(path, BasisFile(self.basis, self.tau, self.reference_head, self.user_ids, self.user_weights,
                                   self.embedder))

    @property
    def basis_rank(self) -> int:
        """K, the number of basis columns."""
        return self.basis.shape[1]

    def weights(self, user: str) -> Tensor:
        if user not in self._row:
            raise KeyError(f"unknown user {user!r}: not among the {len(self.user_ids)} users of this model")
        return self.user_weights[self._row[user]]

    def head(self, user: str) -> Tensor:
        """The user's personal reward direction ``V w_u`` ``[d]``."""
        return self.basis @ self.weights(user)

    def _embeddings(self, embeddings: Tensor) -> Tensor:
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"embeddings have d={embeddings.shape[-1]}, the basis has d={self.basis.shape[0]}")
        return embeddings

    def score(self, embeddings: Tensor, user: str) -> Tensor:
        """Rewards ``e . V w_u`` of responses ``[n, d]`` (or one ``[d]``) for ``user``: ``[n]``."""
        return self._embeddings(embeddings) @ self.head(user)

    def rank(self, candidates: Tensor, user: str) -> Tensor:
        """Indices of ``candidates`` ``[n, d]`` from the user's best to worst (personalized best-of-n)."""
        return torch.argsort(self.score(candidates, user), descending=True, stable=True)

    def preference_probability(self, chosen: Tensor, rejected: Tensor, user: str) -> Tensor:
        """``P(user prefers chosen)`` = ``sigmoid((e_c - e_r) . V w_u / tau)``, per pair."""
        return torch.sigmoid((self.score(chosen, user) - self.score(rejected, user)) / self.tau)

    def personalize(self, user: str, chosen: Tensor, rejected: Tensor, *, steps: int = 500, lr: float = 0.1,
                    init: str = "population", prior_strength: float = 0.0, seed: int = 0) -> Tensor:
        """Fit a new (or refit an existing) user's weights from a few pairs; returns ``w`` ``[K]``.

        V stays frozen: the pairs are projected once and only K logits are fitted (phase 2).
        ``init='population'`` starts at the mean of the stored users' weights (``randn``: the reference).
        """
        differences = self._embeddings(chosen) - self._embeddings(rejected)
        prior = LF.population_logits(self.user_weights) if self.user_weights.shape[0] else None
        if init == "population" and prior is None:
            init = "zeros"  # no stored users to average: start from uniform weights
        generator = torch.Generator().manual_seed(seed)
        start = LF.initial_user_logits(1, self.basis_rank, init, generator, prior)
        users = torch.zeros(differences.shape[0], dtype=torch.long)
        logits = LF.fit_user_weights(LF.project(differences, self.basis), users, start, steps=steps, lr=lr,
                                  tau=self.tau, prior_logits=prior, prior_strength=prior_strength)
        weights = LF.simplex_weights(logits)[0]
        if user in self._row:
            self.user_weights[self._row[user]] = weights
        else:
            self._row[user] = len(self.user_ids)
            self.user_ids.append(user)
            self.user_weights = torch.cat([self.user_weights, weights[None]])
        return weights
