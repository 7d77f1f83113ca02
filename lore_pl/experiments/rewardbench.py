"""RewardBench 2 accuracy of learned reward heads (``allenai/reward-bench-2``).

Each example has a prompt, a list of chosen and a list of rejected completions, and a subset. An
example counts as correct for a head only if *every* chosen completion scores above *every*
rejected one (strict: ties count as wrong). For the one-chosen subsets that is the usual
best-of-n rule; for "Ties" (several correct answers) it is the strict version of its scoring.

    python -m lore_pl.experiments.rewardbench --basis_path run/basis.safetensors --embedder.model ... \
        [--users '[u1, u2]']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lore_pl.data.atomic import write_json_atomic
from lore_pl.data.basis_file import load_basis
from lore_pl.data.embedder import EmbedderSpec, as_messages, template_id
from lore_pl.data.feature_cache import FeatureCache


def read_examples(source: str, revision: str = "main") -> tuple[list[Any], dict[str, list[Any]], str]:
    """(items to embed, table ``{subset, chosen, rejected}`` of item rows per example, revision)."""
    from datamodules.pairs import ItemIndex
    from datamodules.sources import local_files, read_all, resolve

    root, resolved_revision = resolve(source, revision)
    items, table = ItemIndex(), {"subset": [], "chosen": [], "rejected": []}
    for number, record in enumerate(read_all(local_files(root)), 1):
        where = f"{source}: example {number}"
        messages = as_messages(record["prompt"], where=f"{where}: field 'prompt'")
        for field in ("chosen", "rejected"):
            if not isinstance(record.get(field), list) or not record[field]:
                raise ValueError(f"{where}: field {field!r} must be a non-empty list of completions")
        table["subset"].append(str(record["subset"]))
        table["chosen"].append([items.add(messages, text) for text in record["chosen"]])
        table["rejected"].append([items.add(messages, text) for text in record["rejected"]])
    return items.items, table, resolved_revision


def padded(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Ragged lists of item rows as ``[examples, width]`` indices and a validity mask."""
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):  # once per evaluation, not in training
        index[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = True
    return index, mask


def correct(rewards: Tensor, table: dict[str, list[Any]]) -> Tensor:
    """``[examples, heads]`` booleans: min over chosen > max over rejected, per head.

    ``rewards`` ``[items, heads]`` are the heads' scores of every item.
    """
    chosen, chosen_mask = padded(table["chosen"])
    rejected, rejected_mask = padded(table["rejected"])
    inf = torch.tensor(float("inf"), dtype=rewards.dtype)
    worst_chosen = torch.where(chosen_mask[..., None], rewards[chosen], inf).amin(dim=1)
    best_rejected = torch.where(rejected_mask[..., None], rewards[rejected], -inf).amax(dim=1)
    return worst_chosen > best_rejected


def subset_accuracy(embeddings: Tensor, table: dict[str, list[Any]], heads: Tensor) -> dict[str, Tensor]:
    """Accuracy ``[heads]`` per subset, and ``mean`` (the unweighted mean over subsets, as RewardBench 2)."""
    hits = correct(embeddings.float() @ heads.float(), table).float()
    subsets = np.asarray(table["subset"])
    result = {name: hits[torch.from_numpy(subsets == name)].mean(0) for name in sorted(set(subsets))}
    result["mean"] = torch.stack(list(result.values())).mean(0)
    return result


def heads_of(basis_path: str | None, users: list[str] | None, reference_head: Tensor | None) -> dict[str, Tensor]:
    """The heads to score: ``reference`` (V_ref), each basis column ``basis/k``, each user's ``V w_u``."""
    heads = {}
    if reference_head is not None:
        heads["reference"] = reference_head
    if basis_path is not None:
        exported = load_basis(basis_path)
        for k in range(exported.rank):
            heads[f"basis/{k}"] = exported.basis[:, k]
        for user in users or []:
            if user not in exported.user_ids or exported.user_weights is None:
                raise ValueError(f"user {user!r} has no weights in {basis_path}")
            heads[f"user/{user}"] = exported.basis @ exported.user_weights[exported.user_ids.index(user)]
    if not heads:
        raise ValueError("nothing to score: an encoder has no reference head; give a basis_path")
    return heads


def evaluate_rewardbench(
    basis_path: str | None = None,
    users: list[str] | None = None,
    source: str = "allenai/reward-bench-2",
    revision: str = "main",
    embedder: EmbedderSpec | None = None,
    cache_dir: str = "cache/features",
    output: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Score the reference head, each basis column and the given users' heads on RewardBench 2.

    Args:
        basis_path: a ``basis.safetensors`` export or a ``BasisModule`` checkpoint (optional).
        users: seen users of the basis whose personalized heads ``V w_u`` are scored too.
        source: the Hub data set id, or a local file/directory in its schema.
        revision: the Hub revision.
        embedder: the model that embeds the completions (the one the basis was trained on).
        cache_dir: where embeddings are cached.
        output: write the scores to this JSON file.
        progress: show a progress bar while embedding.
    """
    from lore_pl.data.embedder import TextEmbedder
    from lore_pl.data.feature_cache import embed_missing

    spec = embedder if embedder is not None else EmbedderSpec()
    items, table, resolved = read_examples(source, revision)
    cache = FeatureCache(
        cache_dir,
        {"dataset": "RewardBench2", "revision": resolved, "embedder": spec.cache_key(template_id(spec))},
        name="RewardBench2",
    )
    if not cache.is_complete():
        cache.initialize(items, 1024)
        cache.write_table(table)
        embed_missing(cache, TextEmbedder(spec), progress=progress)
    embeddings, reference_head = cache.load()
    heads = heads_of(basis_path, users, reference_head)
    accuracy = subset_accuracy(embeddings, table, torch.stack(list(heads.values()), dim=1))
    scores = {name: {subset: float(acc[i]) for subset, acc in accuracy.items()} for i, name in enumerate(heads)}
    if output is not None:
        write_json_atomic(Path(output), scores)
    print(json.dumps(scores, indent=2))
    return scores


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(evaluate_rewardbench, args=args)


if __name__ == "__main__":
    main()
