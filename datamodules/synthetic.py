"""The built-in default data: a planted low-rank population, in the style of PersonalLLM."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from datamodules.base import PreferenceData, PreferenceDataModule
from lore_pl.core import functional as LF
from lore_pl.data.files import read_npy
from lore_pl.data.npy_rows import npy_layout, write_npy_rows
from lore_pl.data.outputs import OutputKind, check_output
from lore_pl.data.preferences import PreferenceSplit
from lore_pl.errors import LoreDataError


def is_feature_table(path: Path) -> bool:
    """A 2-D float32 ``.npy``: what the synthetic module writes into ``test_features_dir``."""
    try:
        shape, dtype, _ = npy_layout(path)
    except (OSError, LoreDataError):
        return False
    return len(shape) == 2 and dtype == np.float32


#: the test splits' feature files in a ``test_features_dir``: it replaces those, and refuses any other file
TEST_FEATURES = OutputKind("SyntheticPopulationDataModule", is_feature_table, "2-D float32 .npy feature tables",
                           "remove it, or give another test_features_dir")

#: values (rows x columns) of each generated block: bounds generation's float64 temporaries (32 MB each)
BLOCK_VALUES = 1 << 22


class SyntheticPopulationDataModule(PreferenceDataModule):
    """Users who mix M true reward directions, judging random responses to shared prompts.

    Generated in-process from ``seed``. Each prompt has R candidate responses with random embeddings
    in R^d; user u's true reward of a response is ``e . D w_u`` with ``D`` ``[d, M]`` (unit columns)
    and ``w_u ~ Dirichlet(dirichlet_alpha)``. A pair is the best against the worst response under
    the user's true reward (the PersonalLLM simulator) or, with ``labels: bradley_terry``, two random
    responses labelled by a Bradley-Terry draw. Train and test prompts are disjoint; seen and unseen
    users are disjoint; the validation prompts are held out of the train prompts (``val_fraction``).
    ``V_ref`` is by default the population-mean direction ``D 1/M`` (the truth: use ``reference_head``
    to make it less informed), and the true model is kept, so the oracle's accuracy is reported
    beside the model's. ``num_directions: 1`` is a population without personal signal: every user
    has the same true direction.

    Args:
        dim: embedding dimension d.
        num_directions: M, the planted rank.
        responses_per_prompt: R, candidate responses per prompt.
        num_train_prompts: prompts that train pairs and the few-shot pool are drawn from.
        num_test_prompts: prompts that test pairs are drawn from.
        num_seen_users: users whose pairs train the basis.
        num_unseen_users: new users adapted by few-shot.
        train_prompts_per_user: train prompts per seen user (an int, or a fraction of the prompts).
        fewshot_prompts_per_user: train prompts per unseen user, their few-shot pool (int or fraction).
        test_prompts_per_user: test prompts per user, seen and unseen (int or fraction).
        dirichlet_alpha: concentration of the users' true weights (0.1: most users near one direction).
        labels: ``best_worst`` (deterministic, the oracle is always right) or ``bradley_terry`` (noisy).
        noise_temperature: Bradley-Terry temperature on the true reward difference.
        spectrum_decay: embedding variance of coordinate i is proportional to ``i^-spectrum_decay``
            (0: isotropic; about 1 resembles real embeddings' decaying spectrum).
        reference_head: the ``V_ref`` the data provide: ``mean`` (the true population-mean direction),
            ``none``, or a number c: a direction of the same norm at cosine c to the true mean.
        seed: seed of everything generated.
        test_features_dir: a folder where the test splits' features (``seen_test``, ``unseen_test``) are
            written as ``.npy`` files and memory-mapped instead of held in RAM; evaluation reads them in
            blocks (at 100k users x 50 test prompts x d=1024 they are 20 GB). ``auto``: a fresh temporary
            folder, deleted when the process exits; ``null`` (the default): in RAM. The numbers are the same.
        **kwargs: the loading arguments of ``PreferenceDataModule`` (batch sizes, shuffling, validation hold-out).
    """

    def __init__(
        self,
        dim: int = 256,
        num_directions: int = 5,
        responses_per_prompt: int = 8,
        num_train_prompts: int = 2000,
        num_test_prompts: int = 500,
        num_seen_users: int = 500,
        num_unseen_users: int = 100,
        train_prompts_per_user: int | float = 30,
        fewshot_prompts_per_user: int | float = 50,
        test_prompts_per_user: int | float = 50,
        dirichlet_alpha: float = 0.1,
        labels: Literal["best_worst", "bradley_terry"] = "best_worst",
        noise_temperature: float = 1.0,
        spectrum_decay: float = 0.0,
        reference_head: Literal["mean", "none"] | float = "mean",
        seed: int = 0,
        test_features_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("dim", dim), ("num_directions", num_directions), ("num_train_prompts", num_train_prompts),
                            ("num_test_prompts", num_test_prompts), ("num_seen_users", num_seen_users)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_unseen_users < 0:
            raise ValueError(f"num_unseen_users must be >= 0, got {num_unseen_users}")
        if responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be >= 2, got {responses_per_prompt}")
        if dirichlet_alpha <= 0 or noise_temperature <= 0:
            raise ValueError("dirichlet_alpha and noise_temperature must be positive")
        if labels not in ("best_worst", "bradley_terry"):
            raise ValueError(f"labels must be 'best_worst' or 'bradley_terry', got {labels!r}")
        if reference_head not in ("mean", "none") and not (isinstance(reference_head, (int, float))
                                                          and -1.0 <= reference_head <= 1.0):
            raise ValueError(f"reference_head must be 'mean', 'none' or a cosine in [-1, 1], got {reference_head!r}")
        self.save_hyperparameters()
        self.true_directions: Tensor | None = None
        self.true_weights: dict[str, Tensor] = {}

    @property
    def embedder(self) -> str:
        hp = self.hparams
        return (f"SyntheticPopulation(seed={hp.seed}, dim={hp.dim}, responses={hp.responses_per_prompt}, "
                f"spectrum_decay={hp.spectrum_decay})")

    def _count(self, value: int | float, available: int, name: str) -> int:
        count = int(round(value * available)) if isinstance(value, float) else int(value)
        if not 1 <= count <= available:
            raise ValueError(f"{name}={value} gives {count} prompts per user; it must be in [1, {available}]")
        return count

    def load(self) -> PreferenceData:
        hp = self.hparams
        rng = np.random.default_rng(hp.seed)
        scale = np.arange(1, hp.dim + 1, dtype=np.float64) ** (-hp.spectrum_decay / 2)
        scale *= np.sqrt(hp.dim / np.sum(scale**2))  # mean variance 1 whatever the decay
        directions = rng.standard_normal((hp.dim, hp.num_directions))
        directions /= np.linalg.norm(directions, axis=0, keepdims=True)
        prompts = {
            "train": rng.standard_normal((hp.num_train_prompts, hp.responses_per_prompt, hp.dim)) * scale,
            "test": rng.standard_normal((hp.num_test_prompts, hp.responses_per_prompt, hp.dim)) * scale,
        }
        population = {"seen": hp.num_seen_users, "unseen": hp.num_unseen_users}
        weights = {name: rng.dirichlet(np.full(hp.num_directions, hp.dirichlet_alpha), size=count)
                   for name, count in population.items()}
        per_user = {
            "seen_train": (
                "train",
                self._count(hp.train_prompts_per_user, hp.num_train_prompts, "train_prompts_per_user"),
            ),
            "seen_test": ("test", self._count(hp.test_prompts_per_user, hp.num_test_prompts, "test_prompts_per_user")),
            "unseen_pool": (
                "train",
                self._count(hp.fewshot_prompts_per_user, hp.num_train_prompts, "fewshot_prompts_per_user"),
            ),
            "unseen_test": (
                "test",
                self._count(hp.test_prompts_per_user, hp.num_test_prompts, "test_prompts_per_user"),
            ),
        }
        first_id = {"train": 0, "test": hp.num_train_prompts}  # prompt ids, distinct across the two sets
        on_disk = self._test_features_dir()
        splits = {}
        for role, (prompt_set, count) in per_user.items():
            population_name = role.split("_")[0]
            if population[population_name] == 0:
                continue
            user_ids = [f"{population_name}-{i:05d}" for i in range(population[population_name])]
            path = on_disk / f"{role}.features.npy" if on_disk is not None and role.endswith("_test") else None
            if path is not None:
                check_output(path, TEST_FEATURES)  # a file of the user's there stays whole
            features, users, prompt_of = self._simulate(
                rng, prompts[prompt_set], directions, weights[population_name], count, path
            )
            splits[role] = PreferenceSplit(
                features, users, user_ids, name=role, prompts=prompt_of + first_id[prompt_set], source=path
            )
        self.true_directions = torch.from_numpy(directions).float()
        self.true_weights = {name: torch.from_numpy(w).float() for name, w in weights.items()}
        # owned: generated here, so the validation hold-out may narrow the train pairs in place
        return PreferenceData(splits, reference_head=self._reference_head(self.true_directions.mean(dim=1)),
                              owned=True)

    def _test_features_dir(self) -> Path | None:
        """Where the test splits' features go (None: RAM); ``auto`` makes a temporary folder, removed at exit."""
        folder = self.hparams.test_features_dir
        if folder is None:
            return None
        if folder == "auto":
            created = Path(tempfile.mkdtemp(prefix="lore-synthetic-test-"))
            atexit.register(shutil.rmtree, created, ignore_errors=True)
            return created
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)

    def _reference_head(self, mean: Tensor) -> Tensor | None:
        choice = self.hparams.reference_head
        if choice == "none":
            return None
        if choice == "mean":
            return mean
        # a direction at cosine c to the truth, of its norm: c m + sqrt(1 - c^2) |m| r with r orthogonal to m
        other = torch.randn(
            mean.shape[0], generator=torch.Generator().manual_seed(self.hparams.seed + 1), dtype=torch.float64
        )
        unit = (mean / mean.norm()).double()
        other = other - (other @ unit) * unit
        other = other / other.norm()
        cosine = float(choice)
        return (mean.norm() * (cosine * unit + (1 - cosine**2) ** 0.5 * other)).float()

    def _simulate(self, rng, embeddings: np.ndarray, directions: np.ndarray, weights: np.ndarray, per_user: int,
                  path: Path | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Pairs of every user on ``per_user`` distinct random prompts, as ``x = e(chosen) - e(rejected)``
        (float32; memory-mapped from ``path`` where given). Generated in blocks of rows: the float64
        temporaries are a block's, not the split's, and the random draws are those of one whole draw."""
        num_users = weights.shape[0]
        num_prompts, num_responses, dim = embeddings.shape
        # a row of uniforms per user, argsorted: the same draws as one [users, prompts] array, block by block
        users_per_block = max(1, BLOCK_VALUES // num_prompts)
        prompt_of = np.concatenate([
            np.argsort(rng.random((min(users_per_block, num_users - start), num_prompts)), axis=1)[:, :per_user]
            for start in range(0, num_users, users_per_block)
        ]).reshape(-1)
        users = np.repeat(np.arange(num_users), per_user)
        projected = embeddings @ directions  # [prompts, R, M]
        if self.hparams.labels == "best_worst":
            chosen, rejected = np.empty_like(users), np.empty_like(users)
            for rows in self._row_blocks(users.size, num_responses * directions.shape[1]):
                rewards = self._rewards(projected, weights, prompt_of[rows], users[rows])
                chosen[rows], rejected[rows] = rewards.argmax(axis=1), rewards.argmin(axis=1)
        else:
            first = rng.integers(num_responses, size=users.size)
            second = (first + rng.integers(1, num_responses, size=users.size)) % num_responses
            draws = rng.random(users.size)
            first_wins = np.empty(users.size, dtype=bool)
            for rows in self._row_blocks(users.size, num_responses * directions.shape[1]):
                rewards = self._rewards(projected, weights, prompt_of[rows], users[rows])
                index = np.arange(rewards.shape[0])
                margin = (rewards[index, first[rows]] - rewards[index, second[rows]]) / self.hparams.noise_temperature
                first_wins[rows] = draws[rows] < 1.0 / (1.0 + np.exp(-margin))
            chosen, rejected = np.where(first_wins, first, second), np.where(first_wins, second, first)

        def blocks():
            for rows in self._row_blocks(users.size, dim):
                # the difference in float64, rounded once to float32
                yield (embeddings[prompt_of[rows], chosen[rows]] - embeddings[prompt_of[rows], rejected[rows]]
                       ).astype(np.float32)

        if path is None:
            features = np.empty((users.size, dim), dtype=np.float32)
            for rows, block in zip(self._row_blocks(users.size, dim), blocks()):
                features[rows] = block
        else:
            write_npy_rows(path, (users.size, dim), np.float32, blocks())
            features = read_npy(path, "synthetic test features", mmap_mode="c")
        return torch.from_numpy(features), torch.from_numpy(users).long(), torch.from_numpy(prompt_of).long()

    @staticmethod
    def _row_blocks(rows: int, values_per_row: int) -> list[slice]:
        """Consecutive slices of ``rows`` with about ``BLOCK_VALUES`` values each."""
        step = max(1, BLOCK_VALUES // max(1, values_per_row))
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]

    @staticmethod
    def _rewards(projected: np.ndarray, weights: np.ndarray, prompt_of: np.ndarray, users: np.ndarray) -> np.ndarray:
        """True reward of every candidate response of each pair's prompt, for the pair's user: ``[pairs, R]``."""
        return (projected[prompt_of] * weights[users][:, None, :]).sum(-1)

    def oracle_logits(self, role: str, split: PreferenceSplit) -> Tensor | None:
        self.data  # noqa: B018 - the truth exists once the data are generated
        weights = self.true_weights[role.split("_")[0]]
        return torch.cat([(LF.project(block, self.true_directions) * weights[split.users[rows]]).sum(-1)
                          for rows, block in split.row_blocks()])
