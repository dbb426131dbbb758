"""Run one job: re-read it, claim it, call welore_core, publish the outcome. Safe to run twice.

The output is produced in `<artifact_dir>/.tmp/` and renamed to `<artifact_dir>/jobs/<id>`
only after the work succeeded and no cancel arrived, just before the final state is committed:
a cancelled or failed job leaves nothing behind. Every exception ends the job `failed` with a
code and a readable message; nothing is left `running` (a dead worker's job is failed by
`reap_stale` once its heartbeat stops).
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sqlalchemy import select

from api import storage
from api.db import session_scope
from api.events import store
from api.events.bus import EventBus, make_bus
from api.models import Artifact, Job, utcnow
from api.settings import Settings

from .publisher import Heartbeat, Publisher

log = logging.getLogger("welore.worker")

MAX_ATTEMPTS = 3
_buses: dict[tuple[int, str], EventBus] = {}


def bus_for(settings: Settings) -> EventBus:
    """One bus per process and broker URL (Celery prefork children build their own)."""
    key = (os.getpid(), settings.redis_url or "")
    if key not in _buses:
        _buses[key] = make_bus(settings)
    return _buses[key]


@dataclass(frozen=True)
class JobSpec:
    id: str
    type: str
    params: dict
    model_ref: dict
    attempt: int


class _Stop:
    """The `should_stop` given to welore_core: a user cancel (bus flag or database flag) or a
    shutdown of the embedded server."""

    def __init__(self, bus: EventBus, job_id: str, publisher: Publisher, shutdown: Optional[threading.Event]):
        self.bus, self.job_id, self.publisher, self.shutdown = bus, job_id, publisher, shutdown
        self.reason: Optional[str] = None
        self._last = 0.0

    def __call__(self) -> bool:
        if self.reason:
            return True
        if self.shutdown is not None and self.shutdown.is_set():
            self.reason = "shutdown"
            return True
        if self.publisher.db_cancel:
            self.reason = "cancel"
            return True
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            try:
                if self.bus.cancel_requested(self.job_id):
                    self.reason = "cancel"
            except Exception:
                pass
        return self.reason is not None


# -- resolving what the job names ---------------------------------------------------------
def model_path(settings: Settings, ref: dict) -> str:
    kind, name = ref["kind"], ref["name"]
    if kind == "job":
        return str(storage.job_dir(settings, name))
    if kind == "models_dir":
        if settings.models_dir is None:
            from welore_core.errors import ModelNotFound

            raise ModelNotFound(f"model {name!r} is under the models directory, but this worker has no "
                                "WELORE_MODELS_DIR; configure the same directory as the API")
        return str(Path(settings.models_dir) / name)
    return name  # registry name or a Hugging Face model id


def data_path(settings: Settings, spec: str) -> str:
    if spec.startswith("file_"):
        path = storage.find_file(settings, spec)
        if path is None:
            from welore_core.errors import DataNotFound

            raise DataNotFound(f"uploaded file {spec} is missing from the artifact store "
                               f"({storage.root(settings)}); API and workers must share it")
        return str(path)
    return spec


def _device(settings: Settings) -> Optional[str]:
    return settings.worker_device or None


def _summary(result: dict) -> dict:
    """Scalars of an engine result (per-matrix lists and server paths stay out of the job row)."""
    drop = {"out", "merged_out", "matrices"}
    out = {}
    for k, v in result.items():
        if k in drop:
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v.values()):
            out[k] = v
    return out


def _supported(fn: Callable, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    missing = sorted(k for k in kwargs if k not in params)
    if missing:
        from welore_core.errors import InvalidArgument

        raise InvalidArgument(f"this worker's welore_core does not support {', '.join(missing)} for "
                              f"{fn.__name__}; upgrade the worker or leave these parameters out")
    return kwargs


# -- one handler per job type: (spec, out dir, progress, stop, settings) → result ------------
def _compress(job: JobSpec, out: Path, progress, stop, settings: Settings) -> dict:
    from welore_core.compression.config import OPTIONS, CompressConfig
    from welore_core.compression.pipeline import compress_checkpoint

    p = dict(job.params)
    options = {k: p.get(k) for k in OPTIONS}
    if options.get("calibration"):
        options["calibration"] = data_path(settings, options["calibration"])
    recover_data = data_path(settings, p["recover_data"]) if p.get("recover_data") else None
    result = compress_checkpoint(model_path(settings, job.model_ref), out, CompressConfig.from_options(options),
                                 merged_out=out / "merged" if p.get("merged") else None, overwrite=False,
                                 recover=int(p.get("recover") or 0), recover_data=recover_data,
                                 device=_device(settings), progress=progress, should_stop=stop)
    return _summary(result)


def _finetune(job: JobSpec, out: Path, progress, stop, settings: Settings) -> dict:
    from welore_core.finetune import finetune_checkpoint

    p = dict(job.params)
    data = data_path(settings, p.pop("data"))
    merged = p.pop("merged", False)
    if p.get("teacher"):
        p["teacher"] = model_path(settings, job.model_ref["teacher"])
    kwargs = _supported(finetune_checkpoint, {k: v for k, v in p.items() if v is not None})
    result = finetune_checkpoint(model_path(settings, job.model_ref), out, data=data, resume=False,
                                 overwrite=False, device=_device(settings), progress=progress,
                                 should_stop=stop, merged_out=out / "merged" if merged else None, **kwargs)
    return _summary(result)


def _evaluate(job: JobSpec, out: Path, progress, stop, settings: Settings) -> dict:
    from welore_core.pipelines import evaluate_model

    p = job.params
    result = evaluate_model(model_path(settings, job.model_ref), data_path(settings, p.get("data", "boolq")),
                            seq_len=int(p.get("seq_len", 512)), windows=int(p.get("windows", 24)),
                            device=_device(settings), progress=progress, should_stop=stop)
    result = dict(result)
    result["model"], result["data"] = job.model_ref["name"], p.get("data", "boolq")  # no server paths
    return _summary(result)


HANDLERS = {"compress": _compress, "finetune": _finetune, "evaluate": _evaluate}


# -- claim / finish -----------------------------------------------------------------------
def _age_s(t: Optional[dt.datetime]) -> float:
    return float("inf") if t is None else (utcnow() - t).total_seconds()


def _claim(settings: Settings, bus: EventBus, job_id: str) -> tuple[Optional[JobSpec], int, str]:
    """→ (spec or None, first event seq, reason when None)."""
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            return None, 0, "missing"
        if job.finished:
            return None, 0, job.status
        if job.status == "running" and _age_s(job.heartbeat_at) < settings.stale_after_s:
            return None, 0, "running elsewhere"
        try:
            last = bus.last_seq(job_id)
        except Exception:
            last = -1
        seq = max(store.max_seq(s, job_id), last) + 1
        if job.attempts >= MAX_ATTEMPTS:
            _finish_row(s, job, "failed", seq, code="worker_lost",
                        message=f"the job was started {job.attempts} times and its worker was lost each time "
                                "(out of memory? killed by a time limit?); resubmit it with smaller settings")
            return None, 0, "gave up"
        job.status, job.started_at = "running", job.started_at or utcnow()
        job.heartbeat_at, job.attempts = utcnow(), job.attempts + 1
        return JobSpec(job.id, job.type, dict(job.params), dict(job.model_ref), job.attempts), seq, ""


def _finish_row(s, job: Job, status: str, seq: int, *, code: Optional[str] = None, message: Optional[str] = None,
                result: Optional[dict] = None, metrics: Optional[dict] = None, events: tuple = ()) -> dict:
    data: dict = {"status": status}
    if code:
        data["error"] = {"code": code, "message": message}
    terminal = store.make_event(seq, "status", data)
    store.add_events(s, job.id, [*events, terminal])
    job.status, job.finished_at, job.heartbeat_at = status, utcnow(), utcnow()
    job.error_code, job.error_message = code, message
    if status == "succeeded":
        job.progress = 1.0
    if result is not None:
        job.result = result
    if metrics is not None:
        job.metrics = metrics
    return terminal


def _list_files(d: Path) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p))
    return out


def run_job(job_id: str, settings: Settings, bus: EventBus, shutdown: Optional[threading.Event] = None) -> str:
    """Run job `job_id` to a final state; returns that state (or why nothing was done)."""
    spec, seq, why = _claim(settings, bus, job_id)
    if spec is None:
        log.info("job %s: nothing to do (%s)", job_id, why)
        return why
    pub = Publisher(settings, bus, job_id, spec.type, seq, spec.params)
    pub.emit("status", {"status": "running", "attempt": spec.attempt, "worker": f"{socket.gethostname()}:{os.getpid()}"})
    pub.log(f"{spec.type} of {spec.model_ref['name']} started (attempt {spec.attempt})")
    pub.flush()
    stop = _Stop(bus, job_id, pub, shutdown)
    heartbeat = Heartbeat(pub, settings.heartbeat_s)
    heartbeat.start()
    work = storage.tmp_dir(settings) / f"{job_id}.{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    final_dir = storage.job_dir(settings, job_id)
    status, code, message, result, files = "failed", None, None, None, []
    try:
        from welore_core.errors import Cancelled, WeloreError

        try:
            result = HANDLERS[spec.type](spec, work / "out", pub.on_progress, stop, settings)
            if stop():
                raise Cancelled("cancel requested after the work finished; nothing was kept")
            if (work / "out").is_dir():
                final_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(final_dir, ignore_errors=True)  # a previous attempt's orphan
                os.replace(work / "out", final_dir)
                files = [(name, p.stat().st_size, storage.sha256_file(p)) for name, p in _list_files(final_dir)]
            status = "succeeded"
        except Cancelled as exc:
            if stop.reason == "shutdown":
                heartbeat.stop()
                return _requeue(settings, bus, pub, job_id)
            status, code, message = "cancelled", None, None
            pub.log(f"cancelled: {exc.message}")
        except WeloreError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 — every failure must end the job
            if type(exc).__name__ == "SoftTimeLimitExceeded":
                code, message = "time_limit", (f"the job ran past its time limit of {settings.job_time_limit_s} s "
                                               "(WELORE_JOB_TIME_LIMIT_S)")
            else:
                code, message = "internal_error", f"{type(exc).__name__}: {exc}"
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        heartbeat.stop()
        return _finish(settings, bus, pub, job_id, status, code, message, result, files, final_dir)
    finally:
        heartbeat.stop()
        shutil.rmtree(work, ignore_errors=True)


def _finish(settings, bus, pub: Publisher, job_id, status, code, message, result, files, final_dir) -> str:
    if status != "succeeded":
        shutil.rmtree(final_dir, ignore_errors=True)
    try:
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job.finished:  # failed by the reaper meanwhile: its verdict stands
                shutil.rmtree(final_dir, ignore_errors=True)
                return job.status
            events = pub.take_pending()
            seq = pub._seq
            if pub.stage:
                job.stage = pub.stage
            terminal = _finish_row(s, job, status, seq, code=code, message=message, result=result,
                                   metrics=pub.final_metrics(), events=tuple(events))
            if status == "succeeded":
                for name, size, sha in files:
                    s.add(Artifact(job_id=job_id, name=name, size=size, sha256=sha))
    except BaseException:
        shutil.rmtree(final_dir, ignore_errors=True)
        raise
    try:
        for e in events:
            bus.publish(job_id, e)  # idempotent: already published ones are skipped
        bus.publish(job_id, terminal)
        bus.set_latest(job_id, {"stage": pub.stage, "progress": 1.0 if status == "succeeded" else pub.progress,
                                "metrics": pub.final_metrics()})
        bus.finish(job_id)
    except Exception:
        log.warning("could not publish the end of %s on the bus", job_id, exc_info=True)
    log.info("job %s %s%s", job_id, status, f" ({code}: {message})" if code else "")
    return status


def _requeue(settings, bus, pub: Publisher, job_id: str) -> str:
    """The embedded server is stopping: put the job back to `queued` (it runs again on restart)."""
    pub.log("the server is shutting down; the job will run again when it restarts", "warning")
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id, with_for_update=True)
        store.add_events(s, job_id, pub.take_pending())
        job.status, job.heartbeat_at, job.stage, job.progress = "queued", None, None, 0.0
    return "requeued"


def reap_stale(settings: Settings, bus: EventBus) -> int:
    """Fail running jobs whose worker stopped sending heartbeats."""
    cutoff = utcnow() - dt.timedelta(seconds=settings.stale_after_s)
    n = 0
    with session_scope(settings.db_url) as s:
        ids = list(s.scalars(select(Job.id).where(Job.status == "running", Job.heartbeat_at < cutoff)))
    for job_id in ids:
        try:
            with session_scope(settings.db_url) as s:
                job = s.get(Job, job_id, with_for_update=True)
                if job.status != "running" or _age_s(job.heartbeat_at) < settings.stale_after_s:
                    continue
                seq = max(store.max_seq(s, job_id), bus.last_seq(job_id)) + 1
                terminal = _finish_row(s, job, "failed", seq, code="worker_lost",
                                       message=f"the worker running this job stopped responding (no heartbeat for "
                                               f"{settings.stale_after_s:.0f} s); resubmit the job")
            bus.publish(job_id, terminal)
            bus.finish(job_id)
            shutil.rmtree(storage.job_dir(settings, job_id), ignore_errors=True)
            n += 1
        except Exception:
            log.warning("could not reap %s", job_id, exc_info=True)
    return n
