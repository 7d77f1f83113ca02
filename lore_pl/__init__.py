"""lore-pl: personalized reward models by low-rank reward modeling (LoRe), in PyTorch Lightning."""

from lore_pl.basis import BasisModule
from lore_pl.embedding import EmbedderSpec, EmbeddingModule
from lore_pl.export import BasisFile, load_basis, save_basis
from lore_pl.fewshot import FewShotModule, fit_user_weights
from lore_pl.metrics import PerUserAccuracy
from lore_pl.preferences import PreferenceSplit

__all__ = [
    "BasisFile",
    "BasisModule",
    "EmbedderSpec",
    "EmbeddingModule",
    "FewShotModule",
    "PerUserAccuracy",
    "PreferenceSplit",
    "fit_user_weights",
    "load_basis",
    "save_basis",
]
