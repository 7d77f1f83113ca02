"""An on-disk cache of text embeddings: memory-mappable ``.npy`` shards plus a JSON manifest.

One cache directory per key (data set revision, model, template, max length, ...). Every file is
written to a temporary name and renamed into place, so a killed job leaves only whole shards; a
rerun embeds just the shards that are missing, and a complete cache embeds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

MANIFEST = "manifest.json"
ITEMS = "items.json"
REFERENCE_HEAD = "reference_head.npy"


def stable_hash(payload: Any) -> str:
    """sha256 of the canonical JSON form of ``payload``."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(stream)`` into a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w") as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, lambda stream: json.dump(payload, stream, ensure_ascii=False))


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda stream: np.save(stream, array), binary=True)


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
        return json.loads(self.manifest_path.read_text())

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
        return json.loads((self.directory / ITEMS).read_text())

    # -------------------------------------------------------------------------------- shards
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

    def write_reference_head(self, head: Tensor) -> None:
        write_npy_atomic(self.directory / REFERENCE_HEAD, head.detach().float().cpu().numpy())

    def finalize(self) -> None:
        """Mark the cache complete once every shard is on disk (dimensions checked)."""
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"feature cache {self.directory}: shards {missing[:5]}... are missing")
        manifest = self._require_manifest()
        dims = {np.load(self.shard_path(i), mmap_mode="r").shape[1] for i in range(manifest["num_shards"])}
        if len(dims) > 1:
            raise RuntimeError(f"feature cache {self.directory}: shards have different dimensions {sorted(dims)}")
        manifest.update(dim=dims.pop() if dims else None, complete=True,
                        has_reference_head=(self.directory / REFERENCE_HEAD).is_file())
        write_json_atomic(self.manifest_path, manifest)

    # ------------------------------------------------------------------------------- reading
    def load(self) -> tuple[Tensor, Tensor | None]:
        """(embeddings ``[num_items, d]``, reference head ``[d]`` or None) of a complete cache."""
        manifest = self._require_manifest()
        if not manifest.get("complete"):
            raise RuntimeError(f"feature cache {self.directory} is incomplete: run prepare_data (or the embed job) first")
        shards = [np.load(self.shard_path(i), mmap_mode="r") for i in range(manifest["num_shards"])]
        features = torch.from_numpy(np.concatenate(shards)) if shards else torch.zeros(0, 0)
        head_path = self.directory / REFERENCE_HEAD
        head = torch.from_numpy(np.load(head_path)) if head_path.is_file() else None
        return features, head

    def _require_manifest(self) -> dict[str, Any]:
        manifest = self.manifest()
        if manifest is None:
            raise RuntimeError(f"feature cache {self.directory} has no manifest: initialize it first")
        return manifest
