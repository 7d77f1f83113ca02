"""lore-pl: personalized reward models by low-rank reward modeling (LoRe), in PyTorch Lightning.

Names are imported lazily, so ``lore_pl.scoring`` (and ``lore_pl.export``) work without importing
Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "BasisFile": "lore_pl.export",
    "load_basis": "lore_pl.export",
    "save_basis": "lore_pl.export",
    "BasisModule": "lore_pl.basis",
    "FewShotModule": "lore_pl.fewshot",
    "fit_user_weights": "lore_pl.functional",
    "PerUserAccuracy": "lore_pl.metrics",
    "PreferenceSplit": "lore_pl.preferences",
    "PersonalRewardModel": "lore_pl.scoring",
    "EmbedderSpec": "lore_pl.embedding",
    "EmbeddingModule": "lore_pl.embedding",
    "LoreDataError": "lore_pl.errors",
    "LoreDataWarning": "lore_pl.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lore_pl' has no attribute {name!r}")
