"""``lore_pl.rlhf``: the reward functions for TRL, OpenRLHF and verl, called as those stacks call them,
give each row its own user's ``PersonalRewardModel.score_text`` reward."""

from __future__ import annotations

import pickle

import pytest
import torch

from helpers import tiny_spec
from lore_pl.data.basis_file import BasisFile, save_basis
from lore_pl.data.embedder import TextEmbedder
from lore_pl.errors import LoreDataError
from lore_pl.inference import PersonalRewardModel
from lore_pl.rlhf import load_run, openrlhf_reward_func, trl_reward_func, verl_compute_score, verl_compute_score_batch

pytestmark = pytest.mark.usefixtures("one_thread")
USERS = ["rater-0", "ü ser/1", "rater two"]
CHAT = [{"role": "system", "content": "be short"}, {"role": "user", "content": "what is the capital of france"}]
#: (prompt, response, user): string and chat prompts, the users mixed, one response scored for two users
ROWS = [
    ("what is the capital of france", "paris is the capital", "rater-0"),
    ("what is the capital of france", "paris is the capital", "rater two"),
    (CHAT, "the capital of france is a city with good bread", "ü ser/1"),
    (CHAT, "lyon", "rater-0"),
    ("hello world", "hello to you too", "rater two"),
]


def write_run(path, model_dir: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    save_basis(path, BasisFile(basis=torch.randn(16, 3, generator=generator), tau=0.7, user_ids=list(USERS),
                               user_weights=torch.randn(len(USERS), 3, generator=generator).mul(3).softmax(-1),
                               embedder=tiny_spec(model_dir).identity()))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_reward_model):
    return write_run(tmp_path_factory.mktemp("rlhf-run") / "basis.safetensors", tiny_reward_model)


@pytest.fixture(scope="module")
def expected(run):
    """Each row's reward from the inference API, one row at a time."""
    model = PersonalRewardModel.from_run(run)
    rewards = torch.stack([model.score_text(prompt, [response], user)[0] for prompt, response, user in ROWS])
    same_text = rewards[0] - rewards[1]  # one response, two users: the test tells users apart only if they differ
    assert abs(float(same_text)) > 1e-3
    return rewards


@pytest.fixture
def passes(monkeypatch):
    """How many times the embedder ran, and on how many texts."""
    calls = []
    original = TextEmbedder.pooled

    def pooled(self, items):
        calls.append(len(items))
        return original(self, items)

    monkeypatch.setattr(TextEmbedder, "pooled", pooled)
    return calls


def test_trl_rewards_are_score_text_for_mixed_users_in_one_pass(run, expected, passes):
    reward = trl_reward_func(run)
    assert reward.__name__ == "lore_pl_personal_reward"  # TRL logs each reward function by name
    prompts = [prompt for prompt, _, _ in ROWS]
    completions = [response for _, response, _ in ROWS]
    # TRL passes every dataset column but the prompt, and some keywords of its own
    got = reward(prompts, completions, user_id=[user for _, _, user in ROWS], answer=["x"] * len(ROWS),
                 completion_ids=[[1]] * len(ROWS), trainer_state=None)
    assert isinstance(got, list) and all(type(value) is float for value in got)
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-5, rtol=0)
    assert passes == [len(ROWS)], "every row should be embedded in one pass"


def test_trl_conversational_rows(run, expected):
    # the conversational format: prompts and completions are lists of turns
    reward = trl_reward_func(run, user_column="rater")
    prompts = [prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}] for prompt, _, _ in ROWS]
    completions = [[{"role": "assistant", "content": response}] for _, response, _ in ROWS]
    got = reward(prompts, completions, rater=[user for _, _, user in ROWS])
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-5, rtol=0)
    # a completion of several turns: the last is the response, the ones before it continue the prompt
    turns = [{"role": "assistant", "content": "let me think"}, {"role": "user", "content": "go on"},
             {"role": "assistant", "content": "paris"}]
    model = PersonalRewardModel.from_run(run)
    want = model.score_text(CHAT + turns[:2], ["paris"], "ü ser/1")
    torch.testing.assert_close(torch.tensor(reward([CHAT], [turns], rater=["ü ser/1"])), want, atol=1e-5, rtol=0)


def test_openrlhf_reward_func_in_its_documented_call_form(run, expected, passes):
    reward_func = openrlhf_reward_func(run, response_suffixes=["</s>"])
    # --apply_chat_template off: the prompt is the dataset's text; the query is prompt + response (+ eos text)
    rows = [(prompt, response, user) for prompt, response, user in ROWS if isinstance(prompt, str)]
    want = expected[[i for i, (prompt, _, _) in enumerate(ROWS) if isinstance(prompt, str)]]
    queries = [prompt + response + "</s>" for prompt, response, _ in rows]
    prompts = [prompt for prompt, _, _ in rows]
    labels = [user for _, _, user in rows]
    out = reward_func(queries, prompts, labels)
    assert set(out) == {"rewards", "scores", "extra_logs"} and out["rewards"].dtype == torch.float32
    torch.testing.assert_close(out["rewards"], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["scores"], want, atol=1e-5, rtol=0)
    assert passes == [len(rows)]
    # a label may be a mapping holding the user id; older OpenRLHF wants the rewards tensor itself
    tensor_form = openrlhf_reward_func(run, output="tensor", response_suffixes=["</s>"])
    got = tensor_form(queries, prompts, [{"user_id": user, "answer": "-"} for user in labels])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_openrlhf_prompt_parser_recovers_a_rendered_chat_prompt(run, expected):
    # --apply_chat_template: the prompt text carries the policy's markup; the parser gives back the chat
    def render(messages):
        return "".join(f"<|{turn['role']}|>{turn['content']}" for turn in messages) + "<|assistant|>"

    def parse(text):
        turns = text.removesuffix("<|assistant|>").split("<|")[1:]
        return [{"role": turn.split("|>")[0], "content": turn.split("|>", 1)[1]} for turn in turns]

    reward_func = openrlhf_reward_func(run, prompt_parser=parse, response_suffixes=["<|end|>"])
    rendered = [render(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
                for prompt, _, _ in ROWS]
    queries = [text + response + "<|end|>" for text, (_, response, _) in zip(rendered, ROWS)]
    out = reward_func(queries, rendered, [user for _, _, user in ROWS])
    torch.testing.assert_close(out["rewards"], expected, atol=1e-5, rtol=0)


def test_verl_compute_score_single_and_batched(run, expected, passes):
    extra_infos = [{"user_id": user, "prompt": prompt, "index": i} for i, (prompt, _, user) in enumerate(ROWS)]
    # the naive reward manager: one row per call, keyword arguments, reward_kwargs merged in
    single = [verl_compute_score(data_source="personal", solution_str=response, ground_truth=None, extra_info=info,
                                 run=str(run)) for (_, response, _), info in zip(ROWS, extra_infos)]
    assert all(type(value) is float for value in single)
    torch.testing.assert_close(torch.tensor(single), expected, atol=1e-5, rtol=0)
    passes.clear()
    # the batch reward manager: lists, all rows in one pass; the decoded eos text trimmed
    batched = verl_compute_score_batch(data_sources=["personal"] * len(ROWS),
                                       solution_strs=[response + "</s>" for _, response, _ in ROWS],
                                       ground_truths=[None] * len(ROWS), extra_infos=extra_infos, run=str(run),
                                       response_suffixes=["</s>"], reward_router_address=None)
    torch.testing.assert_close(torch.tensor(batched), expected, atol=1e-5, rtol=0)
    assert passes == [len(ROWS)]
    # a chat prompt read back from parquet is an array of turns
    import numpy as np

    info = {"user_id": "ü ser/1", "prompt": np.array(CHAT, dtype=object)}
    got = verl_compute_score("personal", ROWS[2][1], None, info, run=run)
    assert got == pytest.approx(float(expected[2]), abs=1e-5)


def test_bad_rows_are_refused_naming_the_row(run, monkeypatch):
    users = [user for _, _, user in ROWS]
    prompts = [prompt for prompt, _, _ in ROWS]
    completions = [response for _, response, _ in ROWS]
    reward = trl_reward_func(run)
    with pytest.raises(LoreDataError, match=r"trl_reward_func: row 3: unknown user 'rater-9': not among the 3 users"):
        reward(prompts, completions, user_id=users[:3] + ["rater-9"] + users[4:])
    with pytest.raises(LoreDataError, match=r"passed no column 'user_id' \(it passed \['rater'\]\).*user_column="):
        reward(prompts, completions, rater=users)
    with pytest.raises(LoreDataError, match="row 1: the user id must be a non-empty string"):
        reward(prompts, completions, user_id=["rater-0", None, *users[2:]])
    with pytest.raises(LoreDataError, match="5 prompts, 5 completions and 4 values of 'user_id'"):
        reward(prompts, completions, user_id=users[:4])
    with pytest.raises(LoreDataError, match="row 2: completion: the last turn must be the assistant's"):
        reward(prompts[:3], completions[:2] + [[{"role": "user", "content": "hi"}]], user_id=users[:3])
    with pytest.raises(LoreDataError, match="row 0: response 0 must be a non-empty string"):
        reward(prompts[:1], [""], user_id=users[:1])

    reward_func = openrlhf_reward_func(run)
    with pytest.raises(LoreDataError, match="openrlhf_reward_func: row 1: unknown user 'nobody'"):
        reward_func(["a b", "c d"], ["a", "c"], ["rater-0", "nobody"])
    with pytest.raises(LoreDataError, match="row 0: the label has no key 'user_id'"):
        reward_func(["a b"], ["a"], [{"answer": "b"}])
    with pytest.raises(LoreDataError, match="row 1: the query does not begin with its prompt"):
        reward_func(["a b", "x y"], ["a", "c"], ["rater-0", "rater-0"])

    with pytest.raises(LoreDataError, match="verl_compute_score: row 0: extra_info has no key 'user_id'"):
        verl_compute_score("d", "paris", None, {"prompt": "q"}, run=run)
    with pytest.raises(LoreDataError, match="extra_info has no key 'prompt' \\(the prompt\\)"):
        verl_compute_score("d", "paris", None, {"user_id": "rater-0"}, run=run)
    with pytest.raises(LoreDataError, match="extra_info must be a mapping"):
        verl_compute_score("d", "paris", None, None, run=run)
    with pytest.raises(LoreDataError, match="no run to score with: set custom_reward_function.reward_kwargs.run"):
        verl_compute_score("d", "paris", None, {"user_id": "rater-0", "prompt": "q"})
    with pytest.raises(LoreDataError, match="verl_compute_score_batch: row 1: unknown user 'x'"):
        verl_compute_score_batch(["d", "d"], ["a", "b"], [None, None],
                                 [{"user_id": "rater-0", "prompt": "q"}, {"user_id": "x", "prompt": "q"}], run=run)

    # an embedder that yields NaN: no reward is returned, the row is named
    nan_model = PersonalRewardModel.from_run(run)
    monkeypatch.setattr(TextEmbedder, "forward", lambda self, items: torch.full((len(items), 16), float("nan")))
    with pytest.raises(LoreDataError, match="row 0: its embedding holds NaN or Inf \\(2 such row"):
        trl_reward_func(nan_model)(prompts[:2], completions[:2], user_id=users[:2])


def test_an_overflowing_reward_is_refused(tmp_path, tiny_reward_model, monkeypatch):
    path = tmp_path / "huge.safetensors"
    save_basis(path, BasisFile(basis=torch.full((16, 1), 3e37), tau=1.0, user_ids=["a"],
                               embedder=tiny_spec(tiny_reward_model).identity()))
    reward = trl_reward_func(path)
    monkeypatch.setattr(TextEmbedder, "forward", lambda self, items: torch.full((len(items), 16), 10.0))
    with pytest.raises(LoreDataError, match="row 0: its reward overflows float32"):  # 16 * 10 * 3e37 > 3.4e38
        reward(["hello world"], ["hello"], user_id=["a"])


def test_the_run_is_loaded_once_and_the_functions_pickle_light(tmp_path, tiny_reward_model):
    path = write_run(tmp_path / "basis.safetensors", tiny_reward_model)
    model = load_run(tmp_path)  # the run directory and the basis file are one run
    assert load_run(path) is model and model._text_embedder is not None
    assert load_run(path, batch_size=1) is not model  # another batch size: another embedder set-up
    reward = trl_reward_func(path)
    shipped = pickle.dumps(reward)
    assert len(shipped) < 2000, "the function should ship the run's path, not the model"
    copy = pickle.loads(shipped)
    assert copy.source.model() is model
    assert copy(["hello world"], ["hello"], user_id=["rater-0"]) == reward(["hello world"], ["hello"],
                                                                            user_id=["rater-0"])
    write_run(path, tiny_reward_model, seed=1)  # the basis rewritten: loaded afresh
    assert load_run(path) is not model
