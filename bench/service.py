"""Service benchmark → the `service` section of BENCHMARKS.md: requests/s and p50/p99 latency of
status GETs and submits at 10/100/500 concurrent clients (and one client, the baseline of the
goal), and SSE followers sustained on one running job while status GETs go on, for the
production setup (`welore serve` on Postgres + Redis, a separate `welore worker`) and the
embedded one (`welore serve` with nothing configured), in one run on this machine.

Each client is a closed loop (send, wait for the answer, send again) over its own keep-alive
connection, on loopback, with a 120 s timeout; an error is any non-2xx answer or a failed
request. Submitted jobs are evaluations of a model folder without weights: they fail at once in
the worker, so the numbers measure the API, not the ML. The client runs on the same machine as
the servers and takes part of its CPU.

Goals (issue 16): 500 concurrent clients with 0 errors; p99 of a status GET at 100 clients
≤ 10× its p50 at 1 client. Issue 40's mixed load, first, on a fresh production stack: 500 pollers
of a running fine-tuning job + 100 SSE followers of it + 50 submitters at once for 60 s: 0 errors,
0 requests over 10 s, p99 ≤ 2× the queueing floor (clients / rate served); it also counts the
job's events per training step and times its /metrics.

Usage: python -m bench.service [--seconds S] [--followers N ...] [--mixed-only] [--baseline REV]
  --baseline REV  also measure the service as it was at git revision REV (checked out to a
                  temporary worktree), e.g. the commit before issue 40's changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from typing import Optional
import time
from pathlib import Path

import httpx

from bench.report import table, write_section

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("WELORE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("WELORE_TEST_REDIS", "redis://127.0.0.1:6379")
TIMEOUT_S = 120.0
TIMEOUT = httpx.Timeout(TIMEOUT_S)
SUBMIT = {"type": "evaluate", "model": "broken", "params": {"seq_len": 8, "windows": 1}}
FOLLOW = {"type": "finetune", "model": "tiny", "params": {"data": "boolq-passages", "method": "full", "steps": 10**6,
                                                           "batch_size": 1, "seq_len": 8, "val_sequences": 1}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """One service setup: `welore serve` (and, in production, a database, a key prefix and a worker)."""

    def __init__(self, mode: str, work: Path, code: Path = ROOT):
        self.mode, self.work, self.code = mode, work, code
        self.procs: list[subprocess.Popen] = []
        self.db = None
        models = work / "models"
        if not models.exists():
            sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "service")]
            from tinymodel import write_tiny_model

            write_tiny_model(models / "tiny")
            (models / "broken").mkdir()
            (models / "broken" / "config.json").write_text("{}")  # resolves, then fails at once in the worker
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WELORE_")}
        self.env.update(HOME=str(work / f"home-{mode}-{secrets.token_hex(3)}"), WELORE_MODELS_DIR=str(models), HF_HUB_OFFLINE="1",
                        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(code),
                        WELORE_CACHE_DIR=os.environ.get("WELORE_CACHE_DIR", str(Path.home() / ".cache" / "welore")),
                        WELORE_DATA_DIR=os.environ.get("WELORE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
        if mode == "production":
            self._production()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(work / f"serve-{mode}-{self.port}.log", "wb")
        self.log = Path(log.name)
        self.procs.append(subprocess.Popen([sys.executable, "-m", "welore_core.cli", "serve", "--port", str(self.port),
                                            "--log-level", "warning"], cwd=code, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
        self._wait(lambda: self._healthy())
        if mode == "production":
            wlog = work / f"worker-{self.port}.log"
            with open(wlog, "wb") as out:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "welore_core.cli", "worker", "--concurrency", "1"],
                                                   cwd=code, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            self._wait(lambda: b" ready." in wlog.read_bytes())
            self.key = subprocess.run([sys.executable, "-m", "welore_core.cli", "keys", "create", "--name", "bench"],
                                      cwd=code, env=self.env, capture_output=True, text=True, check=True
                                      ).stdout.strip().splitlines()[-1]
        else:
            self.key = re.findall(r"^WELORE_API_KEY=(wl_\S+)$", self.log.read_text(), flags=re.M)[0]
        self.h = {"Authorization": f"Bearer {self.key}"}

    def _production(self) -> None:
        import psycopg

        self.db = f"welore_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        self.env.update(WELORE_DATABASE_URL=f"{base}/{self.db}", WELORE_REDIS_URL=f"{REDIS}/{secrets.randbelow(8) + 8}",
                        WELORE_QUEUE_PREFIX=f"welore_bench_{secrets.token_hex(4)}",
                        WELORE_ARTIFACT_DIR=str(self.work / f"artifacts-{self.db}"))
        subprocess.run([sys.executable, "-m", "welore_core.cli", "db", "upgrade"], cwd=self.code, env=self.env,
                       check=True, capture_output=True)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, ready, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{self.mode} stack did not start; see {self.work}")
            time.sleep(0.3)

    def close(self) -> None:
        import signal

        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        if self.db:
            import psycopg
            import redis

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            r = redis.Redis.from_url(self.env["WELORE_REDIS_URL"])
            prefix = self.env["WELORE_QUEUE_PREFIX"]
            for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*"):
                keys = list(r.scan_iter(match=pattern, count=1000))
                if keys:
                    r.delete(*keys)
            r.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class _Connection:
    """One keep-alive HTTP/1.1 connection: the closed-loop clients' own minimal client.

    httpx's connection pool costs about 1 ms of client CPU per request at 100 connections; on this
    machine's 2 cores that starved the server (at 100 clients: server 22% CPU, client 93%, and the
    rate fell 5× from 10 clients), so the rows measured httpx. Plain asyncio streams cost a small
    fraction of the server's time per request (the `client CPU` column)."""

    def __init__(self, url: str, headers: dict[str, str]):
        netloc = url.split("//", 1)[1]
        host, port = netloc.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": netloc, **headers}.items())
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Send one request and read the whole answer; → its status (reconnects after a close). The
        API answers these requests with a Content-Length; a chunked answer is not read."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.headers}{extra}\r\n".encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            length = int(value) if name == "content-length" else length
            close = close or (name == "connection" and value == "close")
        await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _loops(stack: "Stack", clients: int, stop: float, method: str, path: str, body: Optional[dict] = None,
                 lat: Optional[list] = None) -> tuple[list[float], int]:
    """`clients` closed loops, each on its own connection, sending one request and waiting for its
    answer until `stop` (monotonic); → (latencies in s, errors)."""
    lat = [] if lat is None else lat
    errors = 0
    payload = json.dumps(body).encode() if body is not None else b""

    async def loop():
        nonlocal errors
        conn = _Connection(stack.url, stack.h)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                ok = 200 <= await asyncio.wait_for(conn.request(method, path, payload), TIMEOUT_S) < 300
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                ok = False
                conn.close()
            lat.append(time.perf_counter() - t0)
            errors += not ok
        conn.close()

    await asyncio.gather(*(loop() for _ in range(clients)))
    return lat, errors


async def _closed_loop(stack: "Stack", clients: int, seconds: float, method: str, path: str,
                       body: Optional[dict] = None) -> dict:
    """`clients` closed loops for `seconds`; → rate, latencies, errors, and the CPU the server and
    this client used."""
    server, cpu0, client0 = stack.procs[0].pid, _cpu_s(stack.procs[0].pid), time.process_time()
    t0 = time.perf_counter()
    lat, errors = await _loops(stack, clients, time.monotonic() + seconds, method, path, body)
    wall = time.perf_counter() - t0
    return {"n": len(lat), "rps": len(lat) / wall, "p50": _pct(lat, 0.5) * 1e3, "p99": _pct(lat, 0.99) * 1e3,
            "errors": errors, "server_cpu": (_cpu_s(server) - cpu0) / wall,
            "client_cpu": (time.process_time() - client0) / wall}


async def _sse_follower(stack: "Stack", job_id: str, out: dict) -> None:
    """One SSE follower on its own connection (no httpx: see `_Connection`): counts the events
    (`data:` lines) until the stream's last chunk; → out["events"], out["first_s"], out["ok"]."""
    t0 = time.perf_counter()
    out.update(events=0, first_s=None, ok=False)
    conn = _Connection(stack.url, stack.h)
    try:
        conn.reader, conn.writer = await asyncio.open_connection(conn.host, conn.port)
        conn.writer.write(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\n{conn.headers}\r\n".encode())
        await conn.writer.drain()
        if int((await conn.reader.readline()).split(b" ", 2)[1]) != 200:
            return
        while (line := await conn.reader.readline()) not in (b"\r\n", b""):
            pass
        while line := await conn.reader.readline():  # chunk sizes and SSE lines, one chunk per event
            if line.startswith(b"data: "):
                out["events"] += 1
                if out["first_s"] is None:
                    out["first_s"] = time.perf_counter() - t0
            elif line == b"0\r\n":  # the last chunk: the stream ended
                out["ok"] = True
                return
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        pass
    finally:
        conn.close()


async def _mixed(stack: Stack, pollers: int, followers: int, submitters: int, seconds: float) -> dict:
    """The load of issue 40 at once for `seconds`: `followers` SSE streams on a running fine-tuning
    job, `pollers` closed loops on its status, `submitters` closed loops submitting jobs (which
    queue behind it); then the job is cancelled, every stream must end, and its /metrics is read."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=TIMEOUT) as c:
        job = (await c.post("/v1/jobs", json=FOLLOW, headers=stack.h)).json()
        while (await c.get(f"/v1/jobs/{job['id']}", headers=stack.h)).json()["status"] != "running":
            await asyncio.sleep(0.3)
        streams = [{} for _ in range(followers)]
        server, cpu0, client0 = stack.procs[0].pid, _cpu_s(stack.procs[0].pid), time.process_time()
        t0 = time.perf_counter()
        stop = time.monotonic() + seconds
        follow = [asyncio.create_task(_sse_follower(stack, job["id"], out)) for out in streams]
        polls, submits = [], []
        (_, poll_errors), (_, submit_errors) = await asyncio.gather(
            _loops(stack, pollers, stop, "GET", f"/v1/jobs/{job['id']}", lat=polls),
            _loops(stack, submitters, stop, "POST", "/v1/jobs", SUBMIT, lat=submits))
        wall = time.perf_counter() - t0
        server_cpu, client_cpu = (_cpu_s(server) - cpu0) / wall, (time.process_time() - client0) / wall
        followed = (await c.get(f"/v1/jobs/{job['id']}", headers=stack.h)).json()
        if followed["status"] != "running":
            raise RuntimeError(f"the followed job {job['id']} stopped during the load: {followed}")
        await c.post(f"/v1/jobs/{job['id']}/cancel", headers=stack.h)
        _, pending = await asyncio.wait(follow, timeout=60)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        t1 = time.perf_counter()
        r = await c.get(f"/v1/jobs/{job['id']}/metrics", headers=stack.h)
        metrics = {"bytes": len(r.content), "ms": (time.perf_counter() - t1) * 1e3, "status": r.status_code,
                   "points": sum(len(v) for v in r.json().get("series", {}).values()) if r.status_code == 200 else 0}
        history = (await c.get(f"/v1/jobs/{job['id']}/events", params={"format": "json"}, headers=stack.h)).json()
    steps = max((e["data"].get("step") or 0 for e in history if e["type"] == "metric"), default=0)
    lat = polls + submits
    rps = len(lat) / wall
    floor = (pollers + submitters) / rps if rps else float("nan")

    def row(values: list[float], clients: int, errors: int) -> dict:
        return {"clients": clients, "n": len(values), "rps": len(values) / wall, "p50": _pct(values, 0.5) * 1e3,
                "p99": _pct(values, 0.99) * 1e3, "max": max(values, default=0.0) * 1e3,
                "over_10s": sum(v > 10 for v in values), "errors": errors}

    firsts = [s["first_s"] for s in streams if s.get("first_s") is not None]
    return {"seconds": wall, "floor_ms": floor * 1e3, "server_cpu": server_cpu, "client_cpu": client_cpu,
            "polls": row(polls, pollers, poll_errors), "submits": row(submits, submitters, submit_errors),
            "all": row(lat, pollers + submitters, poll_errors + submit_errors),
            "sse": {"followers": followers, "connected": len(firsts), "ended": sum(bool(s.get("ok")) for s in streams),
                    "events_per_s": sum(s.get("events", 0) for s in streams) / max(1, followers) / wall,
                    "first_p99_ms": _pct(firsts, 0.99) * 1e3},
            "job_events": len(history), "job_steps": steps, "metrics": metrics}


async def _followers(stack: Stack, n: int, seconds: float) -> dict:
    """`n` SSE followers on one running job for `seconds`, while 10 clients poll its status."""
    limits = httpx.Limits(max_connections=n + 50, max_keepalive_connections=n + 50)
    async with httpx.AsyncClient(base_url=stack.url, timeout=TIMEOUT, limits=limits) as c:
        job = (await c.post("/v1/jobs", json=FOLLOW, headers=stack.h)).json()
        while (await c.get(f"/v1/jobs/{job['id']}", headers=stack.h)).json()["status"] != "running":
            await asyncio.sleep(0.3)
        connected, events = [], []

        async def follow():
            got = 0
            try:
                async with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=stack.h) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            got += 1
                            if got == 1:
                                connected.append(1)
            except (httpx.HTTPError, asyncio.CancelledError):
                pass
            events.append(got)

        tasks = [asyncio.create_task(follow()) for _ in range(n)]
        deadline = time.monotonic() + 60
        while len(connected) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        polled = await _closed_loop(stack, 10, seconds, "GET", f"/v1/jobs/{job['id']}")
        await c.post(f"/v1/jobs/{job['id']}/cancel", headers=stack.h)
        done, pending = await asyncio.wait(tasks, timeout=60)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {"connected": len(connected), "ended": len(done), "events": sum(events) / max(1, n), **polled}


def measure(stack: Stack, args, followers: list[int], mixed: bool) -> dict:
    out: dict = {"get": {}, "submit": {}, "sse": {}}
    if mixed:  # first, on an empty queue; the later rows would leave thousands of queued jobs
        out["mixed"] = asyncio.run(_mixed(stack, args.pollers, args.mixed_followers, args.submitters,
                                          args.mixed_seconds))
        print(f"  {stack.mode} mixed: {out['mixed']}", flush=True)
        return out
    for n in followers:  # first: later, the submitted jobs would queue ahead of the followed one
        out["sse"][n] = asyncio.run(_followers(stack, n, args.seconds))
        print(f"  {stack.mode} SSE x{n}: {out['sse'][n]}", flush=True)
    probe = httpx.post(f"{stack.url}/v1/jobs", json=SUBMIT, headers=stack.h, timeout=60).json()["id"]
    deadline = time.monotonic() + 120  # let it finish first: its run (imports included) is not the API's load
    while httpx.get(f"{stack.url}/v1/jobs/{probe}", headers=stack.h, timeout=60).json()["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the probe job {probe} did not finish within 120 s")
        time.sleep(0.3)
    for n in [1, *args.levels]:
        out["get"][n] = asyncio.run(_closed_loop(stack, n, args.seconds, "GET", f"/v1/jobs/{probe}"))
        print(f"  {stack.mode} GET x{n}: {out['get'][n]}", flush=True)
    for n in args.levels:
        out["submit"][n] = asyncio.run(_closed_loop(stack, n, args.seconds, "POST", "/v1/jobs", SUBMIT))
        print(f"  {stack.mode} POST x{n}: {out['submit'][n]}", flush=True)
    return out


def run_setup(label: str, mode: str, work: Path, code: Path, args, mixed: bool = False) -> dict:
    """One stack of `mode` from the code at `code`: the rows per level (and SSE followers, for this
    checkout), or with `mixed` the mixed load alone, on a fresh stack."""
    print(f"{label} ({mode}{', mixed load' if mixed else ''}) ...", flush=True)
    stack = Stack(mode, work, code)
    try:
        return measure(stack, args, args.followers if code == ROOT else [], mixed)
    finally:
        stack.close()


def _percent(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def report(results: dict[str, dict], mixed: dict[str, dict], args, load: tuple[float, float]) -> str:
    rows = []
    for label, res in results.items():
        base = res["get"][1]["p50"]
        for kind in ("get", "submit"):
            for n, m in res[kind].items():
                rows.append([label, "status GET" if kind == "get" else "submit", n, round(m["rps"], 1),
                             round(m["p50"], 1), round(m["p99"], 1), round(m["p99"] / base, 1),
                             round(1e3 * n / m["rps"], 1) if m["rps"] else "-", _percent(m.get("server_cpu")),
                             _percent(m.get("client_cpu")), m["errors"], m["n"]])
    lines = ["## Service under load (`python -m bench.service`)", "",
             f"CPU ({os.cpu_count()} cores, shared with the client and, in production, Postgres, Redis and one "
             f"worker); {time.strftime('%Y-%m-%d')}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
             "end (the stack itself included).", ""]
    if mixed:
        lines += _mixed_report(mixed, args)
    if results:
        lines += [f"Rows per level: closed-loop clients on loopback, {args.seconds:g} s per row, 120 s client "
                  "timeout. `p99 / p50@1` divides by the status GET's p50 with one client of the same setup (the "
                  "baseline of the goal). `clients / rate` is the mean latency that any server answering at that rate "
                  "must show to that many closed-loop clients (Little's law): the queueing floor under the p50. CPU: "
                  "of the `welore serve` process and of this client process, in % of one core (in production "
                  "Postgres, Redis and the worker take the rest).", "",
                  table(["setup", "request", "clients", "req/s", "p50 ms", "p99 ms", "p99 / p50@1",
                         "clients / rate ms", "server CPU", "client CPU", "errors", "requests"], rows), ""]
    sse = [[label, n, m["connected"], m["ended"], round(m["events"], 1), round(m["rps"], 1), round(m["p50"], 1),
            round(m["p99"], 1), m["errors"]] for label, res in results.items() for n, m in res["sse"].items()]
    if sse:
        lines += [f"SSE followers on one running fine-tuning job, held for {args.seconds:g} s while 10 clients poll "
                  "its status; then the job is cancelled and every stream must end.", "",
                  table(["setup", "followers", "connected", "ended", "events each", "GET req/s", "GET p50 ms",
                         "GET p99 ms", "GET errors"], sse), ""]
    goals = []
    for label, res in results.items():
        worst = max((m["errors"] for kind in ("get", "submit") for n, m in res[kind].items() if n >= 500), default=None)
        if 100 in res["get"]:
            at100, base = res["get"][100], res["get"][1]["p50"]
            floor = 1e3 * 100 / at100["rps"] / base
            goals.append(f"- {label}: errors at 500 clients: {worst} (goal 0); status GET p99 at 100 clients = "
                         f"{at100['p99'] / base:.1f}× its p50 at 1 client (goal ≤ 10×; the queueing floor at the "
                         f"rate served is {floor:.0f}×: ≤ 10× needs ≥ {1e3 * 100 / (10 * base):,.0f} req/s, "
                         f"{1e3 * 100 / (10 * base) / at100['rps']:.0f}× the rate served).")
    for label, m in mixed.items():
        a = m["all"]
        goals.append(f"- {label}, mixed load: errors {a['errors']} (goal 0), requests over 10 s {a['over_10s']} "
                     f"(goal 0), p99 {a['p99'] / m['floor_ms']:.2f}× the queueing floor (goal ≤ 2×); "
                     f"{1e3 * m['job_events'] / max(1, m['job_steps']):.0f} events per 1000 training steps; "
                     f"/metrics {m['metrics']['bytes'] / 1e3:,.0f} kB in {m['metrics']['ms']:.0f} ms.")
    lines += ["Goals:", *goals]
    return "\n".join(lines)


def _mixed_report(mixed: dict[str, dict], args) -> list[str]:
    rows, sse = [], []
    for label, m in mixed.items():
        for kind, name in (("polls", "status GET"), ("submits", "submit"), ("all", "all")):
            r = m[kind]
            rows.append([label, name, r["clients"], r["n"], round(r["rps"], 1), round(r["p50"], 1), round(r["p99"], 1),
                         round(r["max"], 1), round(r["p99"] / m["floor_ms"], 2), r["over_10s"], r["errors"]])
        f = m["sse"]
        sse.append([label, f["followers"], f["connected"], f["ended"], round(f["events_per_s"], 2),
                    round(f["first_p99_ms"], 1), m["job_events"], m["job_steps"],
                    round(1e3 * m["job_events"] / max(1, m["job_steps"]), 1), round(m["metrics"]["bytes"] / 1e3, 1),
                    round(m["metrics"]["ms"], 1), m["metrics"]["points"], _percent(m["server_cpu"]),
                    _percent(m["client_cpu"])])
    return [f"Mixed load (issue 40), production: {args.pollers} closed-loop clients polling the status of a running "
            f"fine-tuning job, {args.mixed_followers} SSE followers of it and {args.submitters} closed-loop clients "
            f"submitting jobs (queued behind it), all at once for {args.mixed_seconds:g} s; then the job is "
            "cancelled and every stream must end. The queueing floor is the mean latency any server answering at "
            "the rate served must show to that many closed-loop clients (clients / rate, Little's law); `p99 / "
            "floor` divides each p99 by the floor of all requests together.", "",
            table(["setup", "request", "clients", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "p99 / floor",
                   "over 10 s", "errors"], rows), "",
            table(["setup", "followers", "connected", "ended", "events/s each", "first event p99 ms", "job events",
                   "job steps", "events / 1000 steps", "/metrics kB", "/metrics ms", "/metrics points", "server CPU",
                   "client CPU"], sse), ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--levels", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--followers", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--pollers", type=int, default=500, help="mixed load: status pollers")
    ap.add_argument("--mixed-followers", type=int, default=100, help="mixed load: SSE followers")
    ap.add_argument("--submitters", type=int, default=50, help="mixed load: submitting clients")
    ap.add_argument("--mixed-seconds", type=float, default=60.0)
    ap.add_argument("--mixed-only", action="store_true", help="only the mixed load (no rows per level)")
    ap.add_argument("--baseline", default=None, help="a git revision to measure as well (its own worktree)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="welore-bench-service-"))
    results, mixed = {}, {}
    load0 = os.getloadavg()[0]
    try:
        old = None
        if args.baseline:
            old = work / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            label = f"production @ {args.baseline[:10]}" if args.baseline else None
            mixed["production"] = run_setup("production", "production", work, ROOT, args, mixed=True)["mixed"]
            if old is not None:
                mixed[label] = run_setup("baseline", "production", work, old, args, mixed=True)["mixed"]
            if not args.mixed_only:
                for mode in ("production", "embedded"):
                    results[mode] = run_setup(mode, mode, work, ROOT, args)
                    if old is not None:
                        results[f"{mode} @ {args.baseline[:10]}"] = run_setup("baseline", mode, work, old, args)
        finally:
            if old is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = report(results, mixed, args, (load0, os.getloadavg()[0]))
    print(body)
    if not args.no_write:
        write_section("service", body)
    json.dump({"levels": results, "mixed": mixed}, sys.stderr, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
