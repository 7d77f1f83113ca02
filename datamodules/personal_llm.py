"""PersonalLLM: simulated users who weigh 10 reward models' scores of 8 responses per prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.base import PreferenceData
from datamodules.embedded import HubPreferenceDataModule
from datamodules.pairs import ItemIndex
from datamodules.sources import find_files, read_all
from lore_pl.data.preferences import PreferenceSplit

REWARD_MODELS = (
    "gemma_2b", "gemma_7b", "mistral_raft", "llama3_sfairx", "oasst_deberta_v3",
    "beaver_7b", "oasst_pythia_7b", "oasst_pythia_1b", "mistral_ray", "mistral_weqweasdas",
)
RESPONSES = 8


def per_user_count(value: int | float | None, available: int, name: str) -> int:
    """Prompts per user: all (None), a count, or a fraction of ``available`` (at least one)."""
    if value is None:
        return available
    count = max(1, int(round(value * available))) if isinstance(value, float) else int(value)
    if not 1 <= count <= available:
        raise ValueError(f"{name}={value} gives {count} prompts per user; it must be in [1, {available}]")
    return count


class PersonalLLMDataModule(HubPreferenceDataModule):
    """``namkoong-lab/PersonalLLM``: ``prompt``, ``response_1..8`` and the scores
    ``response_<i>_<reward model>`` of 10 reward models, in a train and a test split.

    A simulated user u has weights ``w_u ~ Dirichlet(dirichlet_alpha * ones(10))``; on a prompt, u's
    chosen response is the one with the highest ``scores . w_u`` and the rejected one the lowest.
    Seen users each get ``seen_train_prompts`` of the train prompts, unseen users
    ``unseen_train_prompts`` (their few-shot pool); both are tested on ``test_prompts`` of the test
    prompts (all of them in the paper: mind the memory, users x test prompts x d floats).

    Args:
        source: the Hub data set id, or a local directory with ``train`` and ``test`` data files.
        revision: the Hub revision (a commit hash pins the data).
        seed: seed of the users' weights and their prompts.
        num_seen_users: simulated users who train the basis (1000 in the paper).
        num_unseen_users: simulated new users (500 in the paper).
        seen_train_prompts: train prompts per seen user: a fraction (0.005 in the paper) or a count.
        unseen_train_prompts: train prompts per unseen user: a fraction (0.001 in the paper) or a count.
        test_prompts: test prompts per user: null for all (the paper), a fraction or a count.
        dirichlet_alpha: concentration of the users' weights (0.1 in the paper).
        **kwargs: the loading arguments of ``EmbeddedPreferenceDataModule`` (batch sizes, shuffling,
            the validation hold-out, the cache and the embedder).
    """

    def __init__(
        self,
        source: str = "namkoong-lab/PersonalLLM",
        revision: str = "main",
        seed: int = 0,
        num_seen_users: int = 1000,
        num_unseen_users: int = 500,
        seen_train_prompts: int | float = 0.005,
        unseen_train_prompts: int | float = 0.001,
        test_prompts: int | float | None = None,
        dirichlet_alpha: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(source=source, revision=revision, seed=seed, **kwargs)
        if dirichlet_alpha <= 0 or num_seen_users < 1 or num_unseen_users < 0:
            raise ValueError("dirichlet_alpha must be positive, num_seen_users >= 1 and num_unseen_users >= 0")
        self.population = {"seen": num_seen_users, "unseen": num_unseen_users}
        self.seen_train_prompts, self.unseen_train_prompts = seen_train_prompts, unseen_train_prompts
        self.test_prompts, self.dirichlet_alpha = test_prompts, dirichlet_alpha
        self.true_weights: dict[str, Tensor] = {}

    def read_source(self) -> tuple[list[Any], dict[str, Any]]:
        root = self.source_root[0]
        items, table = ItemIndex(), {}
        for split in ("train", "test"):
            responses, scores = [], []
            for number, record in enumerate(read_all(find_files(root, split)), 1):
                messages = [{"role": "user", "content": record["prompt"]}]
                try:
                    row_scores = [
                        [float(record[f"response_{i}_{rm}"]) for rm in REWARD_MODELS] for i in range(1, RESPONSES + 1)
                    ]
                except (KeyError, TypeError) as error:
                    raise ValueError(f"{root}: {split} row {number}: missing or empty score field {error}") from None
                responses.append([items.add(messages, record[f"response_{i}"]) for i in range(1, RESPONSES + 1)])
                scores.append(row_scores)
            table[split] = {"responses": responses, "scores": scores}
        return items.items, table

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        rng = np.random.default_rng(self.seed)
        prompts = {
            split: (np.asarray(table[split]["responses"]), np.asarray(table[split]["scores"])) for split in table
        }
        population = self.population
        per_user = {
            "seen_train": (
                "train",
                per_user_count(self.seen_train_prompts, len(prompts["train"][0]), "seen_train_prompts"),
            ),
            "seen_test": ("test", per_user_count(self.test_prompts, len(prompts["test"][0]), "test_prompts")),
            "unseen_pool": (
                "train",
                per_user_count(self.unseen_train_prompts, len(prompts["train"][0]), "unseen_train_prompts"),
            ),
            "unseen_test": ("test", per_user_count(self.test_prompts, len(prompts["test"][0]), "test_prompts")),
        }
        weights = {
            name: rng.dirichlet(np.full(len(REWARD_MODELS), self.dirichlet_alpha), size=count)
            for name, count in population.items()
        }
        self.true_weights = {name: torch.from_numpy(w).float() for name, w in weights.items()}
        first_id = {"train": 0, "test": len(prompts["train"][0])}  # prompt ids, distinct across the two splits
        splits = {}
        for role, (split, count) in per_user.items():
            name = role.split("_")[0]
            if population[name] == 0:
                continue
            responses, scores = prompts[split]
            num_users = population[name]
            # each user's prompts: `count` distinct ones, drawn without replacement
            prompt_of = np.argsort(rng.random((num_users, len(responses))), axis=1)[:, :count].reshape(-1)
            users = np.repeat(np.arange(num_users), count)
            rewards = np.einsum("prm,pm->pr", scores[prompt_of], weights[name][users])  # [pairs, 8]
            chosen = responses[prompt_of, rewards.argmax(axis=1)]
            rejected = responses[prompt_of, rewards.argmin(axis=1)]
            keep = chosen != rejected  # all eight scores tied: no preference
            features = embeddings[torch.as_tensor(chosen[keep])] - embeddings[torch.as_tensor(rejected[keep])]
            user_ids = [f"{name}-{i:05d}" for i in range(num_users)]
            splits[role] = PreferenceSplit(
                features.float(),
                torch.as_tensor(users[keep]),
                user_ids,
                name=role,
                prompts=torch.as_tensor(prompt_of[keep] + first_id[split]),
            )
        return PreferenceData(splits, reference_head=reference_head)
