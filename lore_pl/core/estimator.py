"""Phase 1 for the data-starved regime: the MAP estimator with a spectral start and held-out selection.

The model is LoRe's, ``w_u = softmax(L_u)`` and logit ``x . V w_u`` (tau = 1: the scale lives in V).
The objective is the MAP one, the *summed* NLL of every pair plus Gaussian priors, so the priors fade
as a user (or the population) brings more pairs::

    sum_i softplus(-x_i . V w_{u_i}) + ridge(V) + 1/2 sum_u (L_u - mu)^T diag(precision) (L_u - mu)

``ridge(V)`` is ``lambda/2 ||V||^2``, or with a deviation ratio r != 1 the shared direction and the
personal deviations apart: ``lambda K/2 ||mean column||^2 + lambda r/2 ||V - mean column||^2``;
``mu``, the population's mean logits, is learned with the rest (empirical Bayes).

The recipe (measured on planted data in ``benchmarks/quality.py``):

1. a subspace ``U`` ``[d, r]``: the top singular vectors of the users' mean pair vectors, each
   weighed by the square root of its user's pair count (equal noise for every user: users with a
   handful of pairs would fill the subspace with their noise), whitened by the features' Ledoit-Wolf
   second moment (a pooled least-squares estimate of each user's direction; on a decaying spectrum
   it recovers the reward directions far better than the raw means), by randomized SVD over the
   features in float32 blocks (``[C, k]`` and ``[d, k]`` sketches; ``Whitening`` for large d);
2. model selection in the projected features ``X U`` (cheap): every candidate K at a few basis ridges;
   the smallest K whose validation NLL is within one standard error of the best K's (paired over the
   validation pairs: parsimony where the data cannot tell); then a grid of strengths for that K, each
   fitted by L-BFGS; the lowest validation NLL wins. A grid whose best value lies on its edge (the
   ranks, each K's start ridges) is extended past it, and the report says so;
3. the full-space fit from ``V = U A``: a ridge path from strong to weak, one L-BFGS stage each, until
   the validation NLL gets worse, past the path's end while its weakest ridge is the best
   (``BasisModule`` runs these stages as its epochs). For K = 1 the
   path is the wide ``shared_path`` from 0, every stage validated: the subspace's ridge does not carry
   over to the full space for a single direction, and a strong ridge plateaus.

Everything here is tensors in, tensors out: the validation pairs are given by the caller, who must
keep them prompt-disjoint from training and test pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lore_pl.core import functional as LF
from lore_pl.core.projected_fit import UserPairs, map_objective, minimize_lbfgs
from lore_pl.core.threads import threads_for


@dataclass(frozen=True)
class MapSettings:
    """The MAP estimator of phase 1 (``BasisModule(estimator="map")``, the default).

    Args:
        ranks: the K that ``rank: auto`` chooses from (1 is one shared direction: no personalization).
        subspace: r, the dimension of the spectral subspace the selection runs in.
        whiten: whiten the users' mean vectors by the features' second moment before the SVD.
        start_ridges: the basis ridges at which every candidate K is fitted (its best one represents it).
        start_prior: the prior precision on the users' logits at which every K is compared.
        ridges: basis ridges tried for the chosen K, as multiples of its best start ridge.
        deviation_ratios: ratios of the deviations' ridge to the shared direction's tried for the chosen K.
        priors: prior precisions on the users' logits tried for the chosen K.
        projected_iterations: L-BFGS iterations of each fit in the subspace.
        path: the full-space ridge path for K >= 2, strong to weak, as multiples of the ridge chosen in
            the subspace.
        shared_path: the full-space ridges for K = 1 (a plain Bradley-Terry direction), strong to weak.
        stage_iterations: L-BFGS iterations of each full-space stage.
        seed: seed of the random starts in the subspace (and of the users drawn for selection).
        selection_users: with more seen users than this, the search runs on this many drawn at random and
            its choice is refitted on every user (``select_model``); None: always on every user.
    """

    ranks: tuple[int, ...] = (1, 2, 3, 5, 8)
    subspace: int = 16
    whiten: bool = True
    start_ridges: tuple[float, ...] = (100.0, 10.0, 1.0)
    start_prior: float = 1.0
    ridges: tuple[float, ...] = (1.0, 0.1)
    deviation_ratios: tuple[float, ...] = (1.0, 10.0)
    priors: tuple[float, ...] = (0.1, 1.0, 10.0)
    projected_iterations: int = 200
    path: tuple[float, ...] = (10.0, 3.0, 1.0, 0.3, 0.1)
    shared_path: tuple[float, ...] = (1e5, 3e4, 1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0)
    stage_iterations: int = 40
    seed: int = 0
    selection_users: int | None = 2000

    def __post_init__(self) -> None:
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks must be positive, got {self.ranks}")
        if self.subspace < max(self.ranks):
            raise ValueError(f"subspace must be >= the largest rank {max(self.ranks)}, got {self.subspace}")
        for name in ("start_ridges", "ridges", "deviation_ratios", "priors", "path", "shared_path"):
            values = getattr(self, name)
            if not values or min(values) <= 0:
                raise ValueError(f"{name} must be positive numbers, got {values}")
        if self.start_prior < 0:
            raise ValueError("start_prior must be >= 0")
        if self.projected_iterations < 1 or self.stage_iterations < 1:
            raise ValueError("projected_iterations and stage_iterations must be >= 1")
        if self.selection_users is not None and self.selection_users < 2:
            raise ValueError(f"selection_users must be >= 2 or None, got {self.selection_users}")


@dataclass(frozen=True)
class Strengths:
    """The priors of one MAP fit: the basis ridge, the deviation ratio and the logits' precision."""

    ridge: float
    deviation_ratio: float = 1.0
    prior: float = 1.0

    def describe(self) -> str:
        extra = f", deviations x{self.deviation_ratio:g}" if self.deviation_ratio != 1.0 else ""
        return f"ridge {self.ridge:g}{extra}, prior {self.prior:g}"


@dataclass
class MapState:
    """The parameters of one MAP fit: basis ``[p, K]``, logits ``[C, K]`` (None for K=1), mean ``[K]``."""

    basis: Tensor
    logits: Tensor | None
    mean: Tensor | None

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def weights(self, num_users: int) -> Tensor:
        if self.logits is None:
            return self.basis.new_ones(num_users, 1)
        return torch.softmax(self.logits, dim=-1)

    def detached(self) -> MapState:
        return MapState(*(None if t is None else t.detach().clone() for t in (self.basis, self.logits, self.mean)))


@dataclass
class Candidate:
    """One point of the held-out curve: a (K, strengths) fit and its validation scores."""

    rank: int
    strengths: Strengths
    val_nll: float
    val_acc: float
    state: MapState = field(repr=False)
    pair_nll: Tensor | None = field(default=None, repr=False)  # [validation pairs], for paired comparisons

    def describe(self) -> str:
        return (f"K={self.rank}, {self.strengths.describe() if self.rank > 1 else f'ridge {self.strengths.ridge:g}'}: "
                f"val NLL {self.val_nll:.4f}, val acc {self.val_acc:.4f}")


# ------------------------------------------------------------------------------------ objective
def ridge_penalty(basis: Tensor, strengths: Strengths) -> Tensor:
    """``ridge(V)``: one penalty on V, or the shared direction and the deviations apart."""
    if strengths.deviation_ratio == 1.0 or basis.shape[1] == 1:
        return 0.5 * strengths.ridge * basis.pow(2).sum()
    shared = basis.mean(dim=1, keepdim=True)
    return 0.5 * strengths.ridge * (basis.shape[1] * shared.pow(2).sum()
                                    + strengths.deviation_ratio * (basis - shared).pow(2).sum())


def prior_penalty(logits: Tensor, mean: Tensor, precision: float | Tensor) -> Tensor:
    """``1/2 sum_u (L_u - mu)^T diag(precision) (L_u - mu)``."""
    return 0.5 * ((logits - mean).pow(2) * precision).sum()


def map_loss(features: Tensor, users: Tensor, num_users: int, state: MapState, strengths: Strengths,
             counts: Tensor | None = None, scale: float = 1.0, fused: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(the MAP objective divided by the pair count N, its mean NLL part, the pair logits).

    Dividing by N keeps the numbers of one scale whatever the data's size; the minimizer is the MAP
    one. Under data parallelism ``counts``/``scale`` make each rank's NLL its share times the world
    size (``pair_loss``), and every rank adds the priors of its full copy of the parameters: the mean
    over ranks, which DDP takes of the gradients, is the one-process objective.
    """
    weights = state.weights(num_users)
    nll, logits = LF.pair_loss(features, users, state.basis, weights, 1.0, "pair_mean", counts, scale,
                               fused=fused and features.dtype != torch.float64)
    total_pairs = float(counts.sum()) if counts is not None else float(users.numel())
    penalty = ridge_penalty(state.basis, strengths)
    if state.logits is not None:
        penalty = penalty + prior_penalty(state.logits, state.mean, strengths.prior)
    return nll + penalty / max(total_pairs, 1.0), nll, logits


def lbfgs(parameters: list[Tensor], iterations: int) -> torch.optim.LBFGS:
    """Full-batch L-BFGS with a strong Wolfe line search (the MAP fits are smooth and deterministic)."""
    return torch.optim.LBFGS(parameters, lr=1.0, max_iter=iterations, history_size=20,
                             line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)


def fit_map(features: Tensor, users: Tensor, num_users: int, state: MapState, strengths: Strengths,
            iterations: int, fixed_basis: bool = False) -> MapState:
    """Minimize the MAP objective from ``state`` by L-BFGS; returns the new state (``state`` untouched).

    ``fixed_basis``: V stays as it is and only the users' logits and their mean are fitted.
    """
    state = state.detached()
    free = (state.logits, state.mean) if fixed_basis else (state.basis, state.logits, state.mean)
    parameters = [t.requires_grad_() for t in free if t is not None]
    optimizer = lbfgs(parameters, iterations)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss, _, _ = map_loss(features, users, num_users, state, strengths)
        loss.backward()
        return loss.detach()  # L-BFGS reads a number

    with threads_for(features.numel(), features.device):
        optimizer.step(closure)
    return state.detached()


def fit_projected(pairs: UserPairs, state: MapState, strengths: Strengths, iterations: int) -> MapState:
    """``fit_map`` in the spectral subspace, on pairs laid out per user, with the gradient by hand
    (``projected_fit.map_objective``): the same L-BFGS (``projected_fit.minimize_lbfgs``) on the same
    objective, without autograd, on one flat vector (basis, logits, mean, as ``fit_map`` orders them)."""
    parts = [t.detach().reshape(-1) for t in (state.basis, state.logits, state.mean) if t is not None]
    sizes = [t.numel() for t in parts]

    def unpack(vector: Tensor) -> MapState:
        pieces = vector.split(sizes)
        basis = pieces[0].view(state.basis.shape)
        if state.logits is None:
            return MapState(basis, None, None)
        return MapState(basis, pieces[1].view(state.logits.shape), pieces[2].view(state.mean.shape))

    def objective(vector: Tensor) -> tuple[float, Tensor]:
        current = unpack(vector)
        loss, *grads = map_objective(pairs, current.basis, current.logits, current.mean, strengths.ridge,
                                     strengths.deviation_ratio, strengths.prior)
        return float(loss), torch.cat([g.reshape(-1) for g in grads if g is not None])

    return unpack(minimize_lbfgs(objective, torch.cat(parts), iterations)).detached()


def evaluate(features: Tensor, users: Tensor, num_users: int, state: MapState) -> tuple[float, float]:
    """(mean NLL over the pairs, mean over users of per-user accuracy) of ``state`` on held-out pairs."""
    nll, accuracy, _ = _scores(features, users, num_users, state)
    return nll, accuracy


def _scores(features: Tensor, users: Tensor, num_users: int, state: MapState) -> tuple[float, float, Tensor]:
    with torch.no_grad():
        logits = (LF.project(features, state.basis) * state.weights(num_users)[users]).sum(-1)
        pair_nll = F.softplus(-logits.double())
        correct = torch.bincount(users[logits > 0], minlength=num_users).double()
        total = torch.bincount(users, minlength=num_users).double()
        present = total > 0
        return float(pair_nll.mean()), float((correct[present] / total[present]).mean()), pair_nll


def parsimonious(candidates: list[Candidate]) -> Candidate:
    """The candidate of lowest validation NLL, or the one of smallest K among the rest whose NLL is
    within one standard error of it (the error of the mean paired difference over validation pairs;
    differences below ``TIE`` are ties): a larger K must earn its place."""
    best = min(candidates, key=lambda c: c.val_nll)
    for candidate in sorted(candidates, key=lambda c: (c.rank, c.val_nll)):
        if candidate.rank >= best.rank:
            break
        if not clearly_better(best, candidate):
            return candidate
    return best


def clearly_better(candidate: Candidate, than: Candidate) -> bool:
    """Whether ``candidate``'s validation NLL is below ``than``'s by more than one standard error of
    their mean paired difference over the validation pairs (and more than ``TIE``)."""
    return clearly_lower(candidate.pair_nll, than.pair_nll)


def clearly_lower(pair_nll: Tensor, than: Tensor) -> bool:
    """Whether the per-pair validation NLLs ``pair_nll`` are below ``than`` (the same pairs) by more than one
    standard error of their mean paired difference (and more than ``TIE``)."""
    difference = than - pair_nll
    error = float(difference.std()) / difference.numel() ** 0.5 if difference.numel() > 1 else float("inf")
    return float(difference.mean()) > max(error, TIE)


#: validation NLLs closer than this (nats per pair) are the same: float rounding, not evidence
TIE = 1e-6


# ------------------------------------------------------------------------------------ the start
#: elements of the features read at once by the start (float32 products, accumulated in float64):
#: 16 MiB blocks, whatever d
BLOCK_ELEMENTS = 2**22
#: above this dimension the Ledoit-Wolf moment is not formed (``d x d``): its top ``WHITENING_RANK``
#: eigenpairs are sketched and the rest of its spectrum is taken as flat
DENSE_WHITENING_LIMIT = 2048
WHITENING_RANK = 128
#: the randomized SVD's extra columns beyond the rank and its power iterations: the users' means have a
#: slowly decaying spectrum (on d1024_aniso_m30, 16 and 4 lost the exact SVD's 4th and 5th true
#: directions, cosines 0.39/0.37 against 0.46/0.45, and 0.017 of test accuracy; 48 and 8 keep them)
OVERSAMPLE = 48
POWER_ITERATIONS = 8
#: up to this many users x features the users' means are formed (float64, 64 MiB at most) and their SVD
#: is exact: the randomized one's small differences moved d1024_aniso_m30 by 0.010 (through the few-shot
#: prior's choice); beyond it, nothing [C, d] is formed
EXACT_SVD_LIMIT = 2**23


def _blocks(features: Tensor):
    """(first row, float32 block) over the features' rows, ``BLOCK_ELEMENTS`` at a time."""
    rows = max(1, BLOCK_ELEMENTS // max(features.shape[1], 1))
    for start in range(0, features.shape[0], rows):
        yield start, features[start:start + rows].float()


def _squared_norms(block: Tensor) -> Tensor:
    return (block * block).sum(1, dtype=torch.float64)


def ledoit_wolf(features: Tensor) -> Tensor:
    """The features' second moment ``X^T X / N`` shrunk towards a scaled identity (Ledoit-Wolf), float64."""
    num, dim = features.shape
    moment = torch.zeros(dim, dim, dtype=torch.float64)
    squares = torch.zeros(num, dtype=torch.float64)
    for start, block in _blocks(features):
        moment += (block.t() @ block).double()
        squares[start:start + block.shape[0]] = _squared_norms(block)
    moment /= num
    target = torch.trace(moment) / dim
    spread = (moment - target * torch.eye(dim, dtype=torch.float64)).pow(2).sum() / dim
    noise = ((squares.pow(2).sum() / num - moment.pow(2).sum()) / num / dim).clamp(max=float(spread))
    shrink = float(noise / spread) if spread > 0 else 1.0
    moment.mul_(1 - shrink).diagonal().add_(shrink * target)
    return moment


def _moment_times(features: Tensor, vectors: Tensor) -> Tensor:
    """``X^T X v / N`` for ``v`` ``[d, k]``, one pass over the features in blocks, float64 ``[d, k]``."""
    out = torch.zeros_like(vectors, dtype=torch.float64)
    right = vectors.float()
    for _, block in _blocks(features):
        out += (block.t() @ (block @ right)).double()
    return out / features.shape[0]


class Whitening:
    """``Sigma^{-1/2}`` of the features' Ledoit-Wolf second moment as an operator on ``[d, k]`` blocks:
    ``left`` is ``W^T`` and ``right`` is ``W`` of a ``W`` with ``W W^T = Sigma^{-1}`` (``G W`` whitens the
    users' means; ``W R`` maps directions back). Dense (a Cholesky factor) up to ``DENSE_WHITENING_LIMIT``,
    beyond it low-rank plus flat: the top ``WHITENING_RANK`` eigenpairs sketched, the rest of the
    spectrum at its mean, shrunk as Ledoit-Wolf shrinks (``O(d k)`` memory, ``O(N d k)`` time)."""

    def __init__(self, features: Tensor, generator: torch.Generator) -> None:
        dim = features.shape[1]
        self.cholesky = self.vectors = None
        if dim <= DENSE_WHITENING_LIMIT:
            self.cholesky = torch.linalg.cholesky(ledoit_wolf(features))
            return
        self.vectors, values, shrink, mean, tail = _sketched_ledoit_wolf(features, WHITENING_RANK, generator)
        self.inverse_roots = ((1 - shrink) * values + shrink * mean).rsqrt()
        self.tail_inverse_root = ((1 - shrink) * tail + shrink * mean) ** -0.5

    def right(self, vectors: Tensor) -> Tensor:
        if self.cholesky is not None:
            return torch.linalg.solve_triangular(self.cholesky.t(), vectors, upper=True)
        inside = self.vectors.t() @ vectors
        return self.vectors @ (inside * self.inverse_roots[:, None]) + self.tail_inverse_root * (
            vectors - self.vectors @ inside)

    def left(self, vectors: Tensor) -> Tensor:
        if self.cholesky is not None:
            return torch.linalg.solve_triangular(self.cholesky, vectors, upper=False)
        return self.right(vectors)  # symmetric


def _sketched_ledoit_wolf(features: Tensor, rank: int, generator: torch.Generator):
    """(eigenvectors ``[d, k]``, eigenvalues ``[k]``, shrinkage, target, the mean of the other eigenvalues)
    of the features' second moment, by randomized subspace iteration; the Frobenius norm that the
    shrinkage needs is the sketched eigenvalues' plus a Hutchinson estimate of the rest."""
    num, dim = features.shape
    rank = min(rank, dim)
    basis = torch.randn(dim, rank + OVERSAMPLE, generator=generator, dtype=torch.float64)
    for _ in range(2):
        basis, _ = torch.linalg.qr(_moment_times(features, basis))
    small = basis.t() @ _moment_times(features, basis)
    values, rotation = torch.linalg.eigh((small + small.t()) / 2)
    values, vectors = values.flip(0)[:rank].clamp(min=0), (basis @ rotation).flip(1)[:, :rank]
    probes = torch.randint(0, 2, (dim, 16), generator=generator).double() * 2 - 1
    probes -= vectors @ (vectors.t() @ probes)
    rest = _moment_times(features, probes)
    rest -= vectors @ (vectors.t() @ rest)
    frobenius = values.pow(2).sum() + rest.pow(2).sum() / probes.shape[1]
    trace = fourth = 0.0
    for _, block in _blocks(features):
        squares = _squared_norms(block)
        trace, fourth = trace + float(squares.sum()), fourth + float(squares.pow(2).sum())
    trace, mean = trace / num, trace / num / dim
    spread = float(frobenius) / dim - mean ** 2
    noise = min((fourth / num - float(frobenius)) / num / dim, spread)
    shrink = noise / spread if spread > 0 else 1.0
    tail = max(trace - float(values.sum()), 0.0) / max(dim - rank, 1)
    return vectors, values, shrink, mean, tail


def _users_times(features: Tensor, users: Tensor, scale: Tensor, vectors: Tensor) -> Tensor:
    """``G v`` for the users' scaled sums ``G = diag(scale) S X`` (``S`` sums each user's pairs), ``[C, k]``."""
    out = torch.zeros(scale.shape[0], vectors.shape[1], dtype=torch.float64)
    right = vectors.float()
    for start, block in _blocks(features):
        out.index_add_(0, users[start:start + block.shape[0]], (block @ right).double())
    return out * scale[:, None]


def _users_transpose_times(features: Tensor, users: Tensor, scale: Tensor, vectors: Tensor) -> Tensor:
    """``G^T q`` for ``q`` ``[C, k]``: ``[d, k]``, without forming ``G``."""
    out = torch.zeros(features.shape[1], vectors.shape[1], dtype=torch.float64)
    left = (vectors * scale[:, None]).float()
    for start, block in _blocks(features):
        out += (block.t() @ left[users[start:start + block.shape[0]]]).double()
    return out


def spectral_subspace(features: Tensor, users: Tensor, num_users: int, rank: int, whiten: bool = True) -> Tensor:
    """An orthonormal ``[d, r]`` basis of the span of the users' reward directions, estimated from the
    users' mean pair vectors ``g_u``, each weighed by ``sqrt(n_u)``: the top ``r`` right singular vectors
    of ``G Sigma^{-1/2}`` mapped back by ``Sigma^{-1/2}`` (``whiten``), or of ``G`` itself.

    The weight: a mean of n_u pairs carries noise of variance ``1/n_u``, so unweighted, users with a
    handful of pairs fill the top singular vectors with their noise (half the users at 5 pairs, half at
    100: principal cosines to the true directions 0.07-0.23). ``sqrt(n_u) g_u`` has the same noise for
    every user and weighs each by their evidence (0.81-0.91 there); on equal counts nothing changes.

    Past ``EXACT_SVD_LIMIT`` users x features, by randomized SVD (``OVERSAMPLE``, ``POWER_ITERATIONS``),
    ``G`` never formed: every step is one pass
    over the features in float32 blocks, and what it keeps is ``[C, k]`` and ``[d, k]`` (``k = r +
    OVERSAMPLE``) besides the whitening (``Whitening``); time ``O(N d k)``, linear in the pairs."""
    dim = features.shape[1]
    rank = min(rank, dim, num_users)
    generator = torch.Generator().manual_seed(0)  # the randomized SVD's probes: the same start every run
    scale = torch.bincount(users, minlength=num_users).clamp(min=1).double().rsqrt()  # sqrt(n) g = sums / sqrt(n)
    whitening = Whitening(features, generator) if whiten else None
    right = whitening.right if whiten else (lambda v: v)
    left = whitening.left if whiten else (lambda v: v)
    if num_users * dim <= EXACT_SVD_LIMIT:
        sums = torch.zeros(num_users, dim, dtype=torch.float64)
        for start, block in _blocks(features):
            sums.index_add_(0, users[start:start + block.shape[0]], block.double())
        _, _, vectors = torch.linalg.svd(left((sums * scale[:, None]).t()).t(), full_matrices=False)  # G W
        subspace, _ = torch.linalg.qr(right(vectors[:rank].t().contiguous()))
        return subspace.float().contiguous()
    width = min(rank + OVERSAMPLE, dim, num_users)
    sketch = torch.randn(dim, width, generator=generator, dtype=torch.float64)
    for step in range(POWER_ITERATIONS + 1):
        users_side, _ = torch.linalg.qr(_users_times(features, users, scale, right(sketch)))
        sketch = left(_users_transpose_times(features, users, scale, users_side))  # (G W)^T Q, [d, k]
        if step < POWER_ITERATIONS:
            sketch, _ = torch.linalg.qr(sketch)
    directions, _, _ = torch.linalg.svd(sketch, full_matrices=False)  # the top right singular vectors of G W
    subspace, _ = torch.linalg.qr(right(directions[:, :rank].contiguous()))
    return subspace.float().contiguous()


def random_state(dim: int, rank: int, num_users: int, generator: torch.Generator, dtype=torch.float64) -> MapState:
    basis = torch.randn(dim, rank, generator=generator, dtype=dtype)
    if rank == 1:
        return MapState(basis, None, None)
    logits = torch.randn(num_users, rank, generator=generator, dtype=dtype)
    return MapState(basis, logits, torch.zeros(rank, dtype=dtype))


#: how many steps past its edge a grid is extended, at most, while its best value stays on the edge
EDGE_STEPS = 2


def past_edge(grid: tuple[float, ...] | list[float], best: float) -> float | None:
    """The next value past ``grid``'s edge, one of its own outermost steps further, where ``best`` lies
    on that edge; else None: ``best`` is inside, or the grid has fewer than 3 values (two values are
    both edges, and the choice between them says nothing of what lies beyond)."""
    values = sorted(set(grid))
    if len(values) < 3:
        return None
    if best >= values[-1]:
        return values[-1] * values[-1] / values[-2]
    if best <= values[0]:
        return values[0] * values[0] / values[1]
    return None


def next_rank(ranks: tuple[int, ...] | list[int], best: int, limit: int) -> int | None:
    """The K tried next where the best K is the largest one tried: about 1.5 times it, at most ``limit``."""
    if best < max(ranks) or best >= limit:
        return None
    return min(limit, max(best + 1, round(best * 1.5)))


@dataclass
class Selection:
    """What ``select_model`` chose (lifted to the full space), the held-out curve, and the grids it
    extended because their best value lay on their edge (one line each, for the report)."""

    best: Candidate
    curve: list[Candidate]
    extended: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the choice was made, where it is not the plain search


def select_model(
    features: Tensor,
    users: Tensor,
    val_features: Tensor,
    val_users: Tensor,
    num_users: int,
    settings: MapSettings,
    ranks: tuple[int, ...] | None = None,
    subspace: Tensor | None = None,
    extend_ranks: bool = True,
    *,
    fast: bool = True,
) -> Selection:
    """Choose K and the strengths in the spectral subspace, on the validation pairs' NLL.

    Every K of ``ranks`` (default ``settings.ranks``) is fitted at each of ``start_ridges`` (strong to
    weak, warm started); K is chosen by ``parsimonious`` among each K's best; then, for K >= 2, every
    combination of ``ridges`` (times its ridge) x ``deviation_ratios`` x ``priors``, warm started.
    A grid whose best value lies on its edge is extended past it (``EDGE_STEPS`` steps at most): the
    start ridges of each K and, with ``extend_ranks``, the ranks up to the subspace's dimension while
    the largest K tried has the lowest validation NLL.

    ``fast`` (the default) fits each candidate by ``fit_projected`` on one thread where the problem is
    small (``threads.threads_for``), and with more than ``settings.selection_users`` users searches on
    that many drawn at random (``_select_on_sample``: the choice is then refitted on every user and
    scored on the whole validation split); ``fast=False`` is the autograd path on every user
    (``fit_map``) it replaced, kept as the reference that ``benchmarks/selection.py`` and the tests
    compare it with.
    """
    ranks = tuple(sorted(ranks or settings.ranks))
    if subspace is None:
        subspace = spectral_subspace(features, users, num_users, max(settings.subspace, max(ranks)), settings.whiten)
    projected, projected_val = LF.project(features, subspace).double(), LF.project(val_features, subspace).double()
    if not fast:
        def fit_one(start: MapState, strengths: Strengths) -> MapState:
            return fit_map(projected, users, num_users, start, strengths, settings.projected_iterations)

        selection = _select(projected, users, projected_val, val_users, num_users, settings, ranks, subspace,
                            extend_ranks, fit_one)
    elif settings.selection_users and num_users > settings.selection_users:
        selection = _select_on_sample(projected, users, projected_val, val_users, num_users, settings, ranks, subspace,
                                      extend_ranks)
    else:
        selection = _select_fast(projected, users, projected_val, val_users, num_users, settings, ranks, subspace,
                                 extend_ranks)
    selection.best = _lifted(selection.best, subspace)
    return selection


def _select(projected: Tensor, users: Tensor, projected_val: Tensor, val_users: Tensor, num_users: int,
            settings: MapSettings, ranks: tuple[int, ...], subspace: Tensor, extend_ranks: bool, fit_one) -> Selection:
    """``select_model``'s search in the subspace, each candidate fitted by ``fit_one(start, strengths)``."""
    generator = torch.Generator().manual_seed(settings.seed)
    selection = Selection(None, [])  # type: ignore[arg-type]

    def fit(rank: int, strengths: Strengths, start: MapState) -> Candidate:
        state = fit_one(start, strengths)
        nll, accuracy, pair_nll = _scores(projected_val, val_users, num_users, state)
        candidate = Candidate(rank, strengths, nll, accuracy, state, pair_nll)
        selection.curve.append(candidate)
        return candidate

    def best_of_rank(rank: int) -> Candidate:
        prior = settings.start_prior if rank > 1 else 0.0
        start = random_state(subspace.shape[1], rank, num_users, generator)
        fits = []
        for ridge in sorted(settings.start_ridges, reverse=True):
            fits.append(fit(rank, Strengths(ridge, 1.0, prior), start if not fits else fits[-1].state))
        for _ in range(EDGE_STEPS):
            best = min(fits, key=lambda c: c.val_nll)
            ridge = past_edge([c.strengths.ridge for c in fits], best.strengths.ridge)
            if ridge is None:
                break
            selection.extended.append(f"K={rank}: start ridge {ridge:g} (the best, {best.strengths.ridge:g}, "
                                      "was on the grid's edge)")
            fits.append(fit(rank, Strengths(ridge, 1.0, prior), best.state))
        return min(fits, key=lambda c: c.val_nll)

    per_rank = [best_of_rank(rank) for rank in ranks]
    limit = subspace.shape[1]
    while extend_ranks:
        lowest = min(per_rank, key=lambda c: c.val_nll)
        rank = next_rank([c.rank for c in per_rank], lowest.rank, limit)
        if rank is None:
            if lowest.rank == max(c.rank for c in per_rank) == limit and len(per_rank) > 1:
                selection.extended.append(f"the validation NLL still falls at K={limit}, the spectral subspace's "
                                          "dimension: a larger map_settings.subspace may find more")
            break
        selection.extended.append(f"ranks: K={rank} (the validation NLL still fell at K={lowest.rank}, the largest "
                                  "tried)")
        per_rank.append(best_of_rank(rank))
    chosen = parsimonious(per_rank)
    best = chosen
    if chosen.rank > 1:
        best = _strength_grid(chosen, settings, fit)
    selection.best = best
    return selection


def _select_fast(projected: Tensor, users: Tensor, projected_val: Tensor, val_users: Tensor, num_users: int,
                 settings: MapSettings, ranks: tuple[int, ...], subspace: Tensor, extend_ranks: bool) -> Selection:
    """``_select`` with each candidate fitted by ``fit_projected`` on the pairs laid out per user, under the
    thread policy."""
    pairs = UserPairs.from_flat(projected, users, num_users)
    with threads_for(pairs.projected.numel()):
        return _select(projected, users, projected_val, val_users, num_users, settings, ranks, subspace,
                       extend_ranks,
                       lambda start, strengths: fit_projected(pairs, start, strengths, settings.projected_iterations))


def _lifted(candidate: Candidate, subspace: Tensor) -> Candidate:
    """The candidate's state in the full space: ``V = U A``, float32 like the module's parameters."""
    state = candidate.state
    return replace(candidate, state=MapState(
        (subspace.double() @ state.basis).float(),
        None if state.logits is None else state.logits.float(),
        None if state.mean is None else state.mean.float(),
    ))


def sampled_users(num_users: int, count: int, seed: int) -> Tensor:
    """``count`` of the ``num_users`` users, sorted, drawn without replacement from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_users, generator=generator)[:count].sort().values


def _select_on_sample(projected: Tensor, users: Tensor, projected_val: Tensor, val_users: Tensor, num_users: int,
                      settings: MapSettings, ranks: tuple[int, ...], subspace: Tensor, extend_ranks: bool) -> Selection:
    """``_select`` on ``settings.selection_users`` users drawn at random (their training and validation
    pairs), then the choice refitted on every user from the sample's fit (users outside it start at the
    sample's mean logits) and scored on the whole validation split: what ``Selection.best`` reports."""
    sample = sampled_users(num_users, settings.selection_users, settings.seed)
    index = torch.full((num_users,), -1, dtype=torch.long)
    index[sample] = torch.arange(sample.numel())
    rows, val_rows = index[users] >= 0, index[val_users] >= 0
    sample_users, sample_val_users = index[users[rows]], index[val_users[val_rows]]
    selection = _select_fast(projected[rows], sample_users, projected_val[val_rows], sample_val_users,
                             sample.numel(), settings, ranks, subspace, extend_ranks)
    chosen = selection.best
    start = chosen.state
    if start.logits is not None:
        logits = start.mean.expand(num_users, -1).clone()
        logits[sample] = start.logits
        start = MapState(start.basis, logits, start.mean)
    everyone = UserPairs.from_flat(projected, users, num_users)
    with threads_for(everyone.projected.numel()):
        state = fit_projected(everyone, start, chosen.strengths, settings.projected_iterations)
    nll, accuracy, pair_nll = _scores(projected_val, val_users, num_users, state)
    selection.best = Candidate(chosen.rank, chosen.strengths, nll, accuracy, state, pair_nll)
    selection.notes.append(
        f"chosen on {sample.numel()} of {num_users} users drawn at random ({int(rows.sum())} training, "
        f"{int(val_rows.sum())} validation pairs), then refitted on every user: val NLL {nll:.4f}, val acc "
        f"{accuracy:.4f} on all {val_users.numel()} validation pairs")
    return selection


def _strength_grid(chosen: Candidate, settings: MapSettings, fit) -> Candidate:
    """The chosen K's strengths: ``ridges`` (times its ridge) x ``deviation_ratios`` x ``priors``, warm
    started from it. Not extended past its edges: measured on d1024_iso_m30, the priors' extension to
    0.001 won by 0.0025 nats on validation (one standard error) and lost 0.005 on test.

    A candidate replaces the best so far only where it is ``clearly_better`` (one standard error of
    the paired difference), as a larger K must be: on the default run the two best strengths differed
    by 5e-6 nats, less than float rounding moves a 200-iteration fit, and which one won flipped with
    the thread count (issue 22)."""
    best = chosen
    for factor in settings.ridges:
        for ratio in settings.deviation_ratios:
            for prior in settings.priors:
                strengths = Strengths(chosen.strengths.ridge * factor, ratio, prior)
                if strengths != chosen.strengths:
                    candidate = fit(chosen.rank, strengths, chosen.state)
                    best = candidate if clearly_better(candidate, best) else best
    return best


def ridge_path(
    features: Tensor,
    users: Tensor,
    val_features: Tensor,
    val_users: Tensor,
    num_users: int,
    state: MapState,
    strengths: Strengths,
    path: tuple[float, ...],
    iterations: int,
    stop_early: bool = True,
) -> tuple[MapState, float, list[tuple[float, float, float]]]:
    """The full-space stages: the ridge of ``path`` strong to weak, warm started; with ``stop_early``
    until the validation NLL gets worse, else all of them; where the weakest ridge is the best, the
    path goes on past it (``past_edge``, ``EDGE_STEPS`` at most), and a stage past the edge is kept only
    where it is clearly better (``clearly_lower``: measured on Tulu-1, the K=1 path's step past its edge won
    0.003 nats on 20 validation pairs and lost 0.025 on test). Returns (the best state, its ridge, the (ridge,
    val NLL, val acc) of every stage)."""
    best, best_ridge, best_nll, best_pairs, stages = state, path[0], float("inf"), None, []
    ridges, extended = list(path), 0
    for stage, ridge in enumerate(ridges):  # grows while it runs where its end is the best
        state = fit_map(features, users, num_users, state, replace(strengths, ridge=ridge), iterations)
        nll, acc, pair_nll = _scores(val_features, val_users, num_users, state)
        stages.append((ridge, nll, acc))
        if nll < best_nll and (stage < len(path) or clearly_lower(pair_nll, best_pairs)):
            best, best_ridge, best_nll, best_pairs = state, ridge, nll, pair_nll
            if ridge == ridges[-1] and extended < EDGE_STEPS and (step := past_edge(ridges, ridge)) is not None:
                ridges.append(step)
                extended += 1
        elif stop_early:
            break
    return best, best_ridge, stages


def shared_direction(
    features: Tensor,
    users: Tensor,
    val_features: Tensor,
    val_users: Tensor,
    num_users: int,
    settings: MapSettings = MapSettings(),
) -> tuple[Tensor, float, list[tuple[float, float, float]]]:
    """One shared Bradley-Terry direction (K = 1, no personalization) by the wide ridge path from 0,
    every stage validated (a strong ridge plateaus, so none is skipped): the baseline every
    personalized model is compared with. Returns (``v`` ``[d, 1]``, ridge, stages)."""
    start = MapState(torch.zeros(features.shape[1], 1), None, None)
    state, ridge, stages = ridge_path(
        features,
        users,
        val_features,
        val_users,
        num_users,
        start,
        Strengths(settings.shared_path[0], 1.0, 0.0),
        settings.shared_path,
        settings.stage_iterations,
        stop_early=False,
    )
    return state.basis, ridge, stages
