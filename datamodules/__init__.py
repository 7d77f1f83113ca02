"""LightningDataModules that serve per-user preference tensors."""

from datamodules.base import ROLES, PreferenceData, PreferenceDataModule
from datamodules.candidates import CandidateFileDataModule
from datamodules.embedded import EmbeddedPreferenceDataModule
from datamodules.personal_llm import PersonalLLMDataModule
from datamodules.preference_file import PreferenceFileDataModule
from datamodules.prism import PRISMDataModule
from datamodules.reddit_tldr import RedditTLDRDataModule
from datamodules.synthetic import SyntheticPopulationDataModule

__all__ = [
    "ROLES",
    "CandidateFileDataModule",
    "EmbeddedPreferenceDataModule",
    "PreferenceData",
    "PreferenceDataModule",
    "PersonalLLMDataModule",
    "PreferenceFileDataModule",
    "PRISMDataModule",
    "RedditTLDRDataModule",
    "SyntheticPopulationDataModule",
]
