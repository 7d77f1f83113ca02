import pytest
import torch

from datamodules import SyntheticPopulationDataModule

TINY = dict(
    dim=16,
    num_directions=3,
    responses_per_prompt=4,
    num_train_prompts=60,
    num_test_prompts=30,
    num_seen_users=12,
    num_unseen_users=6,
    train_prompts_per_user=10,
    fewshot_prompts_per_user=8,
    test_prompts_per_user=6,
    seed=0,
)


@pytest.fixture
def tiny_data():
    """A tiny planted population, generated in-process."""
    data = SyntheticPopulationDataModule(**TINY)
    data.setup("fit")
    return data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_trainer(max_epochs: int = 20, **kwargs):
    """A quiet CPU Trainer for tests."""
    from lightning import Trainer

    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    settings.update(kwargs)
    return Trainer(**settings)
