"""lore-pl: personalized reward models by low-rank reward modeling (LoRe), in PyTorch Lightning.

The package is layered; a module imports only from its own layer or those below it (a test checks):

1. ``lore_pl.core``: the math, the kernels, the model object and the few-shot solver (no Lightning, no files)
2. ``lore_pl.data``: data containers, embedding, the feature cache, basis files, atomic writes
3. ``lore_pl.modules`` (the LightningModules, metrics) and ``lore_pl.inference`` (no Lightning)
4. ``datamodules`` and ``callbacks`` (top-level packages beside ``lore_pl``)
5. ``lore_pl.experiments`` (the sweep and benchmark commands) and ``lore_pl.cli``

``lore_pl.errors`` sits below them all. Names are imported lazily, so ``lore_pl.inference`` (and the
basis files) work without importing Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "LoreModel": "lore_pl.core.model",
    "FewShotSettings": "lore_pl.core.fewshot",
    "fit_user_weights": "lore_pl.core.fewshot",
    "BasisFile": "lore_pl.data.basis_file",
    "load_basis": "lore_pl.data.basis_file",
    "save_basis": "lore_pl.data.basis_file",
    "PreferenceSplit": "lore_pl.data.preferences",
    "DataRequest": "lore_pl.data.preferences",
    "EmbedderSpec": "lore_pl.data.embedder",
    "BasisModule": "lore_pl.modules.basis",
    "FewShotModule": "lore_pl.modules.fewshot",
    "ScoringModule": "lore_pl.modules.scoring",
    "TextScoringModule": "lore_pl.modules.scoring",
    "EmbeddingModule": "lore_pl.modules.embedding",
    "PerUserAccuracy": "lore_pl.modules.metrics",
    "PersonalRewardModel": "lore_pl.inference",
    "LoreDataError": "lore_pl.errors",
    "LoreDataWarning": "lore_pl.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lore_pl' has no attribute {name!r}")
