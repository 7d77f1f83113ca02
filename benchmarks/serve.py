"""The reward server under load: concurrent clients POST OpenRLHF's ``/get_reward`` requests of mixed
users to ``lore-pl serve`` (a subprocess on a free loopback port) and the rows/s, the request
latencies (p50, p99) and the errors are printed, against the in-process batched scoring of the same
rows (``PersonalRewardModel``'s embedder on all rows at once, then each row's user's head), measured
before and after the server's run in this process; the ratio is the server's rows/s over the mean of
the two in-process runs; the largest difference between a served and an in-process reward is printed.

    python benchmarks/serve.py                   # 32 clients, 10,000 rows, 32 rows a request
    python benchmarks/serve.py --rows 2000       # a quicker run

Model: the tests' tiny random Llama reward model and a rank-2 basis fitted on a small preference
file (built into a temporary folder), or ``--run`` a run of your own. The server and the
in-process scoring use the same number of torch threads (``--threads``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lore_pl.inference import PersonalRewardModel, text_items  # noqa: E402


def tiny_run(root: Path) -> Path:
    """A rank-2 basis on the tests' small preference file, embedded by the tiny reward model."""
    from callbacks import BasisExport
    from helpers import build_tiny_reward_model, make, tiny_trainer, write_preferences
    from lore_pl import BasisModule

    model = build_tiny_reward_model(root / "reward-model")
    write_preferences(root / "prefs.jsonl")
    tiny_trainer(max_epochs=3, default_root_dir=str(root / "run"), callbacks=[BasisExport()]).fit(
        BasisModule(estimator="adam", rank=2), datamodule=make(root / "prefs.jsonl", str(model), root))
    return root / "run"


def load_rows(users: list[str], count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, response, user) rows: prompts of 4-12 words, responses of 3-40, users round-robin."""
    from helpers import WORDS

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for number in range(count):
        sizes = torch.randint(4, 13, (1,), generator=generator).item(), torch.randint(3, 41, (1,),
                                                                                        generator=generator).item()
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (sizes[0] + sizes[1],), generator=generator)]
        rows.append((" ".join(words[: sizes[0]]), " " + " ".join(words[sizes[0]:]), users[number % len(users)]))
    return rows


def in_process(model: PersonalRewardModel, rows) -> tuple[float, torch.Tensor]:
    """Seconds to score every row in one batched pass (embed all, gather each row's head), and the rewards."""
    started = time.perf_counter()
    items = [text_items(prompt, [response], "row")[0] for prompt, response, _ in rows]
    embeddings = model.text_embedder(items)
    heads = model.basis @ model.user_weights.T  # [d, C]
    index = torch.tensor([model.user_ids.index(user) for _, _, user in rows])
    rewards = (embeddings * heads.T[index]).sum(-1)
    return time.perf_counter() - started, rewards


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, threads: int, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "lore_pl.serving", "--run", str(run), "--port", str(port),
               "--journal", str(log.parent / "journal.jsonl"), "--threads", str(threads), "--max-batch",
               str(max_batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("the server did not start in 300 s")


async def load(url: str, requests: list[dict], clients: int) -> tuple[float, list[float], list, int]:
    """Send ``requests`` from ``clients`` concurrent clients; (seconds, latencies, answers, errors)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for number, body in enumerate(requests):
        queue.put_nowait((number, body))
    answers: list = [None] * len(requests)
    latencies: list[float] = []
    errors = 0

    async def client(http):
        nonlocal errors
        while not queue.empty():
            number, body = queue.get_nowait()
            sent = time.perf_counter()
            try:
                answer = await http.post(url + "/get_reward", json=body)
                latencies.append(time.perf_counter() - sent)
                if answer.status_code == 200:
                    answers[number] = answer.json()["rewards"]
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - started, latencies, answers, errors


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a run directory (default: a tiny one built here)")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rows-per-request", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's requests per embedding pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker and of in-process scoring")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        run = Path(args.run) if args.run else tiny_run(folder)
        model = PersonalRewardModel.from_run(run)
        rows = load_rows(model.user_ids, args.rows)
        in_process(model, rows[:64])  # load the embedder before timing
        first, expected = in_process(model, rows)

        process, url = start_server(run, args.threads, args.max_batch, folder / "server.log")
        try:
            size = args.rows_per_request
            requests = [{"query": [p + r for p, r, _ in rows[i : i + size]], "prompts": [p for p, _, _ in
                         rows[i : i + size]], "labels": [u for _, _, u in rows[i : i + size]]}
                        for i in range(0, len(rows), size)]
            asyncio.run(load(url, requests[: args.clients], args.clients))  # warm the connections
            seconds, latencies, answers, errors = asyncio.run(load(url, requests, args.clients))
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        second, _ = in_process(model, rows)

    served = [value for answer in answers if answer is not None for value in answer]
    mismatch = None
    if len(served) == len(rows):
        mismatch = float((torch.tensor(served) - expected).abs().max())
    baseline = len(rows) / ((first + second) / 2)
    result = {
        "rows": len(rows), "clients": args.clients, "rows_per_request": args.rows_per_request,
        "requests": len(requests), "max_batch": args.max_batch, "threads": args.threads,
        "users": len(model.user_ids), "server_rows_per_s": round(len(rows) / seconds, 1),
        "p50_latency_ms": round(1000 * percentile(latencies, 0.5), 1),
        "p99_latency_ms": round(1000 * percentile(latencies, 0.99), 1), "errors": errors,
        "in_process_rows_per_s": [round(len(rows) / first, 1), round(len(rows) / second, 1)],
        "ratio": round(len(rows) / seconds / baseline, 3),
        "largest_reward_difference": mismatch,
    }
    print(json.dumps(result))
    print(f"server {result['server_rows_per_s']} rows/s (p50 {result['p50_latency_ms']} ms, p99 "
          f"{result['p99_latency_ms']} ms, {errors} errors) vs in-process {baseline:.1f} rows/s: ratio "
          f"{result['ratio']}; largest reward difference {mismatch}")


if __name__ == "__main__":
    main()
