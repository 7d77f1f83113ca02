"""Use a learned basis without Lightning: score responses for a user, rank candidates, add a user.

    model = PersonalRewardModel.load("lightning_logs/synthetic/version_0/basis.safetensors")
    rewards = model.score(embeddings, "seen-00001")          # [n] rewards e . V w_u
    table = model.score_users(embeddings, ["seen-00001", "seen-00002"])  # [n, 2]: one matmul for many users
    best_first = model.rank(candidate_embeddings, "seen-00001")
    best_ten = model.top_k(candidate_embeddings, "seen-00001", 10)  # rank(...)[:10], without sorting all
    model.personalize("new-user", chosen_embeddings, rejected_embeddings)  # K numbers, milliseconds
    i = model.next_pair("new-user", pool)                    # pool [n, 2, d]: which pair to ask next
    model.observe("new-user", pool[i], choice)               # choice 0/1: which response they preferred

Embeddings must come from the embedder the basis was trained on (``model.embedder``). Or give text,
which that embedder embeds exactly as training did (loaded on first use):

    model = PersonalRewardModel.from_run("lightning_logs/tulu1/version_0")   # the run dir or its basis file
    model.score_text("What is the capital of France?", ["Paris.", "Lyon."], "rater-3")
    model.personalize_text("new-user", [(prompt, chosen, rejected), ...])
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lore_pl.core import functional as LF
from lore_pl.core.fewshot import FewShotSettings, adapt_users, weight_covariance
from lore_pl.core.finite import all_finite, non_finite_rows
from lore_pl.core.selection import best_per_user, check_selection, posterior_precision, selection_scores
from lore_pl.data.basis_file import BasisFile, check_basis, check_user_id, load_basis, resolve_basis_path, save_basis
from lore_pl.data.embedder import EmbedderSpec, Item, TextEmbedder, as_messages
from lore_pl.data.outputs import OutputKind, claim_outputs
from lore_pl.errors import LoreDataError, LoreDataWarning

#: the largest pair logit a fit takes: its gradient's square must be a float32 number (Adam squares it)
MAX_FIT_LOGIT = math.sqrt(torch.finfo(torch.float32).max)
#: a prompt: a string (one user turn) or a chat list of ``{"role", "content"}`` turns
Prompt = str | Sequence[dict[str, str]]
#: ``PersonalRewardModel.save``'s file: it replaces no existing file unless told to
SAVED_BASIS = OutputKind("PersonalRewardModel.save", lambda path: False, "no existing file",
                         "pass overwrite=True to replace it")


class PersonalRewardModel:
    """A frozen ``LoreModel``: a basis V, tau, and named users; every user's reward is ``e . V w_u``.

    Every public method refuses a user that is not a non-empty string (``LoreDataError`` naming the
    argument), and a result that overflows float32 (``LoreDataError`` naming the basis); nothing is
    stored then.
    """

    def __init__(self, exported: BasisFile, source: str = "") -> None:
        self._build(check_basis(exported, source or "the basis (in memory)"), source)

    def _build(self, exported: BasisFile, source: str) -> None:
        """The model of a checked basis (``check_basis``, or ``load_basis``, which knows the file's dtypes)."""
        self.model = exported.to_model()
        self._row = {user: i for i, user in enumerate(self.model.user_ids)}
        self.source = source  # the file it was read from, for error messages
        self._embedder_spec: EmbedderSpec | None = None  # the text embedder's settings, once resolved
        self._text_embedder: TextEmbedder | None = None  # loaded when text is first embedded
        self._device: str | torch.device | None = None
        # the answers given to ``observe``, per user: (chosen embeddings, rejected embeddings, settings)
        self._answers: dict[str, tuple[list[Tensor], list[Tensor], FewShotSettings | None]] = {}
        #: covariances of users fitted here when the basis holds none for its own users (not saved)
        self._fitted_covariance: dict[str, Tensor] = {}
        # every user's simplex weights [C, K], with what they were computed from (``_weights_table``)
        self._weights_cache: tuple[tuple, Tensor, tuple] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> PersonalRewardModel:
        model = cls.__new__(cls)
        model._build(load_basis(path), str(path))  # checked as a whole by load_basis
        return model

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the basis and every user (the ones added here too) to ``path``, atomically. An existing
        file is replaced only with ``overwrite=True``: save cannot tell a basis it wrote from a run's
        trained one, and a checkpoint or any other file is not its to replace. A directory never."""
        with claim_outputs([path], SAVED_BASIS, overwrite=overwrite):
            save_basis(path, BasisFile.from_model(self.model))

    # ------------------------------------------------------------------- text: the basis's embedder
    @classmethod
    def from_run(cls, path: str | os.PathLike, embedder: EmbedderSpec | TextEmbedder | None = None, *,
                 batch_size: int | None = None, device: str | torch.device | None = None) -> PersonalRewardModel:
        """A model that also scores text: ``path`` is a run directory (its ``basis.safetensors``) or a
        basis file or checkpoint, whose recorded embedder embeds the text (loaded on first use).

        Args:
            embedder: your own ``EmbedderSpec`` or loaded ``TextEmbedder`` instead of the recorded one;
                refused unless its identity (every field but ``batch_size``) is the basis's.
            batch_size: texts per forward pass of the recorded embedder (it does not change the embeddings).
            device: where the embedder it loads runs (e.g. ``"cuda"``); default the CPU. A loaded
                ``TextEmbedder`` stays where it is.

        A basis whose features did not come from a text embedder (e.g. the synthetic population) is
        refused here; ``load`` reads it for scoring embeddings.
        """
        file = resolve_basis_path(path)
        model = cls.load(file)
        if embedder is None:
            model.embedder_spec  # noqa: B018 - refuses a basis without a text embedder now, not at first use
        else:
            model.use_embedder(embedder)
        if batch_size is not None:
            if model._text_embedder is not None:
                raise ValueError("batch_size sets the recorded embedder's; a loaded TextEmbedder keeps its spec's")
            model._embedder_spec = replace(model.embedder_spec, batch_size=batch_size)
        model._device = device
        return model

    def use_embedder(self, embedder: EmbedderSpec | TextEmbedder) -> None:
        """Embed text with ``embedder`` (a spec, loaded on first use, or a loaded ``TextEmbedder``);
        refused (``LoreDataError`` naming both) unless it is the embedder the basis was trained on."""
        spec = embedder if isinstance(embedder, EmbedderSpec) else getattr(embedder, "spec", None)
        if not isinstance(spec, EmbedderSpec):
            raise TypeError(f"embedder must be an EmbedderSpec or a TextEmbedder, got {type(embedder).__name__}")
        if spec.identity() != self.embedder:
            raise LoreDataError(
                f"the embedder {spec.identity()!r} is not the one the basis {self.source or '(in memory)'} was "
                f"trained on ({self.embedder or 'none recorded'!r}): its embeddings would not match the basis"
            )
        self._embedder_spec = spec
        self._text_embedder = None if isinstance(embedder, EmbedderSpec) else embedder

    @property
    def embedder_spec(self) -> EmbedderSpec:
        """The settings of the embedder the basis was trained on (read from ``embedder``); a
        ``LoreDataError`` for a basis whose features did not come from a text embedder."""
        if self._embedder_spec is None:
            try:
                self._embedder_spec = EmbedderSpec.from_identity(self.embedder)
            except LoreDataError as error:
                raise LoreDataError(f"{self.source or 'this basis'}: {error}") from None
        return self._embedder_spec

    @property
    def text_embedder(self) -> TextEmbedder:
        """The basis's ``TextEmbedder``, loaded on first use."""
        if self._text_embedder is None:
            embedder = TextEmbedder(self.embedder_spec)
            self._text_embedder = embedder if self._device is None else embedder.to(self._device)
        return self._text_embedder

    def embed_text(self, prompt: Prompt, responses: str | Sequence[str]) -> Tensor:
        """Embeddings ``[n, d]`` of the responses to ``prompt`` (a string or a chat list), each item
        ``[messages, response]`` as the training data modules build it, so they are training's features."""
        return self._embed(text_items(prompt, responses, "embed_text"))

    def _embed(self, items: list[Item]) -> Tensor:
        return self._embeddings(self.text_embedder(items))

    @property
    def basis(self) -> Tensor:
        return self.model.basis

    @property
    def tau(self) -> float:
        return self.model.temperature

    @property
    def reference_head(self) -> Tensor | None:
        return self.model.reference_head

    @property
    def embedder(self) -> str:
        return self.model.embedder

    @property
    def user_ids(self) -> list[str]:
        return self.model.user_ids

    @property
    def user_weights(self) -> Tensor:
        """Every user's weights ``[C, K]``, row by row as ``user_ids`` (a copy)."""
        return self._weights_table().clone()

    def _weights_table(self) -> Tensor:
        """Every user's simplex weights ``[C, K]``, computed once (a softmax of all users' logits) and again
        only when the logits or the active columns change: replaced (a user added), changed in place
        (a user refitted: tensors count their in-place changes in ``_version``) or pruned; so
        ``weights(user)`` and ``score`` cost O(1) in the number of users. Not differentiable: V and the
        users are frozen here."""
        model = self.model
        sources = (model.user_logits, model.active_columns)  # held by the cache: their ids stay theirs
        key = (*(None if tensor is None else (id(tensor), tensor._version) for tensor in sources),
               model.num_users, model.rank)
        if self._weights_cache is None or self._weights_cache[0] != key:
            with torch.no_grad():
                self._weights_cache = (key, model.user_weights().detach(), sources)
        return self._weights_cache[1]

    def _rows(self, users: object, caller: str) -> list[int]:
        """The model's rows of ``users`` (a list of user ids); a ``LoreDataError`` naming ``caller``'s argument
        for a list that is not one of strings, a ``KeyError`` for an unknown user (as ``weights``)."""
        if isinstance(users, (str, bytes)) or not isinstance(users, Sequence):
            raise LoreDataError(f"{caller}: argument 'users' must be a list of user ids, got {users!r:.60}")
        rows = []
        for number, user in enumerate(users):
            check_user_id(user, f"{caller}: argument 'users[{number}]'")
            if user not in self._row:
                raise KeyError(f"unknown user {user!r}: not among the {len(self.user_ids)} users of this model")
            rows.append(self._row[user])
        return rows

    @property
    def basis_rank(self) -> int:
        """K, the number of basis columns."""
        return self.model.rank

    def _user(self, user: object, caller: str) -> str:
        """``user`` if it is a user id; a ``LoreDataError`` naming ``caller``'s argument otherwise."""
        return check_user_id(user, f"{caller}: argument 'user'")

    def _finite(self, values: Tensor, caller: str, what: str) -> Tensor:
        """``values`` if finite; an overflow (float32) raises a ``LoreDataError`` naming the basis."""
        if not bool(torch.isfinite(values).all()):
            count = int((~torch.isfinite(values)).sum())
            raise LoreDataError(f"{caller}: {count} of the {what} overflow float32 (beyond +-3.4e38): the inputs' "
                                f"scale times that of the basis {self.source or '(in memory)'} (tau={self.tau:g}) is "
                                "too large; nothing was scored or stored")
        return values

    def weights(self, user: str) -> Tensor:
        """The user's simplex weights ``[K]`` (a copy)."""
        self._user(user, "weights")
        if user not in self._row:
            raise KeyError(f"unknown user {user!r}: not among the {len(self.user_ids)} users of this model")
        return self._weights_table()[self._row[user]].clone()

    def head(self, user: str) -> Tensor:
        """The user's personal reward direction ``V w_u`` ``[d]``."""
        return self.basis.detach() @ self.weights(user)

    def heads(self, users: Sequence[str]) -> Tensor:
        """The users' reward directions ``V w_u`` as the columns of ``[d, len(users)]``."""
        return self._heads(self._rows(users, "heads"))

    def _heads(self, rows: list[int]) -> Tensor:
        return self.basis.detach() @ self._weights_table()[rows].t()

    def _embeddings(self, embeddings: Tensor, what: str = "embeddings", check_finite: bool = True) -> Tensor:
        """``embeddings`` as float32 ``[n, d]``; NaN or Inf is refused (``_refuse_non_finite``) unless the
        caller checks its product instead (``check_finite=False``, ``_rewards``)."""
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"embeddings have d={embeddings.shape[-1]}, the basis has d={self.basis.shape[0]}")
        if check_finite and not all_finite(embeddings):
            self._refuse_non_finite(embeddings, what)
        return embeddings

    @staticmethod
    def _refuse_non_finite(embeddings: Tensor, what: str) -> None:
        """A ``ValueError`` naming the rows of ``embeddings`` ``[n, d]`` that hold NaN or Inf, if any."""
        rows = non_finite_rows(embeddings)
        if rows.numel() == 0:
            return
        count = int((~torch.isfinite(embeddings[rows])).sum())
        shown = ", ".join(str(row) for row in rows[:10].tolist()) + (", ..." if rows.numel() > 10 else "")
        raise ValueError(f"{what}: {count} non-finite value(s) in the embeddings, the first at row {int(rows[0])} "
                         f"({rows.numel()} row(s): {shown}); nothing was scored or stored")

    def _rewards(self, embeddings: Tensor, heads: Tensor, caller: str) -> Tensor:
        """``embeddings @ heads``, refusing embeddings with NaN or Inf (``_refuse_non_finite``) and rewards that
        overflow float32 (``_finite``).

        The product is checked rather than its input, so the embeddings are read once: a NaN or Inf
        entry makes its row's rewards NaN or Inf whatever it is multiplied by (NaN * 0 and Inf * 0 are
        NaN). Only a kernel that skips a zero multiplier could drop one, so heads holding an exact zero
        have the embeddings checked as well. The rows are found only when something is not finite.
        """
        rewards = embeddings @ heads
        if all_finite(rewards) and (bool(heads.ne(0).all()) or all_finite(embeddings)):
            return rewards
        self._refuse_non_finite(embeddings, "embeddings")
        return self._finite(rewards, caller, "rewards")  # finite embeddings: the rewards overflowed

    def score(self, embeddings: Tensor, user: str) -> Tensor:
        """Rewards ``e . V w_u`` of responses ``[n, d]`` (or one ``[d]``) for ``user``: ``[n]``; rewards
        that overflow float32 are refused."""
        self._user(user, "score")
        embeddings = self._embeddings(embeddings, check_finite=False)  # ``_rewards`` checks the product
        return self._rewards(embeddings, self.head(user), f"score({user!r})")

    def score_users(self, embeddings: Tensor, users: Sequence[str]) -> Tensor:
        """Rewards ``[n, len(users)]`` of responses ``[n, d]`` (or one ``[d]``) for each of ``users`` (a list of
        user ids), as one matrix product: column j is ``score(embeddings, users[j])``."""
        rows = self._rows(users, "score_users")
        embeddings = self._embeddings(embeddings, check_finite=False)  # ``_rewards`` checks the product
        return self._rewards(embeddings, self._heads(rows), f"score_users({len(rows)} users)")

    def rank(self, candidates: Tensor, user: str) -> Tensor:
        """Indices of ``candidates`` ``[n, d]`` from the user's best to worst (personalized best-of-n); equal
        rewards keep the candidates' order."""
        self._user(user, "rank")
        return best_first(self.score(candidates, user))

    def top_k(self, candidates: Tensor, user: str, k: int) -> Tensor:
        """``rank(candidates, user)[:k]``: the indices of the user's k best candidates, best first, found with
        ``topk`` instead of sorting all of them (all n where ``k >= n``)."""
        self._user(user, "top_k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise LoreDataError(f"top_k({user!r}): argument 'k' must be a whole number >= 0, got {k!r:.40}")
        return best_first(self.score(candidates, user), k)

    def preference_probability(self, chosen: Tensor, rejected: Tensor, user: str) -> Tensor:
        """``P(user prefers chosen)`` = ``sigmoid((e_c - e_r) . V w_u / tau)``, per pair."""
        self._user(user, "preference_probability")
        return torch.sigmoid((self.score(chosen, user) - self.score(rejected, user)) / self.tau)

    # The same four on text: the responses are embedded by the basis's embedder (``from_run``).
    def score_text(self, prompt: Prompt, responses: str | Sequence[str], user: str) -> Tensor:
        """Rewards ``[n]`` of the responses to ``prompt`` (a string or a chat list) for ``user``."""
        self._user(user, "score_text")
        self.weights(user)  # an unknown user raises before any text is embedded
        return self.score(self._embed(text_items(prompt, responses, "score_text")), user)

    def rank_text(self, prompt: Prompt, responses: str | Sequence[str], user: str) -> Tensor:
        """Indices of ``responses`` from the user's best to worst (personalized best-of-n on text)."""
        self._user(user, "rank_text")
        return best_first(self.score_text(prompt, responses, user))

    def preference_probability_text(self, prompt: Prompt, chosen: str | Sequence[str], rejected: str | Sequence[str],
                                    user: str) -> Tensor:
        """``P(user prefers chosen[i] to rejected[i])`` on ``prompt``, per pair ``[n]``."""
        self._user(user, "preference_probability_text")
        self.weights(user)
        chosen_items = text_items(prompt, chosen, "preference_probability_text: chosen")
        rejected_items = text_items(prompt, rejected, "preference_probability_text: rejected")
        if len(chosen_items) != len(rejected_items):
            raise LoreDataError(f"preference_probability_text: {len(chosen_items)} chosen but "
                                f"{len(rejected_items)} rejected responses")
        embeddings = self._embed(chosen_items + rejected_items)
        count = len(chosen_items)
        return self.preference_probability(embeddings[:count], embeddings[count:], user)

    def personalize_text(self, user: str, pairs: Iterable[tuple[Prompt, str, str]], **options: Any) -> Tensor:
        """``personalize`` on text pairs ``(prompt, chosen, rejected)`` (``options``: its keyword
        arguments); a pair with an empty or identical response is refused, and nothing is stored."""
        self._user(user, "personalize_text")
        chosen, rejected = [], []
        for number, pair in enumerate(pairs):
            where = f"personalize_text({user!r}): pair {number}"
            if not isinstance(pair, (tuple, list)) or len(pair) != 3:
                raise LoreDataError(f"{where}: a pair is (prompt, chosen, rejected), got {pair!r:.80}")
            prompt, better, worse = pair
            chosen += text_items(prompt, [better], f"{where}: chosen")
            rejected += text_items(prompt, [worse], f"{where}: rejected")
            if better == worse:
                raise LoreDataError(f"{where}: chosen and rejected are identical")
        if not chosen:
            raise LoreDataError(f"personalize_text({user!r}): no pairs")
        embeddings = self._embed(chosen + rejected)
        return self.personalize(user, embeddings[: len(chosen)], embeddings[len(chosen) :], **options)

    def weight_covariance(self, user: str) -> Tensor | None:
        """The posterior covariance ``[K, K]`` of the user's weights (Laplace), where the model has it."""
        self._user(user, "weight_covariance")
        self.weights(user)  # unknown users raise
        if not self.model.personalized:  # K=1: every user's weights are [1.0], known exactly
            return torch.zeros(1, 1)
        covariance = self.model.weight_covariance
        if covariance is None:  # a basis without its users' covariances: those fitted here have theirs
            return self._fitted_covariance.get(user)
        return covariance[self._row[user]]

    def score_std(self, embeddings: Tensor, user: str) -> Tensor | None:
        """The posterior standard deviation of the rewards ``e . V w_u`` ``[n]`` that comes from not
        knowing ``w_u`` exactly (a user with few pairs has a wide one); None without a covariance."""
        self._user(user, "score_std")
        embeddings = self._embeddings(embeddings)
        covariance = self.weight_covariance(user)
        if covariance is None:
            return None
        directions = embeddings @ self.basis  # [n, K]: e . V
        spread = ((directions @ covariance.float()) * directions).sum(-1).clamp(min=0).sqrt()
        return self._finite(spread, f"score_std({user!r})", "standard deviations")

    def personalize(self, user: str, chosen: Tensor, rejected: Tensor, *, steps: int = 500, lr: float = 0.1,
                    init: str = "population", prior_strength: float | None = None, seed: int = 0,
                    settings: FewShotSettings | None = None) -> Tensor:
        """Fit a new (or refit an existing) user's weights from a few pairs; returns ``w`` ``[K]``.

        V stays frozen: the pairs are projected once and only K logits are fitted by the project's
        one few-shot solver (phase 2), with ``settings`` or the keyword arguments (all pairs are used).
        The user starts at the population's mean logits and is pulled towards them by the basis's own
        prior (``prior_strength`` null; chosen on held-out prompts when the basis was trained), so one
        pair moves a user little and many pairs move them to their own fit; ``prior_strength`` 0 and
        ``init='randn'`` are the reference's plain fit. The user's weight covariance is kept too.
        """
        self._user(user, "personalize")
        if not self.model.personalized:
            warnings.warn(f"personalize({user!r}): the basis {self.source or '(in memory)'} has one column (K=1), "
                          "one shared reward model: every user's weights are [1.0] and the pairs change nothing",
                          LoreDataWarning, stacklevel=2)
        differences = (self._embeddings(chosen, f"personalize({user!r}): chosen")
                       - self._embeddings(rejected, f"personalize({user!r}): rejected"))
        if not bool(torch.isfinite(differences).all()):  # each finite, the difference overflowed
            raise ValueError(f"personalize({user!r}): the embeddings' differences overflow; nothing was stored")
        prior = self.model.population_logits()
        if settings is None:
            if init == "population" and prior is None:
                init = "zeros"  # no stored users to average: start from uniform weights
            settings = FewShotSettings(shots=None, shot_seed=seed, steps=steps, lr=lr, weight_init=init,
                                       prior_strength=prior_strength)
        settings = replace(settings, shots=None)
        users = torch.zeros(differences.shape[0], dtype=torch.long)
        caller = f"personalize({user!r})"
        projected = self._finite(LF.project(differences, self.basis), caller, "pairs' projections on the basis")
        largest = float(projected.abs().max()) / self.tau if projected.numel() else 0.0
        if largest > MAX_FIT_LOGIT:  # Adam squares the gradients, up to |logit|: beyond, they overflow to inf
            raise LoreDataError(f"{caller}: a pair's logit |(e_c - e_r) . V| / tau reaches {largest:.3g}, beyond "
                                f"{MAX_FIT_LOGIT:.3g} (whose square float32 holds) with the basis "
                                f"{self.source or '(in memory)'} (tau={self.tau:g}); the fit cannot move; nothing was "
                                "stored")
        precision = settings.precision(self.model.prior_precision)
        logits = adapt_users(projected, users, 1, settings, self.tau, prior, prior_precision=self.model.prior_precision)
        self._finite(logits, caller, "fitted logits")
        covariance = None
        if self.model.personalized:
            covariance = self._finite(weight_covariance(projected, users, logits, self.tau, precision)[0], caller,
                                      "entries of the weights' covariance")
        self._set_user(user, logits[0], covariance)
        self._answers.pop(user, None)  # this fit replaces whatever ``observe`` had recorded (it re-adds them)
        return self.weights(user)

    def _set_user(self, user: str, logits: Tensor, covariance: Tensor | None) -> None:
        model = self.model
        self._weights_cache = None  # the cache would see the change too (its key); this says so here
        known = self.model.weight_covariance is not None
        if covariance is not None and not known and model.num_users > 0:
            self._fitted_covariance[user] = covariance  # the basis keeps no table of them to join
        if user not in self._row:
            self._row[user] = model.num_users
            model.user_ids.append(user)
            model.num_users += 1
            if model.personalized:
                model.user_logits = torch.cat([model.user_logits, logits[None].to(model.user_logits)])
                if covariance is not None and (known or model.num_users == 1):
                    previous = model.weight_covariance if known else covariance.new_zeros(0, *covariance.shape)
                    model.weight_covariance = torch.cat([previous, covariance[None].to(previous)])
        elif model.personalized:
            model.user_logits[self._row[user]] = logits
            if covariance is not None and known:
                model.weight_covariance[self._row[user]] = covariance

    def forget(self, user: str) -> None:
        """Remove ``user`` and all this model knows of them (weights, covariance, observed answers); a
        ``KeyError`` for a user it does not know. Later users move up a row; the basis is untouched."""
        self._user(user, "forget")
        self.weights(user)  # unknown users raise
        model, row = self.model, self._row[user]
        keep = [i for i in range(model.num_users) if i != row]
        if model.user_logits is not None:
            model.user_logits = model.user_logits[keep]
        if model.weight_covariance is not None:
            model.weight_covariance = model.weight_covariance[keep]
        model.user_ids.pop(row)
        model.num_users -= 1
        self._row = {name: i for i, name in enumerate(model.user_ids)}
        self._answers.pop(user, None)
        self._fitted_covariance.pop(user, None)

    # -------------------------------------------------------------------- asking a user, one pair at a time
    def _pool(self, pool: Tensor, caller: str, user: str) -> Tensor:
        pool = torch.as_tensor(pool, dtype=torch.float32)
        if pool.ndim == 2:
            pool = pool[None]
        if pool.ndim != 3 or pool.shape[1] != 2 or pool.shape[0] == 0:
            raise ValueError(f"{caller}({user!r}): pairs must be [n, 2, d] (or one pair [2, d]), got "
                             f"{tuple(pool.shape)}")
        if pool.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"{caller}({user!r}): embeddings have d={pool.shape[-1]}, the basis has "
                             f"d={self.basis.shape[0]}")
        if not bool(torch.isfinite(pool).all()):
            raise ValueError(f"{caller}({user!r}): the embeddings hold NaN or Inf; nothing was stored")
        return pool

    def _posterior(self, user: str) -> tuple[Tensor, Tensor]:
        """The user's current weights ``[K]`` and their Laplace covariance ``[K, K]``, what selection uses.

        A user with answers from ``observe``: their fit and its covariance on those answers; a user
        the model does not know: the population prior; a stored user without answers: their weights
        and the stored covariance (the prior's spread around their weights where none is stored).
        """
        model, rank = self.model, self.basis_rank
        prior = model.population_logits()
        answers = self._answers.get(user)
        settings = answers[2] if answers is not None else None
        fit_precision = None if settings is None else settings.prior_strength
        if rank <= 1:
            return self.basis.new_ones(1), self.basis.new_zeros(1, 1)
        if user in self._row:
            logits = model.user_logits[self._row[user]].detach()
            if answers is None and model.weight_covariance is not None:
                return self.weights(user), model.weight_covariance[self._row[user]].detach()
        else:  # a new user: the population prior (uniform weights for a basis without users)
            logits = prior if prior is not None else self.basis.new_zeros(rank)
        precision = posterior_precision(fit_precision, model.prior_precision, rank,
                                        self._weights_table() if model.num_users else None, prior)
        projected = self.basis.new_zeros(0, rank)
        if answers is not None:
            projected = LF.project(torch.stack(answers[0]) - torch.stack(answers[1]), self.basis)
        users = torch.zeros(projected.shape[0], dtype=torch.long)
        covariance = weight_covariance(projected, users, logits[None].float(), self.tau, precision)[0]
        self._finite(covariance, f"next_pair({user!r})", "entries of the weights' covariance")
        return torch.softmax(logits.float(), dim=-1), covariance

    def next_pair(self, user: str, pool: Tensor, *, selection: str = "information",
                  exclude: list[int] | None = None, generator: torch.Generator | None = None) -> int:
        """Which pair of ``pool`` to ask ``user`` next: an index into the pool.

        ``pool`` ``[n, 2, d]``: n candidate pairs, each two responses' embeddings (which is first does
        not matter). ``selection``: ``information`` (the pair whose answer tells most about the user's
        weights under their current posterior, BALD), ``uncertainty`` (the pair whose predicted
        probability is closest to 0.5) or ``random`` (drawn with ``generator``); see
        ``lore_pl.core.selection``. A user the model does not know starts at the population prior;
        each ``observe`` narrows their posterior. ``exclude``: indices not to pick (e.g. pairs already
        asked: integer positions, negative ones from the end). Stores nothing; a pool with NaN or Inf is refused.
        """
        self._user(user, "next_pair")
        check_selection(selection)
        pool = self._pool(pool, "next_pair", user)
        available = torch.ones(pool.shape[0], dtype=torch.bool)
        available[excluded_positions(exclude, pool.shape[0], f"next_pair({user!r})")] = False
        if not bool(available.any()):
            raise ValueError(f"next_pair({user!r}): every pair of the pool is excluded")
        weights, covariance = self._posterior(user)
        projected = self._finite(LF.project(pool[:, 0] - pool[:, 1], self.basis), f"next_pair({user!r})",
                                 "pairs' projections on the basis")
        users = torch.zeros(pool.shape[0], dtype=torch.long)
        scores = selection_scores(selection, projected, users, weights[None], covariance[None], self.tau,
                                  generator)
        return int(best_per_user(scores, users, 1, available)[0])

    def observe(self, user: str, pair: Tensor, choice: int, *, settings: FewShotSettings | None = None) -> Tensor:
        """Record that ``user`` preferred response ``choice`` (0 or 1) of ``pair`` ``[2, d]`` and refit them.

        The refit is ``personalize`` on every answer observed for this user so far (so a new user
        starts at the population prior, and the weights equal ``personalize`` on the same pairs),
        with ``settings`` (None: ``personalize``'s defaults; the latest given is kept for the user).
        Returns the user's weights ``[K]``. A pair with NaN or Inf, or a choice other than 0 or 1, is
        refused and nothing is stored.
        """
        self._user(user, "observe")
        if choice not in (0, 1) or isinstance(choice, float):
            raise ValueError(f"observe({user!r}): choice must be 0 (the first response preferred) or 1 "
                             f"(the second), got {choice!r}")
        pair = self._pool(pair, "observe", user)
        if pair.shape[0] != 1:
            raise ValueError(f"observe({user!r}): one pair [2, d] at a time, got {pair.shape[0]}")
        chosen, rejected, kept = self._answers.get(user, ([], [], None))
        chosen, rejected = [*chosen, pair[0, int(choice)]], [*rejected, pair[0, 1 - int(choice)]]
        settings = settings if settings is not None else kept
        weights = self.personalize(user, torch.stack(chosen), torch.stack(rejected), settings=settings)
        self._answers[user] = (chosen, rejected, settings)
        return weights

    def answers(self, user: str) -> tuple[Tensor, Tensor] | None:
        """The (chosen ``[m, d]``, rejected ``[m, d]``) answers ``observe`` recorded for ``user``, or None."""
        self._user(user, "answers")
        if user not in self._answers:
            return None
        chosen, rejected, _ = self._answers[user]
        return torch.stack(chosen), torch.stack(rejected)


def best_first(scores: Tensor, k: int | None = None) -> Tensor:
    """Indices of the ``k`` highest ``scores`` ``[n]`` (all where ``k`` is None or ``>= n``), highest first;
    equal scores in index order, so the first k of the full order and the k found by ``topk`` agree."""
    count = scores.shape[0]
    if k is None or k >= count:
        return torch.argsort(scores, descending=True, stable=True)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    threshold = scores.topk(k).values[-1]
    above = torch.nonzero(scores > threshold)[:, 0]
    tied = torch.nonzero(scores == threshold)[:, 0][: k - above.numel()]  # the lowest indices among the ties
    chosen = torch.cat([above, tied]).sort().values
    return chosen[torch.argsort(scores[chosen], descending=True, stable=True)]


def excluded_positions(exclude: Iterable[int] | None, count: int, where: str) -> list[int]:
    """``exclude`` as a list of positions into ``count`` pairs (integers, negative from the end); a
    non-integer (``1.5``, ``True``, ``"2"``) or one out of range raises a ``LoreDataError`` naming it."""
    if exclude is None:
        return []
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise LoreDataError(f"{where}: exclude must be a list of integer positions, got {exclude!r:.60}")
    positions = []
    for number, index in enumerate(exclude):
        try:
            if isinstance(index, bool):
                raise TypeError
            position = operator.index(index)  # ints, NumPy integers, 0-d integer tensors; not 1.5
        except TypeError:
            raise LoreDataError(f"{where}: exclude[{number}] must be an integer position, got {index!r:.40}") from None
        if not -count <= position < count:
            raise LoreDataError(f"{where}: exclude[{number}] is {position}, outside the pool of {count} pairs "
                                f"(positions {-count} to {count - 1})")
        positions.append(position)
    return positions


def text_items(prompt: Prompt, responses: str | Sequence[str], where: str) -> list[Item]:
    """Items ``[messages, response]`` exactly as the training data modules build them; bad text raises
    a ``LoreDataError`` naming ``where``."""
    messages = as_messages(prompt, where=f"{where}: prompt")
    responses = [responses] if isinstance(responses, str) else list(responses)
    if not responses:
        raise LoreDataError(f"{where}: no responses")
    for number, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise LoreDataError(f"{where}: response {number} must be a non-empty string, got {response!r:.60}")
    return [[messages, response] for response in responses]
