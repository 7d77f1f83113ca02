"""What the tests share: tiny data and trainers, a tiny random reward model, small preference files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = [
    "--data.init_args.dim=16", "--data.init_args.num_directions=3", "--data.init_args.num_train_prompts=80",
    "--data.init_args.num_test_prompts=40", "--data.init_args.num_seen_users=20",
    "--data.init_args.num_unseen_users=8", "--data.init_args.train_prompts_per_user=12",
    "--data.init_args.fewshot_prompts_per_user=10", "--data.init_args.test_prompts_per_user=8",
]

TINY = dict(
    dim=16,
    num_directions=3,
    responses_per_prompt=4,
    num_train_prompts=60,
    num_test_prompts=30,
    num_seen_users=12,
    num_unseen_users=6,
    train_prompts_per_user=10,
    fewshot_prompts_per_user=8,
    test_prompts_per_user=6,
    seed=0,
)


def tiny_trainer(max_epochs: int = 20, **kwargs):
    """A quiet CPU Trainer for tests."""
    from lightning import Trainer

    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    settings.update(kwargs)
    return Trainer(**settings)


def run_dir(tmp_path: Path, name: str) -> Path:
    versions = sorted((tmp_path / "logs" / name).glob("version_*"))
    assert versions, f"no run directory under {tmp_path / 'logs' / name}"
    return versions[-1]


# ----------------------------------------------------------------------------------- real data
WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "be",
    "to",
    "of",
    "and",
    "or",
    "in",
    "on",
    "for",
    "with",
    "that",
    "this",
    "it",
    "you",
    "i",
    "we",
    "they",
    "what",
    "how",
    "why",
    "summary",
    "post",
    "reply",
    "answer",
    "question",
    "good",
    "bad",
    "best",
    "worst",
    "short",
    "long",
    "model",
    "user",
    "assistant",
    "system",
    "hello",
    "world",
    "cats",
    "dogs",
    "rain",
    "sun",
    "water",
    "tea",
    "coffee",
    "bread",
    "books",
    "music",
    "code",
    "python",
    "data",
    "paris",
    "france",
    "capital",
    "city",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
    "please",
    "thanks",
    "sure",
    "here",
    "is",
    "my",
    "your",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}"
)


def build_tiny_reward_model(directory):
    """A randomly initialised 2-layer Llama reward model (one score) and a word-level tokenizer with
    a chat template, saved to ``directory``. Built offline, in about a second."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<", ">"]
    vocab = {token: i for i, token in enumerate(specials + [w for w in dict.fromkeys(WORDS) if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        num_labels=1,
        pad_token_id=0,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        max_position_embeddings=256,
    )
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_spec(model: str, kind: str = "reward_model", **kwargs):
    from lore_pl.data.embedder import EmbedderSpec

    return EmbedderSpec(model=model, kind=kind, max_length=64, dtype="float32", batch_size=3, **kwargs)


def write_preferences(path, users=8, prompts=12, seed=0, chat_every=3):
    """A small preference file in the documented schema: every user judges some shared prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for p in rng.choice(prompts, size=6, replace=False):
            prompt = f"question {' '.join(WORDS[p : p + 4])}"
            if chat_every and p % chat_every == 0:
                prompt = [{"role": "system", "content": "be short"}, {"role": "user", "content": prompt}]
            a, b = " ".join(rng.choice(WORDS, 5)), " ".join(rng.choice(WORDS, 7))
            rows.append({"user_id": f"rater-{u}", "prompt": prompt, "chosen": a, "rejected": b + " long"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def make(path, model, tmp_path, **kwargs):
    """A PreferenceFileDataModule on ``path``, embedded by the tiny model into ``tmp_path``."""
    from datamodules import PreferenceFileDataModule

    settings = dict(cache_dir=str(tmp_path / "cache"), embedder=tiny_spec(model), shard_size=10, progress=False)
    settings.update(kwargs)
    return PreferenceFileDataModule(str(path), **settings)


def assert_validation_is_prompt_disjoint(data):
    """Every validation prompt is held out for everyone: in no training, pool or test split."""
    held = torch.cat([data.split(role).prompts for role in ("seen_val", "unseen_val") if data.has_split(role)])
    assert held.numel() > 0
    for role in ("seen_train", "seen_test", "unseen_pool", "unseen_test"):
        if data.has_split(role):
            assert not torch.isin(data.split(role).prompts, held).any(), role


def one_error_line(capsys, command, *args) -> str:
    """Run a CLI ``command(*args)``, expect exit 2 with one ``error:`` line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        command(*args)
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
