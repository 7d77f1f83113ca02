"""LightningDataModules that serve per-user preference tensors."""

from datamodules.base import ROLES, PreferenceData, PreferenceDataModule
from datamodules.candidates import CandidateFileDataModule
from datamodules.synthetic import SyntheticPopulationDataModule

__all__ = ["CandidateFileDataModule", "ROLES", "PreferenceData", "PreferenceDataModule", "SyntheticPopulationDataModule"]
