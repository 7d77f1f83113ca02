"""Fixtures; what the tests share otherwise is in ``helpers.py``."""

import pytest
import torch

from datamodules import SyntheticPopulationDataModule
from helpers import TINY, build_tiny_reward_model


@pytest.fixture
def tiny_data():
    """A tiny planted population, generated in-process."""
    data = SyntheticPopulationDataModule(**TINY)
    data.setup("fit")
    return data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory):
    """Path of a tiny random Llama reward model with its tokenizer (built once per session)."""
    return str(build_tiny_reward_model(tmp_path_factory.mktemp("tiny-llama-rm")))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
