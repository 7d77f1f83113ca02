"""An on-disk cache of text embeddings: memory-mappable ``.npy`` shards plus a JSON manifest.

One cache directory per key (data set revision, model, template, max length, ...). Every file is
written to a temporary name and renamed into place, so a killed job leaves only whole shards; a
rerun embeds just the shards that are missing, and a complete cache embeds nothing. The completed
manifest records each shard's rows, byte size and sha256, so a shard truncated or changed later is
detected (``verify``): ``load`` reports it, ``EmbeddedPreferenceDataModule.prepare_data`` re-embeds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lore_pl.data.atomic import write_json_atomic, write_npy_atomic
from lore_pl.data.files import hash_file, read_json, read_npy
from lore_pl.errors import LoreDataError

MANIFEST = "manifest.json"
ITEMS = "items.json"
TABLE = "table.json"  # what the items are (e.g. a data set's rows), beside them
REFERENCE_HEAD = "reference_head.npy"


def stable_hash(payload: Any) -> str:
    """sha256 of the canonical JSON form of ``payload``."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    return hash_file(path).hexdigest()


class FeatureCache:
    """Embeddings of a fixed list of items (texts), stored in shards of ``shard_size`` rows.

    Layout of ``<root>/<name>-<hash of key>/``: ``manifest.json`` (the key, the item count and hash,
    the shard size, the dimension, ``complete``), ``items.json`` (what was embedded, in order),
    ``shard-00000.npy``... (float32 ``[rows, d]``) and ``reference_head.npy`` where the embedder
    has one.
    """

    def __init__(self, root: str | Path, key: dict[str, Any], name: str = "features") -> None:
        self.key = dict(key)
        self.directory = Path(root) / f"{name}-{stable_hash(self.key)[:16]}"

    # ------------------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return read_json(self.manifest_path, "feature cache manifest")

    def is_complete(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest.get("complete"))

    def initialize(self, items: list[Any], shard_size: int) -> None:
        """Record the items to embed. Keeps finished shards when the same items were recorded before."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        items_hash = stable_hash(items)
        manifest = self.manifest()
        if manifest is not None:
            if manifest["items_sha256"] != items_hash or manifest["shard_size"] != shard_size:
                raise ValueError(
                    f"feature cache {self.directory} holds other items or another shard size than this run; "
                    "delete it or choose another cache_dir"
                )
            return
        write_json_atomic(self.directory / ITEMS, items)
        write_json_atomic(self.manifest_path, {
            "key": self.key, "num_items": len(items), "items_sha256": items_hash, "shard_size": shard_size,
            "num_shards": -(-len(items) // shard_size), "dim": None, "complete": False, "format": "npy float32",
        })

    def items(self) -> list[Any]:
        return read_json(self.directory / ITEMS, "feature cache item list")

    # -------------------------------------------------------------------------------- shards
    def write_table(self, table: Any) -> None:
        write_json_atomic(self.directory / TABLE, table)

    def table(self) -> Any:
        return read_json(self.directory / TABLE, "feature cache table")

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.npy"

    def shard_range(self, shard: int) -> tuple[int, int]:
        manifest = self._require_manifest()
        start = shard * manifest["shard_size"]
        return start, min(start + manifest["shard_size"], manifest["num_items"])

    def missing_shards(self) -> list[int]:
        manifest = self._require_manifest()
        return [i for i in range(manifest["num_shards"]) if not self.shard_path(i).is_file()]

    def write_shard(self, shard: int, embeddings: Tensor | np.ndarray) -> None:
        start, stop = self.shard_range(shard)
        array = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, Tensor) else embeddings
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != stop - start:
            raise ValueError(f"shard {shard} needs {stop - start} rows of embeddings, got shape {array.shape}")
        write_npy_atomic(self.shard_path(shard), array)

    def record_weights_digest(self, digest: str) -> None:
        """Record the ``weights_digest`` of the model about to embed the missing shards (a basis fitted on
        the cache keeps it). Shards embedded by other weights under the same name and settings (a model
        directory replaced mid-way) cannot share a cache with these: refused, naming both digests."""
        manifest = self._require_manifest()
        recorded = manifest.get("weights_digest")
        if recorded == digest:
            return
        if recorded is not None and len(self.missing_shards()) < manifest["num_shards"]:
            raise LoreDataError(
                f"feature cache {self.directory}: its shards were embedded by model weights {recorded}, the model "
                f"loaded now has {digest} (same name and settings, other weights); delete the directory to embed "
                "everything with this model"
            )
        manifest["weights_digest"] = digest
        write_json_atomic(self.manifest_path, manifest)

    def weights_digest(self) -> str:
        """The recorded ``weights_digest`` of the embedding model; "" for a cache filled before one was kept."""
        manifest = self.manifest() or {}
        return str(manifest.get("weights_digest") or "")

    def write_reference_head(self, head: Tensor) -> None:
        write_npy_atomic(self.directory / REFERENCE_HEAD, head.detach().float().cpu().numpy())

    def finalize(self) -> None:
        """Mark the cache complete once every shard is on disk: dimensions checked, and each shard's
        rows, size and sha256 recorded so later damage is detected."""
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"feature cache {self.directory}: shards {missing[:5]}... are missing")
        manifest = self._require_manifest()
        shards, dims = [], {}
        for i in range(manifest["num_shards"]):
            path = self.shard_path(i)
            array = read_npy(path, "feature cache shard", mmap_mode="r")
            dims.setdefault(array.shape[1], path.name)
            shards.append({"rows": int(array.shape[0]), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
        if len(dims) > 1:
            raise LoreDataError(f"feature cache {self.directory}: shards have different embedding dimensions "
                                f"{dict(sorted(dims.items()))} (dimension: first shard with it)")
        manifest.update(dim=next(iter(dims)) if dims else None, complete=True, shards=shards,
                        has_reference_head=(self.directory / REFERENCE_HEAD).is_file())
        write_json_atomic(self.manifest_path, manifest)

    def verify(self, checksums: bool = True) -> dict[int, str]:
        """Damaged shards of a complete cache: ``{shard: what is wrong}`` (empty: all good).

        Checks every shard against the manifest: present, byte size, a readable ``.npy`` of
        ``[rows, dim]`` float32 and, with ``checksums``, its sha256 (reads every byte).
        """
        manifest = self._require_manifest()
        recorded = manifest.get("shards") or [None] * manifest["num_shards"]  # caches from before: no record
        problems = {}
        for i, record in enumerate(recorded):
            path = self.shard_path(i)
            start, stop = self.shard_range(i)
            if not path.is_file():
                problems[i] = "missing"
                continue
            if record is not None and path.stat().st_size != record["bytes"]:
                problems[i] = f"{path.stat().st_size} bytes, the manifest says {record['bytes']} (truncated?)"
                continue
            try:
                array = np.load(path, mmap_mode="r")
            except Exception as error:  # a truncated or garbled .npy header
                problems[i] = f"not a readable .npy file ({error})"
                continue
            expected = (stop - start, manifest["dim"]) if manifest.get("dim") is not None else None
            if array.dtype != np.float32 or array.ndim != 2 or (expected and array.shape != expected):
                problems[i] = f"holds {array.dtype} {array.shape}, the manifest says float32 {expected}"
            elif checksums and record is not None and file_sha256(path) != record["sha256"]:
                problems[i] = "its sha256 differs from the manifest's (the file changed after it was written)"
        return problems

    def invalidate(self, shards: list[int]) -> None:
        """Delete ``shards`` and mark the cache incomplete, so the next run embeds them again."""
        manifest = self._require_manifest()
        for shard in shards:
            self.shard_path(shard).unlink(missing_ok=True)
        manifest.update(complete=False)
        manifest.pop("shards", None)
        write_json_atomic(self.manifest_path, manifest)

    # ------------------------------------------------------------------------------- reading
    def load(self, checksums: bool = False) -> tuple[Tensor, Tensor | None]:
        """(embeddings ``[num_items, d]``, reference head ``[d]`` or None) of a complete cache.

        Each shard is first checked against the manifest (size and shape; sha256 too with
        ``checksums``): a damaged shard raises ``LoreDataError`` naming it.
        """
        manifest = self._require_manifest()
        if not manifest.get("complete"):
            raise RuntimeError(f"feature cache {self.directory} is incomplete: run prepare_data (or the embed job) "
                               "first")
        problems = self.verify(checksums)
        if problems:
            shard, what = next(iter(problems.items()))
            raise LoreDataError(
                f"feature cache {self.directory}: {len(problems)} damaged shard(s), e.g. "
                f"{self.shard_path(shard).name}: {what}; run prepare_data (fit does) to re-embed them, or delete the "
                "directory"
            )
        shards = [read_npy(self.shard_path(i), "feature cache shard", mmap_mode="r")
                  for i in range(manifest["num_shards"])]
        features = torch.from_numpy(np.concatenate(shards)) if shards else torch.zeros(0, 0)
        head_path = self.directory / REFERENCE_HEAD
        head = torch.from_numpy(read_npy(head_path, "reference head")) if head_path.is_file() else None
        return features, head

    def _require_manifest(self) -> dict[str, Any]:
        manifest = self.manifest()
        if manifest is None:
            raise RuntimeError(f"feature cache {self.directory} has no manifest: initialize it first")
        return manifest


class MissingShards(Dataset):
    """One element per shard still to embed: ``{"shard": index, "items": [...]}``."""

    def __init__(self, cache: FeatureCache, items: list[Any] | None = None) -> None:
        self.cache = cache
        self.items = cache.items() if items is None else items
        self.shards = cache.missing_shards()

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, stop = self.cache.shard_range(self.shards[index])
        return {"shard": self.shards[index], "items": self.items[start:stop]}

    def loader(self) -> DataLoader:
        # batch_size=None: each element is already a batch (one shard); nothing to collate.
        return DataLoader(self, batch_size=None, collate_fn=lambda element: element)


def embed_missing(cache: FeatureCache, embedder, progress: bool = True) -> int:
    """Embed the cache's missing shards in this process with ``embedder`` (a ``TextEmbedder``) and
    complete the cache. Returns the number of shards embedded."""
    from tqdm.auto import tqdm

    shards = MissingShards(cache)
    manifest = cache.manifest()
    total = sum(cache.shard_range(s)[1] - cache.shard_range(s)[0] for s in shards.shards)
    if shards.shards:
        cache.record_weights_digest(embedder.weights_digest())
    with tqdm(total=total, desc=f"embedding {manifest['num_items']} texts", unit="text", disable=not progress) as bar:
        for element in shards:
            cache.write_shard(element["shard"], embedder(element["items"]))
            bar.update(len(element["items"]))
    head = embedder.reference_head
    if head is not None:
        cache.write_reference_head(head)
    cache.finalize()
    return len(shards)
