"""LightningDataModules that serve per-user preference tensors."""

from datamodules.base import ROLES, PreferenceData, PreferenceDataModule
from datamodules.candidates import CandidateFileDataModule
from datamodules.embedded import EmbeddedPreferenceDataModule
from datamodules.memmap import MemmapPreferenceDataModule, write_memmap_dataset
from datamodules.personal_llm import PersonalLLMDataModule
from datamodules.preference_file import PreferenceFileDataModule
from datamodules.prism import PRISMDataModule
from datamodules.reddit_tldr import RedditTLDRDataModule
from datamodules.responses import ResponseFileDataModule
from datamodules.synthetic import SyntheticPopulationDataModule

__all__ = [
    "ROLES",
    "CandidateFileDataModule",
    "EmbeddedPreferenceDataModule",
    "MemmapPreferenceDataModule",
    "PreferenceData",
    "PreferenceDataModule",
    "PersonalLLMDataModule",
    "PreferenceFileDataModule",
    "PRISMDataModule",
    "RedditTLDRDataModule",
    "ResponseFileDataModule",
    "SyntheticPopulationDataModule",
    "write_memmap_dataset",
]
