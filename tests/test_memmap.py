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


def test_test_splits_kept_on_disk_give_the_same_protocol_numbers_as_in_memory(tmp_path):
    from callbacks.protocol import evaluate_protocol, logits_of
    from lore_pl.core.fewshot import FewShotSettings
    from lore_pl.data.preferences import PreferenceSplit

    in_memory = SyntheticPopulationDataModule(**TINY)
    on_disk = SyntheticPopulationDataModule(**TINY, test_features_dir=str(tmp_path))
    split = on_disk.split("seen_test")
    assert split.source == tmp_path / "seen_test.features.npy" and not in_memory.split("seen_test").source
    torch.manual_seed(0)
    model = BasisModule(estimator="adam", rank=3, lr=0.1)
    tiny_trainer(5).fit(model, datamodule=in_memory)
    settings = FewShotSettings(shots=4, steps=50)
    results = [evaluate_protocol(model.model, data, settings, shared=torch.ones(TINY["dim"], 1))
               for data in (in_memory, on_disk)]
    assert results[0] == results[1]
    assert 0.5 < results[1]["seen/test_acc"] < 1.0
    # evaluation reads the file, not the mapped tensor: a split whose tensor is zeros but whose source is
    # the file scores like the real one
    blind = PreferenceSplit(torch.zeros_like(split.features), split.users, split.user_ids, source=split.source)
    basis, weights = model.model.kept()
    streamed = logits_of(blind, basis, weights, 1.0, "cpu")
    torch.testing.assert_close(streamed, logits_of(split, basis, weights, 1.0, "cpu"))
    assert torch.count_nonzero(streamed) > 0
