"""What the reward server accepts: each request body read into rows ``(user, item)``, or refused with
the HTTP status and a message naming the row and the field (never a 500)."""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass

from lore_pl.data.basis_file import check_user_id
from lore_pl.data.embedder import Item
from lore_pl.errors import LoreDataError
from lore_pl.inference import text_items
from lore_pl.serving.updates import PERSONALIZE_OPTIONS

#: the most solver steps a write may ask for (one write holds the others up while it fits)
MAX_STEPS = 10_000


class RequestRefused(Exception):
    """A request the server will not serve: ``status`` (4xx) and a message naming what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """The bounds of one request."""

    max_rows: int = 1024  # rows (or pairs) per request
    max_text_chars: int = 100_000  # characters per prompt, response or query


@dataclass
class Rows:
    """Rows to score: the user and the item ``[messages, response]`` of each."""

    users: list[str]
    items: list[Item]


def _list(body: dict, key: str, count: int | None, limits: Limits, *, required: bool = True) -> list | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise RequestRefused(422, f"'{key}' must be a list, got {type(value).__name__}")
    if count is None and len(value) > limits.max_rows:
        raise RequestRefused(413, f"'{key}' holds {len(value)} rows; at most {limits.max_rows} a request (--max-rows)")
    if count is None and not value:
        raise RequestRefused(422, f"'{key}' is empty: nothing to score")
    if count is not None and len(value) != count:
        raise RequestRefused(422, f"'{key}' holds {len(value)} entries but 'query' holds {count}: one per query")
    return value


def _text(value, where: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise RequestRefused(422, f"{where} must be a string, got {type(value).__name__}")
    if len(value) > limits.max_text_chars:
        raise RequestRefused(413, f"{where} is {len(value)} characters long; at most {limits.max_text_chars} "
                                  "(--max-text-chars)")
    return value


def _prompt(value, where: str, limits: Limits):
    """A prompt: a string, or a chat list whose contents are bounded like a string's."""
    if isinstance(value, list):
        for turn in value:
            if isinstance(turn, dict):
                _text(turn.get("content", ""), f"{where} (a turn's content)", limits)
        return value
    return _text(value, where, limits)


def _items(prompt, response: str, where: str) -> Item:
    try:
        return text_items(prompt, [response], where)[0]
    except LoreDataError as error:
        raise RequestRefused(422, str(error)) from None


def _user(value, where: str, users: Container[str]) -> str:
    try:
        user = check_user_id(value, where)
    except LoreDataError as error:
        raise RequestRefused(422, str(error)) from None
    if user not in users:
        raise RequestRefused(404, f"{where}: unknown user {user!r}; this server knows the basis's users and those "
                                  "added by /personalize or /observe")
    return user


def body_object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestRefused(422, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def get_reward_rows(body, users: Container[str], default_user: str | None, limits: Limits) -> Rows:
    """OpenRLHF's ``{"query": [...], "prompts": [...], "labels": [...]}``: each query is its prompt
    followed by the response; ``labels[i]`` names row i's user (missing or null: the default user)."""
    body = body_object(body)
    queries = _list(body, "query", None, limits)
    prompts = _list(body, "prompts", len(queries), limits)
    labels = _list(body, "labels", len(queries), limits, required=False) or [None] * len(queries)
    rows = Rows([], [])
    for row, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        query = _text(query, f"row {row}: query[{row}]", limits)
        prompt = _text(prompt, f"row {row}: prompts[{row}]", limits)
        if not query.startswith(prompt):
            raise RequestRefused(422, f"row {row}: query[{row}] does not start with prompts[{row}]: the response is "
                                      "what follows the prompt in the query")
        if label is None:
            if default_user is None:
                raise RequestRefused(422, f"row {row}: labels[{row}] names no user and the server has no default "
                                          "user (--default-user)")
            label = default_user
        rows.users.append(_user(label, f"row {row}: labels[{row}]", users))
        rows.items.append(_items(prompt, query[len(prompt):], f"row {row}"))
    return rows


def score_rows(body, users: Container[str], default_user: str | None, limits: Limits) -> Rows:
    """The native ``{"rows": [{"user", "prompt", "response"}, ...], "user": default}``; a prompt is a
    string or a chat list of ``{"role", "content"}`` turns."""
    body = body_object(body)
    entries = _list(body, "rows", None, limits)
    default = body.get("user", default_user)
    rows = Rows([], [])
    for row, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RequestRefused(422, f"row {row}: must be an object with 'prompt', 'response' and 'user', got "
                                      f"{type(entry).__name__}")
        user = entry.get("user", default)
        if user is None:
            raise RequestRefused(422, f"row {row}: names no user, and neither the request nor the server a default")
        rows.users.append(_user(user, f"row {row}: user", users))
        prompt = _prompt(entry.get("prompt"), f"row {row}: prompt", limits)
        response = _text(entry.get("response"), f"row {row}: response", limits)
        rows.items.append(_items(prompt, response, f"row {row}"))
    return rows


def write_user(body) -> str:
    """The user a write request names (``"user"``), any id that is a non-empty string."""
    try:
        return check_user_id(body_object(body).get("user"), "'user'")
    except LoreDataError as error:
        raise RequestRefused(422, str(error)) from None


def personalize_pairs(body, limits: Limits) -> tuple[list[Item], list[Item], dict]:
    """``{"user", "pairs": [{"prompt", "chosen", "rejected"}, ...], "options": {...}}``: the chosen and the
    rejected items, and ``personalize``'s options (``PERSONALIZE_OPTIONS``)."""
    pairs = _list(body_object(body), "pairs", None, limits)
    chosen, rejected = [], []
    for number, pair in enumerate(pairs):
        where = f"pair {number}"
        if not isinstance(pair, dict):
            raise RequestRefused(422, f"{where}: must be an object with 'prompt', 'chosen' and 'rejected'")
        prompt = _prompt(pair.get("prompt"), f"{where}: prompt", limits)
        better = _text(pair.get("chosen"), f"{where}: chosen", limits)
        worse = _text(pair.get("rejected"), f"{where}: rejected", limits)
        if better == worse:
            raise RequestRefused(422, f"{where}: chosen and rejected are identical")
        chosen.append(_items(prompt, better, f"{where}: chosen"))
        rejected.append(_items(prompt, worse, f"{where}: rejected"))
    return chosen, rejected, personalize_options(body.get("options"))


def personalize_options(options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestRefused(422, f"'options' must be an object, got {type(options).__name__}")
    checked = {}
    for key, value in options.items():
        kind = PERSONALIZE_OPTIONS.get(key)
        if kind is None:
            raise RequestRefused(422, f"options.{key}: not an option of personalize (one of "
                                      f"{', '.join(PERSONALIZE_OPTIONS)})")
        if value is None and key == "prior_strength":
            checked[key] = None
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
            raise RequestRefused(422, f"options.{key}: must be a finite {kind.__name__}, got {value!r:.40}")
        if key == "steps" and not 1 <= value <= MAX_STEPS:
            raise RequestRefused(422, f"options.steps: must be from 1 to {MAX_STEPS}, got {value}")
        checked[key] = value
    return checked


def observe_pair(body, limits: Limits) -> tuple[list[Item], int]:
    """``{"user", "prompt", "responses": [a, b], "choice": 0 or 1}``: the pair's two items and the choice."""
    body = body_object(body)
    prompt = _prompt(body.get("prompt"), "prompt", limits)
    responses = body.get("responses")
    if not isinstance(responses, list) or len(responses) != 2:
        raise RequestRefused(422, "'responses' must be a list of the pair's two responses")
    first, second = (_text(response, f"responses[{i}]", limits) for i, response in enumerate(responses))
    if first == second:
        raise RequestRefused(422, "responses[0] and responses[1] are identical")
    choice = body.get("choice")
    if choice not in (0, 1) or isinstance(choice, (bool, float)):
        raise RequestRefused(422, f"'choice' must be 0 (the first response preferred) or 1 (the second), got "
                                  f"{choice!r:.40}")
    return [_items(prompt, first, "responses[0]"), _items(prompt, second, "responses[1]")], choice
