"""``lore-pl export hf``: a LoRe basis as one Hugging Face sequence-classification checkpoint.

A user's LoRe reward is linear in the reward model's last-token hidden state h (what ``TextEmbedder``
computes for the ``reward_model`` kind): ``reward_u(text) = h(text) . V w_u``. So the base reward
model with its one-output ``score`` layer replaced by ``Linear(d, C, bias=False)``, row u = ``(V w_u)^T``,
gives every user's reward in one forward pass: ``logits[:, u]``; ``config.id2label`` names the users.
With ``--heads basis`` the layer has one output per basis column (``V^T``) and the users' weights go
to a side file, so a consumer computes ``logits @ w_u`` (and can add users without a new checkpoint).

The base weights are copied (``--weights copy``) or, for safetensors checkpoints, linked
(``--weights link``): every base weight file is a symlink except the one that holds ``score.weight``,
which is rewritten with the new score. transformers 5 reads every tensor of every listed file (not
only those the index maps to it), so a linked file must not hold a second ``score.weight``.

The base model must be the very model the basis was embedded with: its ``weights_digest`` (of every
weight, not only the score head) is compared with the one the basis recorded. Where the export goes
and what ``--overwrite`` may replace: ``lore_pl.experiments.export_destination``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lore_pl.data.basis_file import FORMAT as BASIS_FORMAT
from lore_pl.data.basis_file import BasisFile, load_basis, resolve_basis_path
from lore_pl.data.embedder import EmbedderSpec, load_model, load_tokenizer, resolve_model_path, weights_digest
from lore_pl.errors import LoreDataError
from lore_pl.experiments.export_destination import (
    check_destination,
    check_not_protected,
    destination,
    publish_directory,
)
from lore_pl.inference import PersonalRewardModel

#: ``config.json["lore_pl"]["format"]`` of an exported checkpoint
EXPORT_FORMAT = "lore-pl-hf/1"
#: the side file of ``--heads basis``: tensor ``user_weights`` [C, K], metadata ``user_ids`` (JSON)
USER_WEIGHTS_FILE = "lore_user_weights.safetensors"
USER_IDS_FILE = "lore_user_ids.json"
SCORE_KEY = "score.weight"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def text_spec(basis: BasisFile, path: Path) -> EmbedderSpec:
    """The reward-model embedder the basis was trained on; a clear refusal for any other features."""
    try:
        spec = EmbedderSpec.from_identity(basis.embedder)
    except LoreDataError as error:
        raise LoreDataError(f"{path}: cannot export to Hugging Face: {error}") from None
    if spec.kind != "reward_model":
        raise LoreDataError(f"{path}: the basis was trained on a sentence encoder's mean-pooled embeddings "
                            f"({spec.model}); a sequence-classification head reads one token's hidden state, "
                            "so only bases of kind 'reward_model' can be exported")
    return spec


def check_basis(basis: BasisFile, path: Path) -> None:
    # NaN/Inf: load_basis refuses them already, for basis files and checkpoints alike
    if len(set(basis.user_ids)) != len(basis.user_ids):
        repeated = sorted({u for u in basis.user_ids if basis.user_ids.count(u) > 1})
        raise LoreDataError(f"{path}: user ids repeat ({repeated[:5]}); id2label needs one label per user")


#: ``--user`` for every user's output (the default); any other value names one user
ALL_USERS = "all"


def score_rows(model: PersonalRewardModel, heads: str, user: str = ALL_USERS) -> tuple[Tensor, list[str]]:
    """The new score layer's weight ``[outputs, d]`` and its labels; for one ``user``, their head ``V w_u``
    alone (one output: the single logit OpenRLHF's and verl's reward-model workers read)."""
    if user != ALL_USERS:
        if user not in model.user_ids:
            raise LoreDataError(f"{model.source}: --user {user!r} is not among the {len(model.user_ids)} users of "
                                "the basis")
        return model.head(user)[None].contiguous(), [user]
    if heads == "users":
        if not model.user_ids:
            raise LoreDataError("the basis holds no users; export it with --heads basis and add users' weights")
        return (model.basis @ model.user_weights.T).T.contiguous(), list(model.user_ids)
    return model.basis.T.contiguous(), [f"basis-{k}" for k in range(model.basis_rank)]


def check_reference_head(reference: Tensor | None, base_score: Tensor, spec: EmbedderSpec, where: str) -> None:
    """The basis recorded the base model's score head (``V_ref``); a different one means a different
    model (another revision, a retrained copy), whose hidden states the basis does not fit."""
    if base_score.ndim != 2 or base_score.shape[0] != 1:
        raise LoreDataError(f"{where}: the base reward model's score layer has shape {tuple(base_score.shape)}, "
                            "not one output")
    if reference is None:
        return
    seen = base_score[0].to(getattr(torch, spec.dtype)).float()
    if seen.shape != reference.shape or not torch.allclose(seen, reference.float(), rtol=1e-5, atol=1e-6):
        raise LoreDataError(f"{where}: the base reward model's score head is not the V_ref the basis recorded; "
                            "this is not the model whose hidden states the basis was trained on")


#: (the digest the base model's weights must have, where it came from); None: nothing to compare
ExpectedWeights = tuple[str, str] | None


def local_directory(model: str) -> Path | None:
    """The directory of a local model (``package:NAME`` resolved); None for a Hub id or a missing path."""
    try:
        path = Path(resolve_model_path(model))
    except ImportError:
        return None
    return path if path.is_dir() else None


def load_reward_model(path: str | os.PathLike, spec: EmbedderSpec) -> nn.Module:
    """The reward model at ``path`` as ``TextEmbedder`` loads it (``spec.dtype``), for its weights only."""
    from transformers import AutoModelForSequenceClassification

    return load_model(AutoModelForSequenceClassification, str(path), revision=spec.revision,
                      dtype=getattr(torch, spec.dtype))


def expected_weights(basis: BasisFile, recorded: EmbedderSpec, base_model: str | None, where: str) -> ExpectedWeights:
    """What the base model's ``weights_digest`` must be: the one the basis recorded at embedding time;
    for a basis from before lore-pl recorded one, with ``--base-model``, that of the model the basis names
    (a local directory), else a refusal; without either, nothing (the recorded model itself is loaded)."""
    if basis.embedder_weights:
        return basis.embedder_weights, "the basis's record"
    if base_model is None:
        return None
    original = local_directory(recorded.model)
    if original is None:
        raise LoreDataError(f"{where}: the basis records no digest of its model's weights (it was fitted before "
                            f"lore-pl kept one) and its model {recorded.model!r} is not a local directory to compute "
                            "one from, so --base-model cannot be checked to be that model; export without "
                            "--base-model where the model is, or embed and fit again to record the digest")
    return weights_digest(load_reward_model(original, recorded)), f"that of {original}"


def check_weights(expected: ExpectedWeights, seen: str, base: str, recorded: EmbedderSpec, where: str) -> None:
    """The base model is the model the basis was embedded with, every weight of it (a same score head on
    another body would give other rewards than ``score_text``)."""
    if expected is None or seen == expected[0]:
        return
    what = (f"the base model {base} is not the model the basis was embedded with ({recorded.model})"
            if base != recorded.model else f"the model {base} changed since the basis was embedded")
    raise LoreDataError(f"{where}: {what}: its weights digest is {seen[:40]}..., {expected[1]} is "
                        f"{expected[0][:40]}...; give the very model the features came from")


def check_pooling(tokenizer, pad_token_id: int | None, where: str) -> None:
    """transformers pools the rightmost token that is not ``pad_token_id``; TextEmbedder pools the last
    attended one. They agree unless a rendered text ends in the pad token (e.g. pad = eos and the chat
    template ends every turn with eos), which would shift the head onto another token."""
    if pad_token_id is None:
        raise LoreDataError(f"{where}: the tokenizer has no pad token, so the exported model could not find "
                            "the last token of a padded batch")
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]
    ids = tokenizer(tokenizer.apply_chat_template(probe, tokenize=False), add_special_tokens=False)["input_ids"]
    if ids and ids[-1] == pad_token_id:
        raise LoreDataError(f"{where}: the chat template ends texts with the pad token "
                            f"({tokenizer.pad_token!r}, id {pad_token_id}), so transformers would score an earlier "
                            "token than the one the basis was trained on; give the base model a distinct pad token")


def configure(config, rows: Tensor, labels: list[str], metadata: dict, pad_token_id: int, dtype: str) -> None:
    config.num_labels = rows.shape[0]
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "regression"  # outputs are rewards, not classes
    config.pad_token_id = pad_token_id
    config.dtype = dtype  # the features were computed in this dtype; from_pretrained(dtype="auto") uses it
    config.lore_pl = metadata


def save_tokenizer(tokenizer, out: Path, spec: EmbedderSpec) -> None:
    """The tokenizer as the features were made: the end of a long text kept, at most ``max_length``
    tokens. Attributes set after loading are not saved; what the tokenizer was built with is."""
    tokenizer.init_kwargs.update(truncation_side="left", padding_side="right")
    tokenizer.model_max_length = spec.max_length
    tokenizer.save_pretrained(out)


def write_side_files(directory: Path, model: PersonalRewardModel) -> None:
    from safetensors.torch import save_file

    weights = model.user_weights.detach().float().cpu().contiguous()
    save_file({"user_weights": weights}, str(directory / USER_WEIGHTS_FILE),
              metadata={"format": "pt", "user_ids": json.dumps(model.user_ids)})
    (directory / USER_IDS_FILE).write_text(json.dumps(model.user_ids, ensure_ascii=False))


def base_weight_files(base: Path) -> dict[str, list[str]]:
    """Each safetensors file of the base checkpoint and the keys it holds (from the headers only)."""
    from safetensors import safe_open

    if (base / SAFE_INDEX).is_file():
        names = sorted(set(json.loads((base / SAFE_INDEX).read_text())["weight_map"].values()))
    elif (base / SAFE_WEIGHTS).is_file():
        names = [SAFE_WEIGHTS]
    else:
        raise LoreDataError(f"{base}: --weights link needs safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX}); "
                            "use --weights copy")
    files = {}
    for name in names:
        with safe_open(str(base / name), framework="pt") as handle:
            files[name] = list(handle.keys())
    return files


def local_model_dir(spec: EmbedderSpec) -> Path:
    path = resolve_model_path(spec.model)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=spec.revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))


def build_linked(out: Path, spec: EmbedderSpec, basis: BasisFile, rows: Tensor, labels: list[str],
                 metadata: dict, where: str, check_model: Callable[[nn.Module], None] | None) -> None:
    """Symlinks to the base's weight files, but the one holding ``score.weight``: that one is rewritten
    (its other tensors as they are, the new score beside them), so no listed file holds a stale score."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    base = local_model_dir(spec)
    if check_model is not None:  # the weights are linked, not loaded: load them only to compare
        check_model(load_reward_model(base, spec))
    files = base_weight_files(base)
    holders = [name for name, keys in files.items() if SCORE_KEY in keys]
    if len(holders) != 1:
        raise LoreDataError(f"{base}: expected one weight file holding {SCORE_KEY!r}, found {len(holders)}; "
                            "use --weights copy")
    tokenizer = load_tokenizer(spec)
    check_pooling(tokenizer, tokenizer.pad_token_id, where)
    config = AutoConfig.from_pretrained(base)
    if config.get_text_config().hidden_size != basis.dim:
        raise LoreDataError(f"{where}: the base model's hidden size is {config.get_text_config().hidden_size}, "
                            f"the basis has d={basis.dim}")
    for name in files:
        if name != holders[0]:
            (out / name).symlink_to((base / name).resolve())
    with safe_open(str(base / holders[0]), framework="pt") as handle:
        file_metadata = handle.metadata() or {}
        names = handle.keys()  # a safe_open handle is not a mapping
        tensors = {key: handle.get_tensor(key) for key in names}
    old_score = tensors[SCORE_KEY]
    check_reference_head(basis.reference_head, old_score, spec, where)
    tensors[SCORE_KEY] = rows.to(old_score.dtype).contiguous()
    save_file(tensors, str(out / holders[0]), metadata={**file_metadata, "format": "pt"})
    if (base / SAFE_INDEX).is_file():
        index = json.loads((base / SAFE_INDEX).read_text())
        metadata_of_index = index.get("metadata") or {}
        if "total_size" in metadata_of_index:  # the score grew from one row to C (or K)
            grown = (rows.numel() - old_score.numel()) * old_score.element_size()
            metadata_of_index["total_size"] = int(metadata_of_index["total_size"]) + grown
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    configure(config, rows, labels, metadata, tokenizer.pad_token_id, spec.dtype)
    config.save_pretrained(out)
    save_tokenizer(tokenizer, out, spec)


def build_copied(out: Path, spec: EmbedderSpec, basis: BasisFile, rows: Tensor, labels: list[str],
                 metadata: dict, where: str, check_model: Callable[[nn.Module], None] | None) -> None:
    from lore_pl.data.embedder import TextEmbedder

    embedder = TextEmbedder(spec)  # the very model and tokenizer set-up the features came from
    model, tokenizer = embedder.model, embedder.tokenizer
    if check_model is not None:
        check_model(model)
    check_pooling(tokenizer, tokenizer.pad_token_id, where)
    check_reference_head(basis.reference_head, model.score.weight.detach(), spec, where)
    if model.score.in_features != basis.dim:
        raise LoreDataError(f"{where}: the base model's hidden size is {model.score.in_features}, "
                            f"the basis has d={basis.dim}")
    old = model.score.weight
    model.score = nn.Linear(basis.dim, rows.shape[0], bias=False, dtype=old.dtype, device=old.device)
    with torch.no_grad():
        model.score.weight.copy_(rows)
    model.num_labels = rows.shape[0]
    configure(model.config, rows, labels, metadata, tokenizer.pad_token_id, spec.dtype)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out, spec)


def export_hf(run: str | os.PathLike, out: str | os.PathLike, heads: str = "users", weights: str = "copy",
              overwrite: bool = False, base_model: str | None = None, user: str = ALL_USERS) -> Path:
    """Write the basis of ``run`` (a run directory or a basis file) as a Hugging Face checkpoint in ``out``.

    Args:
        heads: ``users`` (one output per user, ``V w_u``) or ``basis`` (one per basis column, ``V^T``,
            and the users' weights in ``lore_user_weights.safetensors``).
        weights: ``copy`` the base model's weights, or ``link`` to them (symlinks; safetensors only).
        overwrite: replace an earlier export in ``out`` (one holding the export marker and nothing else;
            never the run, the base model, the current or home directory or one above them).
        base_model: load the base reward model from here instead of the recorded ``spec.model`` (a moved
            copy); its weights must be the model's the basis was embedded with (``expected_weights``).
        user: ``all`` (every user's output, as ``heads``), or one user id: a checkpoint with one output,
            that user's reward (``num_labels=1``), what OpenRLHF's and verl's reward-model workers load.
    """
    if heads not in ("users", "basis"):
        raise ValueError(f"--heads must be 'users' or 'basis', got {heads!r}")
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"--user must be a user id or '{ALL_USERS}', got {user!r:.60}")
    if user != ALL_USERS and heads == "basis":
        raise ValueError("--user ID writes that user's one output; --heads basis writes the basis columns: "
                         "give one of them")
    if weights not in ("copy", "link"):
        raise ValueError(f"--weights must be 'copy' or 'link', got {weights!r}")
    path = resolve_basis_path(run)
    basis = load_basis(path)
    recorded = text_spec(basis, path)
    check_basis(basis, path)
    model = PersonalRewardModel(basis, str(path))
    rows, labels = score_rows(model, heads, user)  # an unknown --user is refused before any model loads
    where = f"{path} (base model {base_model or recorded.model})"
    spec = recorded if base_model is None else replace(recorded, model=base_model)
    out = destination(out)
    protected = [(path.parent, f"the directory of the basis {path}")]
    protected += [(model_dir, f"the base model {model_dir}") for model_dir in
                  {local_directory(spec.model), local_directory(recorded.model)} - {None}]
    check_not_protected(out, protected)  # before a model is loaded: a refusal costs nothing
    check_destination(out, overwrite)
    expected = expected_weights(basis, recorded, base_model, where)
    metadata = {
        "format": EXPORT_FORMAT,
        "heads": heads if user == ALL_USERS else "user",
        "user": None if user == ALL_USERS else user,
        "outputs": labels if heads == "basis" else "user_ids (id2label)",
        "user_weights_file": USER_WEIGHTS_FILE if heads == "basis" else None,
        "tau": float(basis.tau),
        "rank": basis.rank,
        "dim": basis.dim,
        "num_users": len(basis.user_ids),
        "basis_format": BASIS_FORMAT,
        "basis_file": str(path.absolute()),
        "embedder": basis.embedder,
        "base_model": spec.model,
        "weights": weights,
        # how the features were made: the chat template, no added special tokens, the end kept
        "max_length": spec.max_length,
        "add_special_tokens": False,
        "truncation_side": "left",
    }
    build = build_linked if weights == "link" else build_copied

    def check_model(base: nn.Module) -> None:
        check_weights(expected, weights_digest(base), spec.model, recorded, where)

    def fill(directory: Path) -> None:
        build(directory, spec, basis, rows, labels, metadata, where, None if expected is None else check_model)
        if heads == "basis":
            write_side_files(directory, model)

    return publish_directory(out, fill, overwrite, protected)


def main(args: list[str] | None = None) -> None:
    """``lore-pl export hf --run RUN --out DIR [--heads users|basis] [--user ID|all] [--weights copy|link]
    [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="lore-pl export", description="Export a LoRe basis to another format.")
    formats = parser.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="one Hugging Face AutoModelForSequenceClassification checkpoint",
                            description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    hf.add_argument("--run", required=True, help="a run directory holding basis.safetensors, or a basis file")
    hf.add_argument("--out", required=True,
                    help="the directory to write (created; refused if not empty, but for an earlier export with "
                         "--overwrite)")
    hf.add_argument("--heads", choices=("users", "basis"), default="users",
                    help="users: one output per user (default); basis: one per basis column + the users' weights")
    hf.add_argument("--user", default=ALL_USERS,
                    help="one user id: a checkpoint with one output, that user's reward (what OpenRLHF's and verl's "
                         "reward-model workers load); 'all' (default): an output per user (--heads)")
    hf.add_argument("--weights", choices=("copy", "link"), default="copy",
                    help="copy the base model's weights (default) or symlink its safetensors files")
    hf.add_argument("--overwrite", action="store_true",
                    help="replace an earlier export in --out (only a directory an export wrote, holding nothing else)")
    hf.add_argument("--base-model", default=None,
                    help="where the base reward model is now, if not where the basis recorded it (the very model: "
                         "its weights are compared with the digest the basis recorded)")
    options = parser.parse_args(sys.argv[1:] if args is None else args)
    try:
        written = export_hf(options.run, options.out, heads=options.heads, weights=options.weights,
                            overwrite=options.overwrite, base_model=options.base_model, user=options.user)
    except (LoreDataError, OSError, ValueError) as error:  # OSError: a base model or file that is not there
        if os.environ.get("LORE_PL_TRACEBACK"):
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)  # one line, as lore_pl.cli
        sys.exit(2)
    outputs = f"{options.heads} heads" if options.user == ALL_USERS else f"one output: user {options.user!r}"
    print(f"written: {written} ({outputs}, {options.weights} weights)")
