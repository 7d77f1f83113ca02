"""The reward server (``lore-pl serve``, lore_pl.serving) as its clients see it: a subprocess on a free
loopback port, called with httpx; its rewards against ``PersonalRewardModel`` in-process; its journal."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from callbacks import BasisExport
from helpers import ROOT, WORDS, make, tiny_trainer, write_preferences
from lore_pl import BasisModule, LoreDataError, PersonalRewardModel
from lore_pl.serving.journal import Journal
from lore_pl.serving.server import main as serve_main

TOKEN = "a-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_ROWS = 64


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_reward_model):
    """A rank-2 basis on a preference file embedded by the tiny reward model (as tests/test_text_scoring.py)."""
    root = tmp_path_factory.mktemp("serve-run")
    write_preferences(root / "prefs.jsonl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_trainer(max_epochs=3, default_root_dir=str(root / "run"), callbacks=[BasisExport()]).fit(
            BasisModule(estimator="adam", rank=2), datamodule=make(root / "prefs.jsonl", tiny_reward_model, root))
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``python -m lore_pl.serving`` in its own process group."""

    def __init__(self, run, journal, log, default_user):
        self.run, self.journal, self.log, self.default_user = run, journal, log, default_user
        self.process = None

    def start(self, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "lore_pl.serving", "--run", str(self.run), "--port", str(self.port),
                   "--journal", str(self.journal), "--default-user", self.default_user, "--threads", "1",
                   "--max-rows", str(MAX_ROWS)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LORE_PL_SERVE_TOKEN": TOKEN}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail(f"the server did not answer /health in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, how=signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, how)
            self.process.wait(timeout=60)
        self.process = None

    def post(self, path, body=None, **kwargs):
        return httpx.post(self.url + path, json=body, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(text_run, tmp_path_factory):
    model = PersonalRewardModel.load(text_run / "basis.safetensors")
    where = tmp_path_factory.mktemp("serve")
    process = ServerProcess(text_run, where / "journal.jsonl", where / "server.log", model.user_ids[0])
    process.start()
    yield process
    process.kill()


def rows_for(users, count, seed=0):
    """(prompt, response, user) rows over ``users`` (None: the server's default user)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for number in range(count):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (9,), generator=generator)]
        rows.append((f"question {' '.join(words[:4])}", " " + " ".join(words[4:4 + 1 + number % 5]),
                     users[number % len(users)]))
    return rows


def openrlhf_body(rows):
    return {"query": [prompt + response for prompt, response, _ in rows], "prompts": [p for p, _, _ in rows],
            "labels": [user for _, _, user in rows]}


def expected_rewards(model, rows, default_user):
    return torch.cat([model.score_text(prompt, [response], user or default_user) for prompt, response, user in rows])


def test_rewards_equal_the_in_process_model_for_mixed_users(server, text_run):
    model = PersonalRewardModel.from_run(text_run)
    users = [*model.user_ids, None]  # None: OpenRLHF sent no label; the default user scores it
    batches = [rows_for(users, count, seed) for seed, count in enumerate((1, 7, 23, MAX_ROWS))]
    with ThreadPoolExecutor(len(batches)) as pool:  # at once, so the server batches requests of several users
        answers = list(pool.map(lambda rows: server.post("/get_reward", openrlhf_body(rows)), batches))
    for rows, answer in zip(batches, answers):
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert set(got) == {"rewards", "scores", "extra_logs"} and got["scores"] == got["rewards"]
        torch.testing.assert_close(torch.tensor(got["rewards"]), expected_rewards(model, rows, server.default_user),
                                   atol=1e-5, rtol=1e-5)
        assert got["extra_logs"] == {}  # this basis keeps no weight covariance for its users: no score_std

    # the native endpoint: chat prompts too, each row's reward and score_std (null without a covariance)
    chat = [{"role": "system", "content": "be short"}, {"role": "user", "content": "question the a"}]
    rows = [{"user": model.user_ids[1], "prompt": chat, "response": "a good answer"},
            {"prompt": "question is", "response": "the answer"}]  # no user: the server's default
    answer = server.post("/score", {"rows": rows})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["users"] == [model.user_ids[1], server.default_user] and got["score_std"] == [None, None]
    expected = [model.score_text(chat, "a good answer", model.user_ids[1]),
                model.score_text("question is", "the answer", server.default_user)]
    torch.testing.assert_close(torch.tensor(got["rewards"]), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_bad_rows_are_4xx_naming_the_row(server, text_run):
    good = rows_for([None], 3)
    unknown = openrlhf_body(good)
    unknown["labels"][1] = "nobody"
    cases = [  # (path, body, status, words the message must hold)
        ("/get_reward", unknown, 404, ["row 1", "'nobody'"]),
        ("/get_reward", {**openrlhf_body(good), "labels": [None, None, 5]}, 422, ["row 2", "labels[2]"]),
        ("/get_reward", {**openrlhf_body(good), "prompts": ["other", *openrlhf_body(good)["prompts"][1:]]}, 422,
         ["row 0", "does not start with prompts[0]"]),
        ("/get_reward", {"query": ["question a"], "prompts": ["question a"]}, 422, ["row 0", "response"]),
        ("/get_reward", {"query": ["a b", "c d"], "prompts": ["a"]}, 422, ["'prompts' holds 1", "'query' holds 2"]),
        ("/get_reward", openrlhf_body(rows_for([None], MAX_ROWS + 1)), 413, [f"at most {MAX_ROWS}"]),
        ("/get_reward", [1, 2], 422, ["JSON object"]),
        ("/score", {"rows": [{"prompt": "q"}]}, 422, ["row 0: response"]),
        ("/score", {"rows": [{"prompt": "q", "response": "r"}, {"prompt": "", "response": "r"}]}, 422, ["row 1"]),
    ]
    for path, body, status, words in cases:
        answer = server.post(path, body)
        assert answer.status_code == status, (body, answer.text)
        assert all(word in answer.json()["detail"] for word in words), answer.json()
    answer = httpx.post(server.url + "/get_reward", content=b"{not json", timeout=30)
    assert answer.status_code == 400 and "not JSON" in answer.json()["detail"]

    # a bad request batched with good ones spoils none of them
    model = PersonalRewardModel.from_run(text_run)
    bodies = [openrlhf_body(good), unknown] * 4
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: server.post("/get_reward", body), bodies))
    expected = expected_rewards(model, good, server.default_user)
    for body, answer in zip(bodies, answers):
        if body is unknown:
            assert answer.status_code == 404
        else:
            torch.testing.assert_close(torch.tensor(answer.json()["rewards"]), expected, atol=1e-5, rtol=1e-5)


def test_write_endpoints_refuse_without_the_token(server):
    pair = {"prompt": "question a", "chosen": "good answer", "rejected": "bad"}
    writes = [("/personalize", {"user": "someone", "pairs": [pair]}),
              ("/observe", {"user": "someone", "prompt": "q", "responses": ["a", "b"], "choice": 0}),
              ("/forget", {"user": server.default_user})]
    before = server.journal.read_bytes()
    for path, body in writes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = server.post(path, body, headers=headers)
            assert answer.status_code == 401 and "Bearer" in answer.json()["detail"], answer.text
    # with the token, bad updates are refused by name and change nothing either
    for path, body, status, words in [
        ("/personalize", {"user": "someone", "pairs": [{**pair, "rejected": pair["chosen"]}]}, 422, ["pair 0"]),
        ("/personalize", {"user": "someone", "pairs": [pair], "options": {"steps": "many"}}, 422, ["options.steps"]),
        ("/personalize", {"user": "someone", "pairs": [pair], "options": {"steps": 10**9}}, 422, ["from 1 to 10000"]),
        ("/observe", {"user": "someone", "prompt": "q", "responses": ["a", "b"], "choice": 2}, 422, ["'choice'"]),
        ("/forget", {"user": "nobody"}, 404, ["'nobody'"]),
        ("/forget", {"user": ""}, 422, ["'user'"]),
    ]:
        answer = server.post(path, body, headers=AUTH)
        assert answer.status_code == status and all(w in answer.json()["detail"] for w in words), answer.text
    assert server.journal.read_bytes() == before
    assert server.post("/score", {"rows": [{"user": "someone", "prompt": "q", "response": "r"}]}).status_code == 404


def scores_of(server, user, rows):
    answer = server.post("/score", {"rows": [{"user": user, "prompt": p, "response": r} for p, r, _ in rows]})
    assert answer.status_code == 200, answer.text
    return torch.tensor(answer.json()["rewards"]), answer.json()["score_std"]


@pytest.mark.slow
def test_acknowledged_updates_survive_sigkill(server, text_run):
    """Each update is journaled before its answer: SIGKILL right after it, a restart, and it is all there."""
    basis = text_run / "basis.safetensors"
    digest = hashlib.sha256(basis.read_bytes()).hexdigest()
    offline = PersonalRewardModel.from_run(text_run)  # the same updates, in-process
    rows = rows_for([None], 6, seed=5)
    pairs = [{"prompt": p, "chosen": r + " yes", "rejected": r} for p, r, _ in rows[:3]]

    answer = server.post("/personalize", {"user": "fresh", "pairs": pairs, "options": {"steps": 200}}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    weights = offline.personalize_text("fresh", [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], steps=200)
    torch.testing.assert_close(torch.tensor(answer.json()["weights"]), weights, atol=1e-4, rtol=1e-4)
    acknowledged, spread = scores_of(server, "fresh", rows)
    server.kill(signal.SIGKILL)
    server.start()
    torch.testing.assert_close(scores_of(server, "fresh", rows)[0], acknowledged, atol=1e-6, rtol=1e-6)
    embeddings = torch.cat([offline.embed_text(p, [r]) for p, r, _ in rows])
    torch.testing.assert_close(torch.tensor(spread), offline.score_std(embeddings, "fresh"), atol=1e-4, rtol=1e-4)

    prompt, response, _ = rows[4]
    observe = {"user": "fresh", "prompt": prompt, "responses": [response, response + " no"], "choice": 1}
    assert server.post("/observe", observe, headers=AUTH).status_code == 200
    gone = offline.user_ids[1]
    assert server.post("/forget", {"user": gone}, headers=AUTH).status_code == 200
    acknowledged = scores_of(server, "fresh", rows)[0]
    server.kill(signal.SIGKILL)
    server.start()
    torch.testing.assert_close(scores_of(server, "fresh", rows)[0], acknowledged, atol=1e-6, rtol=1e-6)
    assert gone not in httpx.get(server.url + "/users", timeout=30).json()["users"]
    assert server.post("/score", {"rows": [{"user": gone, "prompt": "q", "response": "r"}]}).status_code == 404

    # the in-process model given the same updates agrees, and a further observe goes on from the replayed answers
    offline.observe("fresh", offline.embed_text(prompt, [response, response + " no"]), 1)
    offline.forget(gone)
    expected = torch.cat([offline.score_text(p, [r], "fresh") for p, r, _ in rows])
    torch.testing.assert_close(acknowledged, expected, atol=1e-4, rtol=1e-4)
    again = {**observe, "responses": [rows[5][1], rows[5][1] + " no"], "prompt": rows[5][0], "choice": 0}
    answer = server.post("/observe", again, headers=AUTH)
    weights = offline.observe("fresh", offline.embed_text(rows[5][0], again["responses"]), 0)
    torch.testing.assert_close(torch.tensor(answer.json()["weights"]), weights, atol=1e-4, rtol=1e-4)
    assert [json.loads(line)["op"] for line in server.journal.read_text().splitlines()] == \
        ["personalize", "observe", "forget", "observe"]
    assert hashlib.sha256(basis.read_bytes()).hexdigest() == digest  # the basis file is only read


def test_the_journal_drops_a_torn_last_record_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, writer=True)
    assert journal.append({"op": "forget", "user": "a"}) == 1
    with pytest.raises(LoreDataError, match="another server holds this journal"):
        Journal(path, writer=True)
    journal.close()
    with open(path, "ab") as file:
        file.write(b'{"op":"forget","user":"b","se')  # a crash in the middle of an unacknowledged append
    journal = Journal(path, writer=True)
    assert [record["user"] for record in journal.read_new()] == ["a"]
    assert journal.append({"op": "forget", "user": "c"}) == 2
    journal.close()
    assert [json.loads(line)["user"] for line in path.read_text().splitlines()] == ["a", "c"]
    path.write_text(path.read_text().replace('"user":"a"', '"user":"a"}x'))
    with pytest.raises(LoreDataError, match="record 1 does not read as JSON"):
        list(Journal(path, writer=True).read_new())
    # a file that is no journal (no line, so no record to refuse): never cut, left byte-identical
    token = tmp_path / "token"
    token.write_bytes(b"s3cret")
    with pytest.raises(LoreDataError, match="not the start of a journal record"):
        list(Journal(token, writer=True).read_new())
    assert token.read_bytes() == b"s3cret"


def test_bad_settings_are_one_line_errors(text_run, tmp_path, capsys):
    for argv, words in [(["--default-user", "nobody"], "--default-user 'nobody'"),
                        (["--max-rows", "0"], "--max-rows must be at least 1"),
                        (["--port", "0"], "--port must be from 1 to 65535")]:
        with pytest.raises(SystemExit) as exited:
            serve_main(["--run", str(text_run), "--journal", str(tmp_path / "journal.jsonl"), *argv])
        assert exited.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {words}")
