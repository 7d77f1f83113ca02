import numpy as np
import pytest
import torch

from datamodules import MemmapPreferenceDataModule, SyntheticPopulationDataModule, write_memmap_dataset
from helpers import TINY, tiny_trainer
from lore_pl import BasisModule


def test_memmap_training_equals_in_memory_training(tmp_path):
    in_memory = SyntheticPopulationDataModule(**TINY, batch_size=16)
    directory = write_memmap_dataset(tmp_path / "features", in_memory.data)
    mapped = MemmapPreferenceDataModule(str(directory), batch_size=16, eval_batch_size=7)
    # the features are a view of the file, not a copy
    assert isinstance(np.load(directory / "seen_train.features.npy", mmap_mode="c"), np.memmap)
    assert mapped.seen_user_ids == in_memory.seen_user_ids and mapped.dim == in_memory.dim
    torch.testing.assert_close(mapped.reference_head, in_memory.reference_head)

    results = []
    for data in (in_memory, mapped):
        torch.manual_seed(0)
        model = BasisModule(estimator="adam", rank=3, lr=0.1)
        trainer = tiny_trainer(4, limit_val_batches=1.0)
        trainer.fit(model, datamodule=data)
        results.append(
            (model.model.basis.detach(), model.model.user_logits.detach(), float(trainer.callback_metrics["val/acc"]))
        )
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
    assert int(model.iterations_done) == 4 * -(-len(in_memory.split("seen_train")) // 16)  # mini-batches


def test_memmap_layout_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="users.json"):
        MemmapPreferenceDataModule(str(tmp_path)).setup()
    write_memmap_dataset(tmp_path, SyntheticPopulationDataModule(**TINY).data)
    np.save(tmp_path / "seen_train.features.npy", np.zeros((3, 2), dtype=np.float64))
    with pytest.raises(ValueError, match="seen_train.features.npy: features must be a float32"):
        MemmapPreferenceDataModule(str(tmp_path)).setup()
