"""`client.jobs`: submit, read, list (every page), cancel, follow events (SSE, reconnecting
with Last-Event-ID), wait, metrics, the compress report, artifacts and verified downloads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx

from . import errors, sse
from ._transport import TRANSIENT_EXCEPTIONS, Transport
from .download import download_artifact
from .types import Artifact, Downloaded, Event, Job, Metrics


class Jobs:
    def __init__(self, transport: Transport):
        self._t = transport

    def create(self, type: str, model: str, params: Optional[dict[str, Any]] = None,
               idempotency_key: Optional[str] = None) -> Job:
        """Submit a job. With an `idempotency_key` a retried submit (after a broken connection or a
        503) returns the same job instead of a second one; without it the request is sent once."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"type": type, "model": model, "params": params or {}}
        return Job.model_validate(self._t.json("POST", "/v1/jobs", json=body, headers=headers,
                                               retry=bool(idempotency_key)))

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._t.json("GET", f"/v1/jobs/{job_id}"))

    def list(self, status: Optional[str] = None, type: Optional[str] = None, page_size: int = 50) -> Iterator[Job]:
        """Every job (newest first), fetching pages of `page_size` as the iteration goes."""
        after: Optional[str] = None
        while True:
            params = {k: v for k, v in (("status", status), ("type", type), ("limit", page_size),
                                        ("after", after)) if v is not None}
            page = self._t.json("GET", "/v1/jobs", params=params)
            for item in page["data"]:
                yield Job.model_validate(item)
            after = page.get("next_cursor")
            if not after:
                return

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._t.json("POST", f"/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: str, after: Optional[int] = None, read_timeout_s: float = 60.0) -> Iterator[Event]:
        """The job's events from the first (or after seq `after`) until it ends. A broken stream is
        reopened with `Last-Event-ID`, so no event is lost or repeated."""
        last, failures = after, 0
        timeout = httpx.Timeout(30.0, read=read_timeout_s)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            got = 0
            try:
                with self._t.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
                    for raw in sse.parse_json(r.iter_lines()):
                        event = Event.model_validate(raw)
                        if last is not None and event.seq <= last:
                            continue
                        last, got, failures = event.seq, got + 1, 0
                        yield event
                        if event.is_terminal:
                            return
            except errors.ServerError as exc:
                if exc.status not in (502, 503, 504) or failures >= self._t.max_retries:
                    raise
            except TRANSIENT_EXCEPTIONS as exc:
                if failures >= self._t.max_retries:
                    raise self._t.connection_error(exc, "GET", f"/v1/jobs/{job_id}/events", failures + 1) from exc
            else:  # the server closed the stream without a final status: finished if the job has
                if got == 0 and self.get(job_id).finished:
                    return
                continue
            time.sleep(self._t.delay(failures))
            failures += 1

    def wait(self, job_id: str, timeout: Optional[float] = None, poll_s: float = 0.25) -> Job:
        """Poll until the job ends (succeeded, failed or cancelled) and return it; `WaitTimeout`
        after `timeout` seconds. A failed job is returned, not raised: look at `.status`/`.error`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_s
        while True:
            job = self.get(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise errors.WaitTimeout(f"job {job_id} is still {job.status} (stage {job.stage}, progress "
                                         f"{job.progress:.0%}) after {timeout} s", job)
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def metrics(self, job_id: str) -> Metrics:
        return Metrics.model_validate(self._t.json("GET", f"/v1/jobs/{job_id}/metrics"))

    def report(self, job_id: str) -> dict[str, Any]:
        """The per-matrix report of a compress job: tau, and per matrix its ranks, label, spectrum."""
        return self._t.json("GET", f"/v1/jobs/{job_id}/report")

    def artifacts(self, job_id: str) -> list[Artifact]:
        return [Artifact.model_validate(a) for a in self._t.json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]]

    def download(self, job_id: str, dir: str | Path) -> list[Downloaded]:
        """Every artifact of the job into `dir` (kept relative paths), each verified by SHA-256.
        Interrupted downloads resume where they stopped; identical files already there are skipped."""
        root = Path(dir)
        root.mkdir(parents=True, exist_ok=True)
        return [download_artifact(self._t, art, root) for art in self.artifacts(job_id)]
