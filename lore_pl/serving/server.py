"""``lore-pl serve --run RUN``: a run's personal rewards over HTTP (FastAPI on uvicorn).

One process. The event loop reads and checks every request, so a bad row is refused with a 4xx naming
it before it can join a batch of other clients' rows; the checked rows of up to ``--max-batch``
requests (several users mixed) are embedded in one pass on one thread beside it and each row's user's
head is gathered (``Batcher``). An update is fitted on a copy of the users, appended to the journal
and fsynced, and only then made current and answered: every request sent after the answer sees it,
and a restart replays it. The basis file is only read.

Not on LitServe: litserve 0.2.19 installs a console script named ``lightning`` (``litserve.cli:main``)
that replaces this project's ``lightning`` command, and that, when run, pip-installs lightning-sdk
(whose own ``lightning`` script replaces it again).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hmac
import json
import math
import os
import sys
import threading
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from lore_pl.data.basis_file import resolve_basis_path
from lore_pl.errors import LoreDataError
from lore_pl.inference import PersonalRewardModel
from lore_pl.rlhf import load_run
from lore_pl.serving.batching import Batcher
from lore_pl.serving.journal import Journal
from lore_pl.serving.requests import (
    Limits,
    RequestRefused,
    Rows,
    get_reward_rows,
    observe_pair,
    personalize_pairs,
    score_rows,
    write_user,
)
from lore_pl.serving.updates import apply_update, forget_record, observe_record, personalize_record, replay

#: the environment variable that holds the write endpoints' bearer token (or ``--token-file``)
TOKEN_ENV = "LORE_PL_SERVE_TOKEN"
#: the journal's name beside the basis file when ``--journal`` is not given
JOURNAL_NAME = "serve-journal.jsonl"


@dataclass(frozen=True)
class ServeSettings:
    run: str
    journal: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    default_user: str | None = None
    token_file: str | None = None
    max_rows: int = 1024
    max_text_chars: int = 100_000
    max_body_bytes: int = 16 * 2**20
    max_batch: int = 16
    batch_timeout: float = 0.002
    timeout: float = 120.0
    threads: int | None = None

    @property
    def basis_path(self) -> Path:
        return resolve_basis_path(self.run)

    @property
    def journal_path(self) -> Path:
        return Path(self.journal) if self.journal else self.basis_path.parent / JOURNAL_NAME

    @property
    def limits(self) -> Limits:
        return Limits(max_rows=self.max_rows, max_text_chars=self.max_text_chars)


@dataclass
class Job:
    """What the batch thread does for one request: score ``rows`` (``kind="score"``) or embed them."""

    kind: str
    rows: Rows


def scored(users: PersonalRewardModel, embeddings: torch.Tensor, names: list[str]) -> dict:
    """Each row's reward ``e . V w_u`` (one gather of the users' weights) and its standard deviation from
    ``w_u``'s covariance (None where the user has none); a refusal naming the row otherwise."""
    rows = {user: row for row, user in enumerate(users.user_ids)}
    unknown = [(number, user) for number, user in enumerate(names) if user not in rows]
    if unknown:  # forgotten between the request's check and its batch
        number, user = unknown[0]
        return {"error": f"row {number}: unknown user {user!r} (forgotten)", "status": 404}
    index = torch.tensor([rows[user] for user in names], dtype=torch.long)
    directions = embeddings @ users.basis.to(embeddings.dtype)  # [n, K]: e . V
    rewards = (directions * users.user_weights.to(embeddings.dtype)[index]).sum(-1)
    spread = torch.full_like(rewards, float("nan"))  # NaN: the user has no covariance
    for user in dict.fromkeys(names):
        covariance = users.weight_covariance(user)
        if covariance is not None:
            mine = index == rows[user]
            part = directions[mine]
            spread[mine] = ((part @ covariance.to(embeddings.dtype)) * part).sum(-1).clamp(min=0).sqrt()
    bad = (torch.isinf(spread) | ~torch.isfinite(rewards)).nonzero()
    if len(bad):
        return {"error": f"row {int(bad[0])}: the reward or its spread overflows float32", "status": 422}
    return {"rewards": rewards.tolist(), "score_std": [None if math.isnan(v) else v for v in spread.tolist()]}


# ---------------------------------------------------------------------------------------- the server
class RewardServer:
    """The HTTP endpoints: check requests, batch their rows, apply and journal user updates."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.token = read_token(settings.token_file)
        # the users (basis, weights, covariances: small, copied for each update) apart from the embedder
        self.users = PersonalRewardModel.from_run(settings.run)
        self.journal = Journal(settings.journal_path, writer=True)
        replay(self.users, self.journal.read_new())
        self.known = frozenset(self.users.user_ids)
        if settings.default_user is not None and settings.default_user not in self.known:
            raise LoreDataError(f"--default-user {settings.default_user!r} is not a user of {settings.basis_path} "
                                f"(nor added by its journal {settings.journal_path})")
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.embedder = load_run(settings.run)  # the embedder loaded now (a missing model fails the start)
        self.write_lock = threading.Lock()
        self.batcher = Batcher(self._work, settings.max_batch, settings.batch_timeout)
        self.app = self._app()

    def _app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            self.batcher.start()
            yield
            await self.batcher.stop()

        app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
        app.add_api_route("/get_reward", self.get_reward, methods=["POST"])
        app.add_api_route("/score", self.score, methods=["POST"])
        app.add_api_route("/personalize", self.personalize, methods=["POST"])
        app.add_api_route("/observe", self.observe, methods=["POST"])
        app.add_api_route("/forget", self.forget, methods=["POST"])
        app.add_api_route("/users", self.list_users, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        return app

    def run(self) -> None:
        import uvicorn

        print(f"serving {self.settings.basis_path} ({len(self.known)} users; journal {self.settings.journal_path}, "
              f"{self.journal.sequence} updates) at http://{self.settings.host}:{self.settings.port}", file=sys.stderr,
              flush=True)
        uvicorn.run(self.app, host=self.settings.host, port=self.settings.port, log_level="warning",
                    timeout_graceful_shutdown=5)

    def _work(self, jobs: list[Job]) -> list[dict]:
        """The batch thread: every job's rows embedded in one pass, then scored for their users or returned."""
        users = self.users  # one set of users for the whole batch (an update swaps in a new one)
        items = [item for job in jobs for item in job.rows.items]
        with torch.inference_mode():
            embeddings = self.embedder.text_embedder(items).to(torch.float32)
        results, start = [], 0
        for job in jobs:
            rows = embeddings[start : start + len(job.rows.items)]
            start += len(job.rows.items)
            bad = (~torch.isfinite(rows).all(-1)).nonzero()
            if len(bad):
                results.append({"error": f"row {int(bad[0])}: the embedder gave NaN or Inf", "status": 422})
            elif job.kind == "embed":
                results.append({"embeddings": rows.clone()})
            else:
                results.append(scored(users, rows, job.rows.users))
        return results

    # ----------------------------------------------------------------------- the endpoints
    async def get_reward(self, request: Request):
        """OpenRLHF's remote reward: ``{"query", "prompts", "labels"}`` in, ``{"rewards", "scores",
        "extra_logs"}`` out (``extra_logs.score_std`` where every row's user has a covariance)."""
        async def answer(body):
            rows = get_reward_rows(body, self.known, self.settings.default_user, self.limits)
            result = await self._submit(Job("score", rows))
            logs = {} if None in result["score_std"] else {"score_std": result["score_std"]}
            return {"rewards": result["rewards"], "scores": result["rewards"], "extra_logs": logs}

        return await self._respond(request, answer)

    async def score(self, request: Request):
        """The native endpoint: ``{"rows": [{"user", "prompt", "response"}]}`` in, each row's ``reward``
        and ``score_std`` out (null where the basis keeps no covariance for the user)."""
        async def answer(body):
            rows = score_rows(body, self.known, self.settings.default_user, self.limits)
            result = await self._submit(Job("score", rows))
            return {"rewards": result["rewards"], "score_std": result["score_std"], "users": rows.users}

        return await self._respond(request, answer)

    async def personalize(self, request: Request):
        """Fit a user (new or known) on ``pairs`` with the one solver; answers the weights once journaled."""
        async def answer(body):
            user = write_user(body)
            chosen, rejected, options = personalize_pairs(body, self.limits)
            embeddings = await self._embed(chosen + rejected)
            record = personalize_record(user, embeddings[: len(chosen)], embeddings[len(chosen):], options)
            return await self._update(record)

        return await self._respond(request, answer, write=True)

    async def observe(self, request: Request):
        """Record that a user preferred ``responses[choice]`` on ``prompt`` and refit them."""
        async def answer(body):
            user = write_user(body)
            items, choice = observe_pair(body, self.limits)
            return await self._update(observe_record(user, await self._embed(items), choice))

        return await self._respond(request, answer, write=True)

    async def forget(self, request: Request):
        """Remove a user (the basis's own too) from this server, journaled like every update."""
        async def answer(body):
            user = write_user(body)
            if user not in self.known:
                raise RequestRefused(404, f"'user': unknown user {user!r}: nothing to forget")
            return await self._update(forget_record(user))

        return await self._respond(request, answer, write=True)

    async def health(self, request: Request):
        return PlainTextResponse("ok")  # the server listens only once the embedder is loaded

    async def list_users(self, request: Request):
        return {"users": self.users.user_ids, "journal": self.journal.sequence,
                "default_user": self.settings.default_user}

    # ------------------------------------------------------------------------ the plumbing
    async def _respond(self, request: Request, answer, *, write: bool = False):
        try:
            if write:
                self._authorize(request)
            return JSONResponse(await answer(await self._body(request)))
        except RequestRefused as refused:
            headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
            return JSONResponse({"detail": refused.message}, status_code=refused.status, headers=headers)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            raise RequestRefused(403, f"write endpoints are off: start the server with a token ({TOKEN_ENV} or "
                                      "--token-file)")
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise RequestRefused(401, "a write needs the header 'Authorization: Bearer <token>' with the server's "
                                      "token")

    async def _body(self, request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise RequestRefused(413, f"the body is {declared} bytes; at most {self.settings.max_body_bytes} "
                                      "(--max-body-bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.settings.max_body_bytes:
                raise RequestRefused(413, f"the body exceeds {self.settings.max_body_bytes} bytes (--max-body-bytes)")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestRefused(400, f"the body is not JSON: {error}") from None

    async def _submit(self, job: Job) -> dict:
        """The batch thread's result for ``job`` (batched with other requests'); its refusals raised."""
        try:
            result = await asyncio.wait_for(self.batcher.submit(job), self.settings.timeout)
        except asyncio.TimeoutError:
            raise RequestRefused(503, f"the server is busy: no answer within --timeout {self.settings.timeout:g} "
                                      "s; try again") from None
        if "error" in result:
            raise RequestRefused(result["status"], result["error"])
        return result

    async def _embed(self, items) -> torch.Tensor:
        return (await self._submit(Job("embed", Rows([], items))))["embeddings"]

    async def _update(self, record: dict) -> dict:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._apply, record)

    def _apply(self, record: dict) -> dict:
        """Apply ``record`` to a copy of the users, journal it (fsync), then make the copy current: a
        refused update or a failed write leaves both the users and the journal as they were."""
        with self.write_lock:
            candidate = copy.deepcopy(self.users)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # K=1's "pairs change nothing" is said in the answer's weights
                    weights = apply_update(candidate, record)
            except KeyError as error:
                raise RequestRefused(404, f"'user': {error.args[0]}") from None
            except (ValueError, LoreDataError) as error:
                raise RequestRefused(422, str(error)) from None
            if weights is not None:
                record = {**record, "weights": weights.tolist()}
            sequence = self.journal.append(record)
            self.users, self.known = candidate, frozenset(candidate.user_ids)
        answer = {"user": record["user"], "op": record["op"], "journal": sequence}
        if weights is not None:
            answer["weights"] = record["weights"]
        return answer


def read_token(token_file: str | None) -> str | None:
    """The write endpoints' token: ``--token-file``'s first line, else ``$LORE_PL_SERVE_TOKEN``; None: writes off."""
    if token_file is not None:
        lines = Path(token_file).read_text().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise LoreDataError(f"--token-file {token_file}: the file holds no token (its first line is empty)")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


# ---------------------------------------------------------------------------------- the command
def parser() -> argparse.ArgumentParser:
    defaults = ServeSettings(run="")
    parse = argparse.ArgumentParser(prog="lore-pl serve", description="Serve a run's personal rewards over HTTP "
                                    "(OpenRLHF's POST /get_reward, POST /score, and user updates).")
    parse.add_argument("--run", required=True, help="the run directory (its basis.safetensors) or a basis file")
    parse.add_argument("--host", default=defaults.host,
                       help="the interface to listen on (default: this machine only; 0.0.0.0: every interface)")
    parse.add_argument("--port", type=int, default=defaults.port)
    parse.add_argument("--journal", default=None, help=f"the update journal (default: {JOURNAL_NAME} beside the basis)")
    parse.add_argument("--default-user", default=None, help="the user of rows that name none (null labels)")
    parse.add_argument("--token-file", default=None, help=f"a file whose first line is the write endpoints' bearer "
                                                          f"token (default: ${TOKEN_ENV}; without one, writes are off)")
    parse.add_argument("--max-rows", type=int, default=defaults.max_rows, help="rows (or pairs) per request")
    parse.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars,
                       help="characters per prompt, response or query")
    parse.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="bytes per request body")
    parse.add_argument("--max-batch", type=int, default=defaults.max_batch,
                       help="requests whose rows are embedded in one pass")
    parse.add_argument("--batch-timeout", type=float, default=defaults.batch_timeout,
                       help="seconds a batch waits for more requests")
    parse.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds a request may wait")
    parse.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parse


def settings_from(argv: list[str]) -> ServeSettings:
    args = parser().parse_args(argv)
    for name in ("max_rows", "max_text_chars", "max_body_bytes", "max_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LoreDataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 1 <= args.port <= 65535:
        raise LoreDataError(f"--port must be from 1 to 65535, got {args.port}")
    if not 0 <= args.batch_timeout < args.timeout:
        raise LoreDataError(f"--batch-timeout must be at least 0 and below --timeout ({args.timeout}), got "
                            f"{args.batch_timeout}")
    return ServeSettings(**{name.replace("-", "_"): value for name, value in vars(args).items()})


def serve(argv: list[str]) -> None:
    """Start the server (blocks until SIGINT or SIGTERM); bad settings raise ``LoreDataError`` before it listens."""
    RewardServer(settings_from(argv)).run()


def main(argv: list[str] | None = None) -> None:
    """``lore-pl-serve`` / ``python -m lore_pl.serving``: a bad setting or file is one line ``error: ...``
    and exit 2 (as ``lore-pl``'s commands; lore_pl.cli is not imported: it loads Lightning, which serving needs not)."""
    try:
        serve(sys.argv[1:] if argv is None else list(argv))
    except (LoreDataError, OSError) as error:
        if os.environ.get("LORE_PL_TRACEBACK"):
            raise
        named = getattr(error, "filename", None)
        message = f"{named}: {error.strerror}" if isinstance(error, OSError) and named and error.strerror else error
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
