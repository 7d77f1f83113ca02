import pytest
import torch

from datamodules import SyntheticPopulationDataModule

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


@pytest.fixture
def tiny_data():
    """A tiny planted population, generated in-process."""
    data = SyntheticPopulationDataModule(**TINY)
    data.setup("fit")
    return data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


# ----------------------------------------------------------------------------------- real data
WORDS = (
    "the a an is are was be to of and or in on for with that this it you i we they what how why "
    "summary post reply answer question good bad best worst short long model user assistant system "
    "hello world cats dogs rain sun water tea coffee bread books music code python data paris france "
    "capital city one two three four five yes no please thanks sure here is my your"
).split()

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
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, num_labels=1, pad_token_id=0,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], max_position_embeddings=256)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory):
    """Path of a tiny random Llama reward model with its tokenizer (built once per session)."""
    return str(build_tiny_reward_model(tmp_path_factory.mktemp("tiny-llama-rm")))


def tiny_spec(model: str, kind: str = "reward_model", **kwargs):
    from lore_pl.embedding import EmbedderSpec

    return EmbedderSpec(model=model, kind=kind, max_length=64, dtype="float32", batch_size=3, **kwargs)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
