"""Client commands of the `welore` command line, talking to a server (WELORE_API_URL,
WELORE_API_KEY, or --url / --api-key):

  welore jobs submit TYPE MODEL [-p KEY=VALUE ...] [--params JSON] [--idempotency-key K] [--wait]
  welore jobs list [--status S] [--type T] [--limit N]
  welore jobs show ID | watch ID | cancel ID | download ID [--out DIR]
  welore files upload PATH
  welore models

Each takes --json (one JSON object as the last stdout line; `watch` prints one line per event
first). Registered under the `welore.commands` entry points; imports httpx and pydantic only when
a command runs, never torch. Errors print `error: …` and exit 2; `watch` and `submit --wait` exit 1
when the job did not succeed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import uuid
from typing import Any, Callable

JOB_TYPES = ("compress", "finetune", "evaluate")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=None, help="server address (default: $WELORE_API_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: $WELORE_API_KEY)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    return p


def _command(fn: Callable[[Any, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `fn(client, args)`; client errors become `error: …` on stderr and exit status 2."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from .client import Client
        from .errors import WeloreClientError

        try:
            with Client(base_url=args.url, api_key=args.api_key) as client:
                return int(fn(client, args) or 0)
        except WeloreClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _dump(model) -> dict:
    return model.model_dump(mode="json")


def parse_params(pairs: list[str], raw: str | None) -> dict:
    """--params '{"err": 0.3}' (or @file.json) then each -p KEY=VALUE (VALUE read as JSON when it
    parses: 0.3, true, null; else as a string)."""
    params: dict = {}
    if raw:
        text = open(raw[1:]).read() if raw.startswith("@") else raw
        try:
            params = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --params: expected a JSON object, got {text[:80]!r} ({exc})")
        if not isinstance(params, dict):
            raise SystemExit(f"error: --params: expected a JSON object, got {type(params).__name__}")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: -p {pair!r}: expected KEY=VALUE, e.g. -p err=0.3")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _job_line(job) -> str:
    return (f"{job.id}  {job.status:<9}  {job.type:<8}  {job.model[:28]:<28}  {job.progress:>4.0%}  "
            f"{job.created_at:%Y-%m-%d %H:%M:%S}")


def _event_line(e) -> str:
    d = e.data
    if e.type == "status":
        err = d.get("error") or {}
        return f"[{e.seq}] status {d.get('status')}" + (f": {err.get('code')}: {err.get('message')}" if err else "")
    if e.type == "progress":
        total = f"/{d['total']}" if d.get("total") else ""
        msg = f" {d['message']}" if d.get("message") else ""
        return f"[{e.seq}] {d.get('stage')} {d.get('done', '')}{total} ({float(d.get('progress') or 0):.0%}){msg}"
    if e.type == "metric":
        vals = ", ".join(f"{k}={v:.4g}" for k, v in (d.get("values") or {}).items() if isinstance(v, (int, float)))
        return f"[{e.seq}] metric {vals}"
    return f"[{e.seq}] {e.type} {d.get('message', d)}"


def _follow(client, job_id: str, as_json: bool) -> int:
    for event in client.jobs.events(job_id):
        print(json.dumps(_dump(event)) if as_json else _event_line(event), flush=True)
    job = client.jobs.get(job_id)
    if as_json:
        _print_json(_dump(job))
    else:
        print(f"{job.id} {job.status}" + (f": {job.error.code}: {job.error.message}" if job.error else ""))
    return 0 if job.status == "succeeded" else 1


@_command
def jobs_submit(client, args) -> int:
    params = parse_params(args.param, args.params)
    key = args.idempotency_key or f"cli-{uuid.uuid4()}"  # makes retried submits safe
    job = client.jobs.create(args.type, args.model, params, idempotency_key=key)
    if args.wait:
        print(f"submitted {job.id}", file=sys.stderr)
        return _follow(client, job.id, args.json)
    if args.json:
        _print_json(_dump(job))
    else:
        print(f"submitted {job.id} ({job.type} of {job.model}, {job.status}); follow it with `welore jobs watch {job.id}`")
    return 0


@_command
def jobs_list(client, args) -> int:
    jobs = []
    for job in client.jobs.list(status=args.status, type=args.type, page_size=min(args.limit or 200, 200)):
        jobs.append(job)
        if args.limit and len(jobs) >= args.limit:
            break
    if args.json:
        _print_json({"data": [_dump(j) for j in jobs]})
    else:
        width = max([len(j.id) for j in jobs] or [2])
        print(f"{'ID':<{width}}  {'STATUS':<9}  {'TYPE':<8}  {'MODEL':<28}  {'PROG':>4}  CREATED")
        for job in jobs:
            print(_job_line(job))
    return 0


@_command
def jobs_show(client, args) -> int:
    job = client.jobs.get(args.id)
    if args.json:
        _print_json(_dump(job))
        return 0
    print(_job_line(job))
    print(f"stage: {job.stage}  attempts: {job.attempts}  params: {json.dumps(job.params)}")
    if job.error:
        print(f"error: {job.error.code}: {job.error.message}")
    if job.result:
        print("result: " + json.dumps(job.result, default=str))
    return 0


@_command
def jobs_watch(client, args) -> int:
    return _follow(client, args.id, args.json)


@_command
def jobs_cancel(client, args) -> int:
    job = client.jobs.cancel(args.id)
    if args.json:
        _print_json(_dump(job))
    else:
        print(f"{job.id} {job.status}" + (" (cancel requested: it stops at its next step)"
                                         if job.status == "running" else ""))
    return 0


@_command
def jobs_download(client, args) -> int:
    out = args.out or args.id
    files = client.jobs.download(args.id, out)
    if args.json:
        _print_json({"job_id": args.id, "dir": os.path.abspath(out), "files": [_dump(f) for f in files]})
        return 0
    for f in files:
        how = "already there" if f.skipped else (f"resumed from {f.resumed_from} B" if f.resumed_from else "downloaded")
        print(f"{f.sha256}  {f.path}  {f.size} B  {how}")
    print(f"{len(files)} file(s) in {out}, every SHA-256 verified", file=sys.stderr)
    return 0


@_command
def files_upload(client, args) -> int:
    f = client.files.upload(args.path)
    if args.json:
        _print_json(_dump(f))
    else:
        print(f"{f.id}  {f.filename}  {f.format}  {f.records} record(s)  {f.size} B  sha256 {f.sha256}")
    return 0


@_command
def models_list(client, args) -> int:
    models = client.models.list()
    if args.json:
        _print_json({"data": [_dump(m) for m in models]})
        return 0
    for m in models:
        extra = m.model_extra or {}
        note = extra.get("base_model") and f"from {extra['base_model']} {extra.get('summary') or ''}" or ""
        print(f"{m.id:<32}  {m.source:<10}  {'available' if m.available else 'missing':<9}  {note}".rstrip())
    return 0


def register_jobs(sub) -> None:
    common = _common()
    p = sub.add_parser("jobs", help="jobs on a welore server: submit, list, show, watch, cancel, download")
    js = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    s = js.add_parser("submit", parents=[common], help="submit a job")
    s.add_argument("type", choices=JOB_TYPES)
    s.add_argument("model", help="a registry name, a job id (its output), or a folder under the models directory")
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="one parameter, e.g. -p err=0.3 (repeat; VALUE is read as JSON when it parses)")
    s.add_argument("--params", default=None, metavar="JSON", help="all parameters as a JSON object (or @file.json)")
    s.add_argument("--idempotency-key", default=None, help="a repeat with the same key returns the same job")
    s.add_argument("--wait", action="store_true", help="follow the job's events until it ends")
    s.set_defaults(func=jobs_submit)
    ls = js.add_parser("list", parents=[common], help="your jobs, newest first")
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument("--type", choices=JOB_TYPES)
    ls.add_argument("--limit", type=int, default=50, help="at most this many (0: all; default 50)")
    ls.set_defaults(func=jobs_list)
    for name, fn, text in (("show", jobs_show, "a job's status, result and error"),
                           ("watch", jobs_watch, "follow a job's events until it ends (exit 1 unless it succeeded)"),
                           ("cancel", jobs_cancel, "cancel a queued or running job")):
        a = js.add_parser(name, parents=[common], help=text)
        a.add_argument("id")
        a.set_defaults(func=fn)
    d = js.add_parser("download", parents=[common], help="download a job's artifacts (resumable, verified)")
    d.add_argument("id")
    d.add_argument("--out", default=None, help="directory (default: ./<job id>)")
    d.set_defaults(func=jobs_download)


def register_files(sub) -> None:
    p = sub.add_parser("files", help="datasets on a welore server")
    fs = p.add_subparsers(dest="files_command", required=True, metavar="ACTION")
    u = fs.add_parser("upload", parents=[_common()], help="upload a .jsonl or .txt dataset")
    u.add_argument("path")
    u.set_defaults(func=files_upload)


def register_models(sub) -> None:
    p = sub.add_parser("models", parents=[_common()], help="models a welore server can take as a job's model")
    p.set_defaults(func=models_list)


def main(argv: list[str] | None = None) -> int:
    """The client-only `welore` (installed by the standalone welore-client package)."""
    parser = argparse.ArgumentParser(prog="welore", description="client of a welore job service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (register_jobs, register_files, register_models):
        register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
