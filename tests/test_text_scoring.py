"""Text in, reward out: ``PersonalRewardModel.from_run`` and its text methods, and ``lightning predict``
on a JSONL of responses, against the features the training data module cached for the same texts."""

import csv
import json
from dataclasses import replace

import pytest
import torch

from callbacks import BasisExport
from datamodules import SyntheticPopulationDataModule
from datamodules.responses import read_response_rows
from helpers import ROOT, TINY, make, tiny_spec, tiny_trainer, write_preferences
from lore_pl import BasisModule, LoreDataError, PersonalRewardModel
from lore_pl.cli import build_cli
from lore_pl.data.basis_file import BasisFile, save_basis
from lore_pl.data.embedder import EmbedderSpec, TextEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")
COLUMNS = {"user_id": "user_id", "prompt": "prompt", "response": "response"}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_reward_model):
    """A basis fitted on a preference file embedded by the tiny reward model, exported into its run
    directory by ``BasisExport``; with the training cache's items, embeddings and pair table."""
    root = tmp_path_factory.mktemp("text-run")
    write_preferences(root / "prefs.jsonl")
    data = make(root / "prefs.jsonl", tiny_reward_model, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = root / "run"
        tiny_trainer(max_epochs=3, default_root_dir=str(run), callbacks=[BasisExport()]).fit(
            BasisModule(estimator="adam", rank=2), datamodule=data)
    finally:
        torch.set_num_threads(threads)
    embeddings, _ = data.feature_cache.load()
    table = json.loads((data.feature_cache.directory / "table.json").read_text())
    return run, data, data.feature_cache.items(), embeddings, table


def prompt_of(messages):
    """The prompt as a user would give it: a plain string for one user turn, else the chat list."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


def test_text_scores_are_the_training_features_scores(text_run, tiny_reward_model):
    run, data, items, embeddings, table = text_run
    model = PersonalRewardModel.from_run(run)
    assert model.embedder == data.embedder and model._text_embedder is None  # loaded only when text comes
    by_prompt = {}
    for row, (messages, response) in enumerate(items):
        by_prompt.setdefault(json.dumps(messages), (messages, []))[1].append((row, response))
    assert any(isinstance(prompt_of(m), list) for m, _ in by_prompt.values())  # chat prompts are among them
    assert any(isinstance(prompt_of(m), str) for m, _ in by_prompt.values())
    for user in model.user_ids[:2]:
        for messages, rows in by_prompt.values():
            expected = embeddings[[row for row, _ in rows]] @ model.head(user)  # e . V w_u of the cache
            rewards = model.score_text(prompt_of(messages), [response for _, response in rows], user)
            torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5)
            if len(rows) > 1 and len(set(expected.tolist())) == len(rows):
                assert model.rank_text(prompt_of(messages), [r for _, r in rows], user).tolist() == \
                    torch.argsort(expected, descending=True).tolist()
    # a pair's preference probability is sigmoid((e_c - e_r) . V w_u / tau) of the training features
    user = model.user_ids[0]
    for pair in range(4):
        chosen, rejected = table["chosen"][pair], table["rejected"][pair]
        messages = items[chosen][0]
        expected = torch.sigmoid((embeddings[chosen] - embeddings[rejected]) @ model.head(user) / model.tau)
        got = model.preference_probability_text(prompt_of(messages), items[chosen][1], items[rejected][1], user)
        torch.testing.assert_close(got, expected[None], atol=1e-5, rtol=1e-5)
    recorded = replace(tiny_spec(tiny_reward_model), batch_size=EmbedderSpec().batch_size)  # not in the identity
    assert model.text_embedder.spec == model.embedder_spec == recorded


def test_personalize_text_fits_what_the_cached_features_fit(text_run, monkeypatch):
    run, data, items, embeddings, table = text_run
    rows = [i for i, user in enumerate(table["user"]) if user == table["user"][0]]
    chosen = torch.tensor([table["chosen"][i] for i in rows])
    rejected = torch.tensor([table["rejected"][i] for i in rows])
    pairs = [(prompt_of(items[c][0]), items[c][1], items[r][1]) for c, r in zip(chosen.tolist(), rejected.tolist())]
    seen = []  # what personalize_text hands to personalize: the training features of its pairs
    original = PersonalRewardModel.personalize

    def personalize(self, user, chosen, rejected, **options):
        seen.append((chosen, rejected))
        return original(self, user, chosen, rejected, **options)

    monkeypatch.setattr(PersonalRewardModel, "personalize", personalize)
    from_text = PersonalRewardModel.from_run(run).personalize_text("new", pairs, steps=200)
    monkeypatch.undo()
    torch.testing.assert_close(seen[0][0], embeddings[chosen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0][1], embeddings[rejected], atol=1e-5, rtol=1e-5)
    from_cache = PersonalRewardModel.from_run(run).personalize("new", embeddings[chosen], embeddings[rejected],
                                                               steps=200)
    torch.testing.assert_close(from_text, from_cache, atol=1e-4, rtol=1e-4)

    # an embedder that yields NaN: refused, and nothing is stored
    model = PersonalRewardModel.from_run(run)
    before = list(model.user_ids)
    monkeypatch.setattr(TextEmbedder, "forward", lambda self, batch: torch.full((len(batch), data.dim), float("nan")))
    with pytest.raises(ValueError, match="non-finite value.*nothing was scored or stored"):
        model.personalize_text("nan-user", pairs)
    assert model.user_ids == before
    with pytest.raises(LoreDataError, match=r"pair 1: chosen and rejected are identical"):
        model.personalize_text("other", [pairs[0], ("a prompt", "same", "same")])
    with pytest.raises(LoreDataError, match=r"pair 0: a pair is \(prompt, chosen, rejected\)"):
        model.personalize_text("other", [("only two", "items")])
    assert model.user_ids == before


def test_another_embedder_is_refused_and_batch_size_is_free(text_run, tiny_reward_model):
    run, data, items, embeddings, _ = text_run
    for other in (replace(tiny_spec(tiny_reward_model), max_length=32), tiny_spec(tiny_reward_model, kind="encoder")):
        with pytest.raises(LoreDataError) as refused:
            PersonalRewardModel.from_run(run, embedder=other)
        assert other.identity() in str(refused.value) and data.embedder in str(refused.value)
    # batch_size is not part of the identity: a spec or an override with another one scores the same
    messages, response = items[0]
    user = data.seen_user_ids[0]
    scores = [PersonalRewardModel.from_run(run, **options).score_text(prompt_of(messages), response, user)
              for options in ({"embedder": replace(tiny_spec(tiny_reward_model), batch_size=1)}, {"batch_size": 2})]
    expected = embeddings[:1] @ PersonalRewardModel.from_run(run).head(user)
    for score in scores:
        torch.testing.assert_close(score, expected, atol=1e-5, rtol=1e-5)


def test_a_basis_of_synthetic_features_is_refused_for_text(tmp_path, monkeypatch):
    identity = SyntheticPopulationDataModule(**TINY).embedder
    run = tmp_path / "run"
    run.mkdir()
    save_basis(run / "basis.safetensors", BasisFile(torch.randn(16, 2), 1.0, None, ["a"],
                                                    torch.tensor([[0.5, 0.5]]), embedder=identity))
    with pytest.raises(LoreDataError, match=r"basis.safetensors: the basis was trained on features of "
                                            r"'SyntheticPopulation.*cannot embed text"):
        PersonalRewardModel.from_run(run)
    loaded = PersonalRewardModel.load(run / "basis.safetensors")  # embeddings still score
    assert loaded.score(torch.randn(3, 16), "a").shape == (3,)
    with pytest.raises(LoreDataError, match="cannot embed text"):
        loaded.score_text("a prompt", ["a response"], "a")
    with pytest.raises(LoreDataError, match="a run directory needs basis.safetensors"):
        PersonalRewardModel.from_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "responses.jsonl", [{"prompt": "hi", "response": "yes"}])
    with pytest.raises(LoreDataError, match="cannot embed text"):
        predict(run, tmp_path / "responses.jsonl", tmp_path / "scores.csv")
    assert not (tmp_path / "scores.csv").exists()


def test_bad_text_is_refused_before_the_embedder_loads(text_run):
    model = PersonalRewardModel.from_run(text_run[0])
    user = model.user_ids[0]
    with pytest.raises(KeyError, match="unknown user 'zed'"):
        model.score_text("a prompt", ["a response"], "zed")
    with pytest.raises(LoreDataError, match="score_text: prompt: the prompt is empty"):
        model.score_text("  ", ["a response"], user)
    with pytest.raises(LoreDataError, match="response 1 must be a non-empty string"):
        model.score_text([{"role": "user", "content": "hi"}], ["fine", ""], user)
    with pytest.raises(LoreDataError, match="every chat turn needs string 'role' and 'content'"):
        model.score_text([{"role": "user"}], ["fine"], user)
    with pytest.raises(LoreDataError, match="2 chosen but 1 rejected"):
        model.preference_probability_text("a prompt", ["x", "y"], ["z"], user)
    assert model._text_embedder is None


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def predict(run, responses, output, *extra):
    build_cli(["predict", "--config", str(ROOT / "configs/experiment/score_text.yaml"),
               f"--model.init_args.basis_path={run}", f"--data.init_args.path={responses}",
               f"--model.init_args.output={output}", "--trainer.accelerator=cpu", "--trainer.devices=1",
               "--trainer.enable_progress_bar=false", *extra])


def test_lightning_predict_scores_a_jsonl_of_text(text_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml under the working directory
    run, data = text_run[:2]
    first, second = data.seen_user_ids[:2]
    chat = [{"role": "system", "content": "be short"}, {"role": "user", "content": "question the a an"}]
    rows = [{"user_id": second, "prompt": "question is are was", "response": "good answer"},
            {"prompt": chat, "response": "paris is the capital"},
            "",
            {"user_id": None, "prompt": "hello world", "response": "yes please"},
            {"user_id": first, "prompt": chat, "response": "no thanks"}]
    write_rows(tmp_path / "responses.jsonl", rows)
    predict(run, tmp_path / "responses.jsonl", tmp_path / "scores.csv", "--data.init_args.batch_size=2",
            "--model.init_args.batch_size=1")  # the embedder's batch: not part of its identity
    with open(tmp_path / "scores.csv", newline="") as stream:
        written = list(csv.reader(stream))
    model = PersonalRewardModel.from_run(run)
    users = model.user_ids
    assert written[0] == ["line", "user_id", "reward"]
    assert [(int(line), user) for line, user, _ in written[1:]] == (
        [(1, second)] + [(2, user) for user in users] + [(4, user) for user in users] + [(5, first)])
    for line, user, reward in written[1:]:
        row = rows[int(line) - 1]
        expected = model.score_text(row["prompt"], [row["response"]], user)
        assert float(reward) == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)

    # the users option: the rows without a user id are scored for these users only (each once)
    predict(run, tmp_path / "responses.jsonl", tmp_path / "two.csv",
            f"--model.init_args.users=[{users[1]},{users[0]},{users[1]}]")
    with open(tmp_path / "two.csv", newline="") as stream:
        pairs = [(int(line), user) for line, user, _ in list(csv.reader(stream))[1:]]
    assert pairs == [(1, second), (2, users[1]), (2, users[0]), (4, users[1]), (4, users[0]), (5, first)]

    # a row naming a user the basis does not know stops before anything is embedded or written
    write_rows(tmp_path / "unknown.jsonl", rows[:2] + [{"user_id": "nobody", "prompt": "hi", "response": "yes"}])
    with pytest.raises(LoreDataError, match=r"unknown.jsonl: line 3: field 'user_id': unknown user 'nobody'"):
        predict(run, tmp_path / "unknown.jsonl", tmp_path / "never.csv")
    assert not (tmp_path / "never.csv").exists()


def test_predict_never_writes_its_csv_over_the_run_or_the_responses(text_run, tmp_path, monkeypatch):
    """The CSV of ``score_text.yaml`` aimed at the basis it reads or at its own input is refused before
    the embedder loads, even with --overwrite, and both stay byte-identical (lore_pl.data.outputs)."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    run, data = text_run[:2]
    write_rows(tmp_path / "responses.jsonl", [{"user_id": data.seen_user_ids[0], "prompt": "hi", "response": "yes"}])
    loads = []
    monkeypatch.setattr(TextEmbedder, "__init__", lambda *args, **kwargs: loads.append(1) or 1 / 0)
    for output in (run / "basis.safetensors", tmp_path / "responses.jsonl"):
        before = hashlib.sha256(output.read_bytes()).hexdigest()
        for extra in ([], ["--overwrite=true"]):
            with pytest.raises(LoreDataError, match=rf"{output}: refusing to write over .*an input of this command"):
                predict(run, tmp_path / "responses.jsonl", output, *extra)
        assert hashlib.sha256(output.read_bytes()).hexdigest() == before
    assert not loads and not list(run.glob(".*.lock")) and not list(tmp_path.glob(".*.lock"))


def test_embedding_scoring_takes_a_run_directory_too(text_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from safetensors.torch import save_file

    run, _, _, embeddings, _ = text_run
    save_file({"embeddings": embeddings[:5].contiguous()}, str(tmp_path / "candidates.safetensors"))
    build_cli(["predict", "--config", str(ROOT / "configs/experiment/score.yaml"),
               f"--model.init_args.basis_path={run}", f"--data.init_args.path={tmp_path / 'candidates.safetensors'}",
               f"--model.init_args.output={tmp_path / 'scores.csv'}", "--trainer.accelerator=cpu",
               "--trainer.devices=1", "--trainer.enable_progress_bar=false"])
    with open(tmp_path / "scores.csv", newline="") as stream:
        header, *rows = list(csv.reader(stream))
    model = PersonalRewardModel.from_run(run)
    assert header == ["candidate", *model.user_ids] and len(rows) == 5
    column = torch.tensor([float(row[1]) for row in rows])
    torch.testing.assert_close(column, model.score(embeddings[:5], model.user_ids[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "hi", "response": "yes"', r"line 2: not valid JSON"),
        ('["hi", "yes"]', r"line 2: a row is an object with fields 'prompt', 'response'"),
        ('{"response": "yes"}', r"line 2: field 'prompt' is missing"),
        ('{"prompt": "hi"}', r"line 2: field 'response' is missing"),
        ('{"prompt": "hi", "response": "  "}', r"line 2: field 'response' must be a non-empty string"),
        ('{"prompt": [{"role": "user"}], "response": "yes"}', r"line 2: field 'prompt': every chat turn"),
        ('{"prompt": 3, "response": "yes"}', r"line 2: field 'prompt': the prompt must be a non-empty string"),
        ('{"user_id": [1], "prompt": "hi", "response": "yes"}', r"line 2: field 'user_id' must be a string"),
        ('{"user_id": " ", "prompt": "hi", "response": "yes"}', r"line 2: field 'user_id' is empty"),
        ('{"prompt": "hi", "response": "\\ud800"}', r"line 2: a field holds text that is not valid Unicode"),
    ],
)
def test_bad_response_rows_name_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "responses.jsonl"
    path.write_text('{"prompt": "fine", "response": "fine"}\n' + line + "\n")
    with pytest.raises(LoreDataError, match=r"responses.jsonl: " + message):
        read_response_rows(path, COLUMNS)


def test_a_response_file_without_rows_or_of_another_format_is_refused(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "hi", "response": "yes"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(LoreDataError, match=r"latin1.jsonl: line 2, byte 16: not UTF-8 text"):
        read_response_rows(tmp_path / "latin1.jsonl", COLUMNS)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(LoreDataError, match="empty.jsonl: no rows"):
        read_response_rows(tmp_path / "empty.jsonl", COLUMNS)
    with pytest.raises(LoreDataError, match="a .jsonl file"):
        read_response_rows(tmp_path / "rows.csv", COLUMNS)
    rows = read_response_rows(write_and(tmp_path / "ok.jsonl", '{"user_id": 7, "prompt": "hi", "response": "yes"}'),
                              COLUMNS)
    assert rows.users == ["7"] and rows.lines == [1] and rows.items == [[[{"role": "user", "content": "hi"}], "yes"]]


def write_and(path, text):
    path.write_text(text + "\n")
    return path


def test_every_bad_response_row_is_reported_at_once(tmp_path):
    lines = ['{"prompt": "fine", "response": "fine"}', "", '{"prompt": "hi"}', '{"prompt": "hi", "response": "ok"',
             '{"user_id": " ", "prompt": "a", "response": "b"}']
    path = write_and(tmp_path / "responses.jsonl", "\n".join(lines))
    with pytest.raises(LoreDataError) as error:
        read_response_rows(path, COLUMNS)
    assert str(error.value).splitlines() == [
        f"{path}: 3 bad rows:",
        "  line 3: field 'response' is missing",
        "  line 4: not valid JSON (Expecting ',' delimiter)",
        "  line 5: field 'user_id' is empty (leave it out to score the row for every user)",
    ]
