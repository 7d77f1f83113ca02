"""LightningDataModules that serve per-user preference tensors."""

from datamodules.base import ROLES, PreferenceData, PreferenceDataModule
from datamodules.embedded import EmbeddedPreferenceDataModule
from datamodules.preference_file import PreferenceFileDataModule
from datamodules.synthetic import SyntheticPopulationDataModule

__all__ = [
    "ROLES",
    "EmbeddedPreferenceDataModule",
    "PreferenceData",
    "PreferenceDataModule",
    "PreferenceFileDataModule",
    "SyntheticPopulationDataModule",
]
