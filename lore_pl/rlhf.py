"""Personal rewards inside RLHF loops: reward functions in the forms TRL, OpenRLHF and verl call.

    from lore_pl.rlhf import trl_reward_func
    reward = trl_reward_func("lightning_logs/tulu1/version_0")     # the dataset has a user_id column
    GRPOTrainer(model=..., reward_funcs=reward, train_dataset=dataset, ...)

    # reward_func.py, for OpenRLHF's --remote_rm_url reward_func.py --label_key user_id
    reward_func = openrlhf_reward_func("lightning_logs/tulu1/version_0")

    # verl: custom_reward_function.path=<a file that imports it>, .name=verl_compute_score,
    #       custom_reward_function.reward_kwargs.run=RUN; each row's extra_info holds user_id and prompt

Each call routes every row to its own user's reward ``e . V w_u`` (a batch mixes users freely), embeds
all of its rows in one pass of the basis's embedder and gathers each row's head ``V w_u``, and returns
plain floats: the rewards ``PersonalRewardModel.score_text`` gives for the same prompt, response and
user. An unknown user, a missing user id or bad text raises a ``LoreDataError`` naming the row; a
reward that is not finite is never returned. The run is loaded once per process (``load_run``) and
kept, for the functions are called every step; the callables hold only where the run is, so they
pickle cheaply (Ray ships them to its workers, each of which loads the run once).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lore_pl.data.basis_file import check_user_id, resolve_basis_path
from lore_pl.data.embedder import as_messages
from lore_pl.errors import LoreDataError
from lore_pl.inference import PersonalRewardModel, Prompt, text_items

#: the models ``load_run`` loaded in this process: (basis file, its version, device, batch size) -> model
_LOADED: dict[tuple, PersonalRewardModel] = {}
_LOADING = threading.Lock()  # OpenRLHF calls its reward function from several threads at once


def load_run(run: str | os.PathLike, *, device: str | None = None, batch_size: int | None = None
             ) -> PersonalRewardModel:
    """The run's ``PersonalRewardModel`` (``from_run``) with its text embedder loaded, once per process:
    later calls with the same run, device and batch size return the same model. A basis file rewritten
    since (another inode, modification time or size) is loaded afresh."""
    path = resolve_basis_path(run).resolve()
    status = path.stat()
    version = (status.st_ino, status.st_mtime_ns, status.st_size)  # save_basis replaces the file: a new inode
    key = (str(path), version, None if device is None else str(device), batch_size)
    with _LOADING:
        model = _LOADED.get(key)
        if model is None:
            model = PersonalRewardModel.from_run(path, batch_size=batch_size, device=device)
            model.text_embedder  # noqa: B018 - loaded here, under the lock, so threads share one copy
            for stale in [other for other in _LOADED if other[0] == key[0] and other[1] != version]:
                del _LOADED[stale]
            _LOADED[key] = model
    return model


class RunSource:
    """Where a reward function's model comes from: a run (a directory or basis file, loaded by
    ``load_run`` in whichever process calls), or a ``PersonalRewardModel`` given as it is."""

    def __init__(self, run: str | os.PathLike | PersonalRewardModel, device: str | None = None,
                 batch_size: int | None = None) -> None:
        self.given = run if isinstance(run, PersonalRewardModel) else None
        self.run = None if self.given is not None else str(run)
        self.device, self.batch_size = device, batch_size

    def model(self) -> PersonalRewardModel:
        if self.given is not None:
            return self.given
        return load_run(self.run, device=self.device, batch_size=self.batch_size)


def personal_rewards(model: PersonalRewardModel, prompts: Sequence[Prompt], responses: Sequence[str],
                     users: Sequence[str], where: str) -> list[float]:
    """Row i's reward ``e_i . V w_{users[i]}`` for ``responses[i]`` to ``prompts[i]``: every row embedded
    in one pass, each row's head gathered from its user's weights. Bad rows raise before any embedding."""
    if not len(prompts) == len(responses) == len(users):
        raise LoreDataError(f"{where}: {len(prompts)} prompts, {len(responses)} responses and {len(users)} user ids; "
                            "one of each per row")
    known = set(model.user_ids)
    for row, user in enumerate(users):
        check_user_id(user, f"{where}: row {row}: the user id")
        if user not in known:
            raise LoreDataError(f"{where}: row {row}: unknown user {user!r}: not among the {len(known)} users "
                                f"of {model.source or 'the model'}")
    items = [text_items(prompt, [response], f"{where}: row {row}")[0]
             for row, (prompt, response) in enumerate(zip(prompts, responses))]
    if not items:
        return []
    embeddings = model.text_embedder(items).float()
    if embeddings.shape[1] != model.basis.shape[0]:
        raise LoreDataError(f"{where}: the embedder gives d={embeddings.shape[1]}, the basis {model.source} has "
                            f"d={model.basis.shape[0]}")
    first_bad_row(~torch.isfinite(embeddings).all(dim=1), where, "its embedding holds NaN or Inf")
    heads = model.heads(list(users)).T  # [n, d]: row i's V w_u
    rewards = (embeddings * heads).sum(dim=1)
    first_bad_row(~torch.isfinite(rewards), where, "its reward overflows float32")
    return [float(reward) for reward in rewards]


def first_bad_row(bad: torch.Tensor, where: str, what: str) -> None:
    """A ``LoreDataError`` naming the first row flagged in ``bad`` (and how many there are), if any."""
    rows = bad.nonzero().flatten().tolist()
    if rows:
        raise LoreDataError(f"{where}: row {rows[0]}: {what} ({len(rows)} such row(s)); nothing was returned")


def conversation_row(prompt: Any, completion: Any, where: str) -> tuple[Prompt, str]:
    """TRL's prompt and completion as (prompt, response): a plain completion is the response; of a
    conversational one (a list of turns) the last turn, the assistant's, is the response, and turns
    before it continue the prompt."""
    if isinstance(completion, str):
        return prompt, completion
    if isinstance(completion, (list, tuple)) and completion:
        turns = as_messages(completion, f"{where}: completion")
        if turns[-1]["role"] != "assistant":
            raise LoreDataError(f"{where}: completion: the last turn must be the assistant's (the response), got "
                                f"role {turns[-1]['role']!r}")
        if len(turns) == 1:
            return prompt, turns[0]["content"]
        return as_messages(prompt, f"{where}: prompt") + turns[:-1], turns[-1]["content"]
    raise LoreDataError(f"{where}: a completion must be a string or a list of chat turns, got "
                        f"{type(completion).__name__}")


class TRLReward:
    """``(prompts, completions, **columns) -> list[float]``, as TRL's GRPO, RLOO and Online DPO trainers
    call a reward function: the user of row i is ``columns[user_column][i]``."""

    def __init__(self, source: RunSource, user_column: str) -> None:
        self.source, self.user_column = source, user_column
        self.__name__ = "lore_pl_personal_reward"  # TRL names its reward columns and logs after it

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        where = "trl_reward_func"
        if self.user_column not in columns:
            raise LoreDataError(f"{where}: the trainer passed no column {self.user_column!r} (it passed "
                                f"{sorted(columns)}); the dataset needs the user id column, or name it with "
                                "user_column=")
        users = list(columns[self.user_column])
        if not len(prompts) == len(completions) == len(users):
            raise LoreDataError(f"{where}: {len(prompts)} prompts, {len(completions)} completions and {len(users)} "
                                f"values of {self.user_column!r}; one of each per row")
        rows = [conversation_row(prompt, completion, f"{where}: row {row}")
                for row, (prompt, completion) in enumerate(zip(prompts, completions))]
        return personal_rewards(self.source.model(), [prompt for prompt, _ in rows],
                                [response for _, response in rows], users, where)


def trl_reward_func(run: str | os.PathLike | PersonalRewardModel, user_column: str = "user_id", *,
                    device: str | None = None, batch_size: int | None = None) -> TRLReward:
    """A reward function for TRL's ``GRPOTrainer`` / ``RLOOTrainer`` / ``OnlineDPOTrainer``
    (``reward_funcs=``): every dataset column but ``prompt`` reaches it, so ``user_column`` routes each
    row to its user. Prompts and completions may be strings or conversations (lists of
    ``{"role", "content"}`` turns). ``run``: a run directory, a basis file, or a ``PersonalRewardModel``;
    ``device`` / ``batch_size``: where the embedder runs and how many texts per forward pass."""
    source = RunSource(run, device, batch_size)
    source.model()  # a wrong run fails here, not at the first training step
    return TRLReward(source, user_column)


def user_of_label(label: Any, user_key: str, where: str) -> str:
    """The user id OpenRLHF passes as a label: the label itself, or its ``user_key`` for a mapping."""
    if isinstance(label, Mapping):
        if user_key not in label:
            raise LoreDataError(f"{where}: the label has no key {user_key!r} (the user id); it has {sorted(label)}")
        return label[user_key]
    return label


def response_of_query(query: Any, prompt: Any, suffixes: Sequence[str], where: str) -> str:
    """The response in OpenRLHF's query (the prompt's text followed by the response's), without the
    ``suffixes`` it ends in (e.g. the policy's end-of-sequence text)."""
    if not isinstance(query, str) or not isinstance(prompt, str):
        raise LoreDataError(f"{where}: the query and the prompt must be strings, got {type(query).__name__} and "
                            f"{type(prompt).__name__}")
    if not query.startswith(prompt):
        raise LoreDataError(f"{where}: the query does not begin with its prompt, so the response cannot be told "
                            f"apart (prompt {prompt[:40]!r}..., query {query[:40]!r}...)")
    return trim_suffixes(query[len(prompt):], suffixes)


def trim_suffixes(response: str, suffixes: Sequence[str]) -> str:
    """``response`` without the ``suffixes`` it ends in (each, as often as it repeats)."""
    trimmed = True
    while trimmed:
        trimmed = False
        for suffix in suffixes:
            if suffix and response.endswith(suffix):
                response, trimmed = response[: -len(suffix)], True
    return response


class OpenRLHFReward:
    """``reward_func(queries, prompts, labels)``, the function OpenRLHF loads from the ``.py`` file given
    as its remote reward URL; the label of each row (``--label_key``) is its user id."""

    def __init__(self, source: RunSource, user_key: str, response_suffixes: Sequence[str],
                 prompt_parser: Callable[[str], Prompt] | None, output: str) -> None:
        if output not in ("dict", "tensor"):
            raise ValueError(f"output must be 'dict' or 'tensor', got {output!r}")
        if isinstance(response_suffixes, str):
            raise ValueError("response_suffixes is a list of strings, e.g. ['</s>'], not one string")
        self.source, self.user_key, self.output = source, user_key, output
        self.response_suffixes, self.prompt_parser = tuple(response_suffixes), prompt_parser
        self.__name__ = "reward_func"

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]
                 ) -> dict[str, Any] | torch.Tensor:
        where = "openrlhf_reward_func"
        if not len(queries) == len(prompts) == len(labels):
            raise LoreDataError(f"{where}: {len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; "
                                "one of each per row (--label_key names the user id column)")
        responses = [response_of_query(query, prompt, self.response_suffixes, f"{where}: row {row}")
                     for row, (query, prompt) in enumerate(zip(queries, prompts))]
        users = [user_of_label(label, self.user_key, f"{where}: row {row}") for row, label in enumerate(labels)]
        parsed = list(prompts) if self.prompt_parser is None else [self.prompt_parser(p) for p in prompts]
        rewards = torch.tensor(personal_rewards(self.source.model(), parsed, responses, users, where))
        if self.output == "tensor":
            return rewards
        return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": {}}


def openrlhf_reward_func(run: str | os.PathLike | PersonalRewardModel, *, user_key: str = "user_id",
                         response_suffixes: Sequence[str] = (), prompt_parser: Callable[[str], Prompt] | None = None,
                         output: str = "dict", device: str | None = None, batch_size: int | None = None
                         ) -> OpenRLHFReward:
    """OpenRLHF's reward function ``reward_func(queries, prompts, labels)``: write a file holding
    ``reward_func = openrlhf_reward_func(RUN)`` and give it as ``--remote_rm_url FILE.py --label_key user_id``.

    Each query is the prompt's text followed by the response's; the response is what follows the
    prompt, less any of ``response_suffixes`` it ends in (e.g. ``["</s>"]``: OpenRLHF keeps the special
    tokens). The prompt is scored as the text OpenRLHF sends (one user turn) unless ``prompt_parser``
    turns it into the prompt the basis was trained on (a string or chat list): with
    ``--apply_chat_template`` that text holds the policy's chat markup. A label is the row's user id, or a
    mapping holding it under ``user_key``. Returns ``{"rewards", "scores", "extra_logs"}`` (the rewards as
    a float tensor, the scores the same), or with ``output="tensor"`` the rewards alone (older OpenRLHF).
    """
    source = RunSource(run, device, batch_size)
    source.model()
    return OpenRLHFReward(source, user_key, response_suffixes, prompt_parser, output)


def verl_row(extra_info: Any, user_key: str, prompt_key: str, where: str) -> tuple[str, Prompt]:
    """The user id and the prompt of one verl row, from its ``extra_info``."""
    if not isinstance(extra_info, Mapping):
        raise LoreDataError(f"{where}: extra_info must be a mapping holding {user_key!r} (the user id) and "
                            f"{prompt_key!r} (the prompt), got {type(extra_info).__name__}")
    for key, what in ((user_key, "the user id"), (prompt_key, "the prompt")):
        if key not in extra_info:
            raise LoreDataError(f"{where}: extra_info has no key {key!r} ({what}); it has {sorted(extra_info)}")
    prompt = extra_info[prompt_key]
    if hasattr(prompt, "tolist") and not isinstance(prompt, str):  # a chat list read back from parquet
        prompt = prompt.tolist()
    return extra_info[user_key], prompt


def verl_compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                             extra_infos: Sequence[Any], *, run: str | os.PathLike | PersonalRewardModel | None = None,
                             user_key: str = "user_id", prompt_key: str = "prompt",
                             response_suffixes: Sequence[str] = (), device: str | None = None,
                             batch_size: int | None = None, **unused: Any) -> list[float]:
    """verl's batched form (``reward_model.reward_manager=batch``): one reward per row, all rows embedded
    in one pass; see ``verl_compute_score``."""
    return verl_scores(solution_strs, extra_infos, run, user_key, prompt_key, response_suffixes, device, batch_size,
                       "verl_compute_score_batch")


def verl_compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, *,
                       run: str | os.PathLike | PersonalRewardModel | None = None, user_key: str = "user_id",
                       prompt_key: str = "prompt", response_suffixes: Sequence[str] = (), device: str | None = None,
                       batch_size: int | None = None, **unused: Any) -> float:
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)`` for one response.

    verl hands the function the response alone, so each row's ``extra_info`` carries its user id
    (``user_key``) and its prompt (``prompt_key``: a string or chat list); ``run`` comes from the config,
    ``custom_reward_function.reward_kwargs.run=RUN``, which verl passes as a keyword (so do
    ``user_key``, ``prompt_key``, ``response_suffixes``, ``device`` and ``batch_size``; keywords of verl's
    own that this does not use are ignored). ``data_source`` and ``ground_truth`` are not used.
    """
    return verl_scores([solution_str], [extra_info], run, user_key, prompt_key, response_suffixes, device,
                       batch_size, "verl_compute_score")[0]


def verl_scores(solutions: Sequence[str], extra_infos: Sequence[Any], run: Any, user_key: str, prompt_key: str,
                suffixes: Sequence[str], device: str | None, batch_size: int | None, where: str) -> list[float]:
    """The rewards of verl's rows: each row's user id and prompt from its ``extra_info``."""
    if run is None:
        raise LoreDataError(f"{where}: no run to score with: set custom_reward_function.reward_kwargs.run=RUN in "
                            "verl's config (a run directory or basis file)")
    if isinstance(suffixes, str):
        raise ValueError("response_suffixes is a list of strings, e.g. ['</s>'], not one string")
    if len(solutions) != len(extra_infos):
        raise LoreDataError(f"{where}: {len(solutions)} responses but {len(extra_infos)} extra_info; one of each "
                            "per row")
    rows = [verl_row(info, user_key, prompt_key, f"{where}: row {row}") for row, info in enumerate(extra_infos)]
    responses = [trim_suffixes(solution, suffixes) if isinstance(solution, str) else solution for solution in solutions]
    model = RunSource(run, device, batch_size).model()
    return personal_rewards(model, [prompt for _, prompt in rows], responses, [user for user, _ in rows], where)
