"""LightningDataModules that serve per-user preference tensors."""

from datamodules.base import ROLES, PreferenceData, PreferenceDataModule
from datamodules.synthetic import SyntheticPopulationDataModule

__all__ = ["ROLES", "PreferenceData", "PreferenceDataModule", "SyntheticPopulationDataModule"]
