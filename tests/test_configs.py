"""Every shipped config parses and instantiates (no data are read, nothing is downloaded)."""


import pytest

from helpers import ROOT
from lore_pl import BasisModule, EmbeddingModule
from lore_pl.cli import build_cli


@pytest.mark.parametrize("name", ["tldr", "prism", "personalllm", "tulu1"])
def test_paper_and_embedding_configs_instantiate(name, tmp_path):
    fit = build_cli(["--config", str(ROOT / f"configs/experiment/{name}.yaml"),
                     f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    embed = build_cli(["--config", str(ROOT / f"configs/experiment/embed_{name}.yaml"), "--trainer.accelerator=cpu",
                       "--trainer.devices=1"], run=False)
    assert isinstance(fit.model, BasisModule) and isinstance(embed.model, EmbeddingModule)
    # the embedding job fills exactly the cache that fit reads: same data class, same source, same embedder
    assert type(fit.datamodule) is type(embed.datamodule)
    assert fit.datamodule.embedder_spec == embed.datamodule.embedder_spec
    if name == "tulu1":
        assert fit.datamodule.path == embed.datamodule.path and fit.datamodule.embedder_spec.kind == "encoder"
    else:
        assert fit.datamodule.embedder_spec.model == "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
        assert fit.datamodule.embedder_spec.dtype == "bfloat16"
        assert (fit.datamodule.source, fit.datamodule.revision) == (embed.datamodule.source, embed.datamodule.revision)
