"""``lore-pl serve --run RUN``: a run's personal rewards over HTTP, on LitServe.

Two processes share the work. The API process (uvicorn, in a thread of the main process) reads and
checks every request, so that a bad row is refused with a 4xx naming it before it can reach a batch of
other clients' rows; it also holds the users for the write endpoints and appends each update to the
journal (fsynced) before it answers. LitServe's inference worker embeds: it takes the checked rows of
up to ``--max-batch`` requests at once (several users mixed), embeds them in one pass and gathers each
row's user's head; before each batch it replays what the journal gained, so an acknowledged update is
seen by every later request. The basis file is only read.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import hmac
import json
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import litserve as ls
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from litserve.server import RegularRequestHandler

from lore_pl.data.basis_file import resolve_basis_path
from lore_pl.errors import LoreDataError
from lore_pl.inference import PersonalRewardModel
from lore_pl.serving.journal import Journal, decode_tensor, encode_tensor
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
#: the inference worker's own route; only the server's checked endpoints feed it (removed from the app)
WORKER_PATH = "/_rows"
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
    batch_timeout: float = 0.005
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


# ------------------------------------------------------------------------------------- the worker
class RowScorer(ls.LitAPI):
    """LitServe's worker: a batch of checked requests (``{"kind": "score"|"embed", "items", "users"}``)
    in, one embedding pass and one gather of the users' heads, a result per request out."""

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(max_batch_size=settings.max_batch, batch_timeout=settings.batch_timeout,
                         api_path=WORKER_PATH)
        self.settings = settings

    def setup(self, device) -> None:
        die_with_parent()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.model = PersonalRewardModel.from_run(self.settings.run)
        self.model.text_embedder  # noqa: B018 - loaded now, not on the first request
        self.journal = Journal(self.settings.journal_path, writer=False)
        self._catch_up()

    def _catch_up(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the API process said it already when it replayed the same records
            replay(self.model, self.journal.read_new())
        self._rows = {user: row for row, user in enumerate(self.model.user_ids)}

    def decode_request(self, request):
        return request

    def batch(self, inputs):
        return inputs

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output

    def predict(self, requests):
        single = isinstance(requests, dict)  # max_batch_size 1: LitServe hands one request
        requests = [requests] if single else requests
        before = self.journal.sequence
        self._catch_up()
        items = [item for request in requests for item in request["items"]]
        with torch.inference_mode():
            embeddings = self.model.text_embedder(items).to(torch.float32)
        results, start = [], 0
        for request in requests:
            rows = embeddings[start : start + len(request["items"])]
            start += len(request["items"])
            result = self._embedded(rows) if request["kind"] == "embed" else self._scored(rows, request["users"])
            results.append({**result, "journal": self.journal.sequence, "replayed": self.journal.sequence - before})
        return results[0] if single else results

    def _embedded(self, rows: torch.Tensor) -> dict:
        bad = (~torch.isfinite(rows).all(-1)).nonzero()
        if len(bad):
            return {"error": f"row {int(bad[0])}: the embedder gave NaN or Inf", "status": 422}
        return {"embeddings": encode_tensor(rows)}

    def _scored(self, rows: torch.Tensor, users: list[str]) -> dict:
        """Each row's reward ``e . V w_u`` and its standard deviation from ``w_u``'s covariance."""
        unknown = [(number, user) for number, user in enumerate(users) if user not in self._rows]
        if unknown:  # forgotten between the API process's check and this batch
            number, user = unknown[0]
            return {"error": f"row {number}: unknown user {user!r} (forgotten)", "status": 404}
        model = self.model
        index = torch.tensor([self._rows[user] for user in users], dtype=torch.long)
        directions = rows @ model.basis.to(rows.dtype)  # [n, K]: e . V
        rewards = (directions * model.user_weights.to(rows.dtype)[index]).sum(-1)
        spread = torch.full_like(rewards, float("nan"))  # NaN: the user has no covariance
        for user in dict.fromkeys(users):
            covariance = model.weight_covariance(user)
            if covariance is not None:
                mine = index == self._rows[user]
                part = directions[mine]
                spread[mine] = ((part @ covariance.to(rows.dtype)) * part).sum(-1).clamp(min=0).sqrt()
        bad = (torch.isinf(spread) | ~torch.isfinite(rewards)).nonzero()
        if len(bad):
            return {"error": f"row {int(bad[0])}: the reward or its spread overflows float32", "status": 422}
        return {"rewards": rewards.tolist(), "score_std": [None if math.isnan(v) else v for v in spread.tolist()]}


# ---------------------------------------------------------------------------------- the API process
class RewardServer:
    """The HTTP side: checks requests, hands rows to the worker, applies and journals user updates."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.token = read_token(settings.token_file)
        # the users are the basis's and the journal's; the API process never loads the embedder
        self.model = PersonalRewardModel.from_run(settings.run)
        self.journal = Journal(settings.journal_path, writer=True)
        replay(self.model, self.journal.read_new())
        self.users = frozenset(self.model.user_ids)
        if settings.default_user is not None and settings.default_user not in self.users:
            raise LoreDataError(f"--default-user {settings.default_user!r} is not a user of {settings.basis_path} "
                                f"(nor added by its journal {settings.journal_path})")
        self.write_lock = threading.Lock()
        os.register_at_fork(after_in_child=die_with_parent)  # LitServe's queue manager, forked in run()
        self.scorer = RowScorer(settings)
        self.server = self._litserver()
        self.handler = RegularRequestHandler(self.scorer, self.server)

    def _litserver(self):
        server = ls.LitServer(self.scorer, accelerator="cpu", workers_per_device=1,
                           timeout=self.settings.timeout, disable_openapi_url=True)
        app = server.app
        app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) != WORKER_PATH]
        app.add_api_route("/get_reward", self.get_reward, methods=["POST"])
        app.add_api_route("/score", self.score, methods=["POST"])
        app.add_api_route("/personalize", self.personalize, methods=["POST"])
        app.add_api_route("/observe", self.observe, methods=["POST"])
        app.add_api_route("/forget", self.forget, methods=["POST"])
        app.add_api_route("/users", self.list_users, methods=["GET"])
        return server

    def run(self) -> None:
        print(f"serving {self.settings.basis_path} ({len(self.users)} users; journal {self.settings.journal_path}, "
              f"{self.journal.sequence} updates) at http://{self.settings.host}:{self.settings.port}", file=sys.stderr,
              flush=True)
        self.server.run(host=self.settings.host, port=self.settings.port, num_api_servers=1, log_level="warning",
                        generate_client_file=False, api_server_worker_type="thread")

    # ----------------------------------------------------------------------- the endpoints
    async def get_reward(self, request: Request):
        """OpenRLHF's remote reward: ``{"query", "prompts", "labels"}`` in, ``{"rewards", "scores",
        "extra_logs"}`` out (``extra_logs.score_std`` where every row's user has a covariance)."""
        async def answer(body):
            rows = get_reward_rows(body, self.users, self.settings.default_user, self.limits)
            result = await self._work(rows)
            logs = {} if None in result["score_std"] else {"score_std": result["score_std"]}
            return {"rewards": result["rewards"], "scores": result["rewards"], "extra_logs": logs}

        return await self._respond(request, answer)

    async def score(self, request: Request):
        """The native endpoint: ``{"rows": [{"user", "prompt", "response"}]}`` in, each row's ``reward``
        and ``score_std`` out (null where the basis keeps no covariance for the user)."""
        async def answer(body):
            rows = score_rows(body, self.users, self.settings.default_user, self.limits)
            result = await self._work(rows)
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
            if user not in self.users:
                raise RequestRefused(404, f"'user': unknown user {user!r}: nothing to forget")
            return await self._update(forget_record(user))

        return await self._respond(request, answer, write=True)

    async def list_users(self, request: Request):
        return {"users": self.model.user_ids, "journal": self.journal.sequence,
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

    async def _work(self, rows: Rows, kind: str = "score") -> dict:
        """The worker's result for ``rows`` (batched there with other requests); its refusals re-raised."""
        result = await self.handler.handle_request({"kind": kind, "items": rows.items, "users": rows.users}, dict)
        if "error" in result:
            raise RequestRefused(result["status"], result["error"])
        return result

    async def _embed(self, items) -> torch.Tensor:
        result = await self._work(Rows([], items), kind="embed")
        return decode_tensor(result["embeddings"], "the worker's embeddings")

    async def _update(self, record: dict) -> dict:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._apply, record)

    def _apply(self, record: dict) -> dict:
        """Apply ``record`` to a copy of the users, journal it (fsync), then make the copy current: a
        refused update or a failed write leaves both the users and the journal as they were."""
        with self.write_lock:
            candidate = copy.deepcopy(self.model)
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
            self.model, self.users = candidate, frozenset(candidate.user_ids)
        answer = {"user": record["user"], "op": record["op"], "journal": sequence}
        if weights is not None:
            answer["weights"] = weights.tolist()
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
    parse.add_argument("--host", default=defaults.host, choices=["127.0.0.1", "0.0.0.0", "::"],
                       help="the interface to listen on (default: this machine only)")
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
                       help="requests the worker embeds in one pass")
    parse.add_argument("--batch-timeout", type=float, default=defaults.batch_timeout,
                       help="seconds the worker waits to fill a batch")
    parse.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds a request may wait")
    parse.add_argument("--threads", type=int, default=None, help="the worker's torch threads (default: torch's)")
    return parse


def settings_from(argv: list[str]) -> ServeSettings:
    args = parser().parse_args(argv)
    for name in ("max_rows", "max_text_chars", "max_body_bytes", "max_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LoreDataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 1024 <= args.port <= 65535:
        raise LoreDataError(f"--port must be from 1024 to 65535 (LitServe's range), got {args.port}")
    if not 0 <= args.batch_timeout < args.timeout:
        raise LoreDataError(f"--batch-timeout must be at least 0 and below --timeout ({args.timeout}), got "
                            f"{args.batch_timeout}")
    return ServeSettings(**{name.replace("-", "_"): value for name, value in vars(args).items()})


def serve(argv: list[str]) -> None:
    """Start the server (blocks until SIGINT or SIGTERM); bad settings raise ``LoreDataError`` before it listens."""
    server = RewardServer(settings_from(argv))
    signal.signal(signal.SIGTERM, _interrupt)  # LitServe shuts its workers down on KeyboardInterrupt
    status = 1
    try:
        server.run()
        status = 0
    except BaseException:  # e.g. the worker failed to start or died: said, then the process ends
        traceback.print_exc()
    finally:
        # LitServe stops its worker and queues but cannot stop a uvicorn thread (it calls Thread.terminate);
        # every update is on disk already (fsynced before it was acknowledged), so the process may end here
        sys.stderr.flush()
        os._exit(status)


def die_with_parent() -> None:
    """A process the server started ends when the server does, killed (SIGKILL) or not (Linux; elsewhere
    nothing): a worker or queue manager left behind would hold memory and wait forever."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _interrupt(signum, frame):
    raise KeyboardInterrupt


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
