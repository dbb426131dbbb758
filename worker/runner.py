"""Run one job: claim it, call welore_core, publish the outcome. Safe to run twice, at least once.

Every transition goes through api/jobs/states.py. The output is produced in
`<artifact_dir>/.tmp/` and renamed to `<artifact_dir>/jobs/<id>` only after the work succeeded,
no cancel arrived and the claim is still this runner's, just before the final state is
committed: a cancelled or failed job leaves nothing behind. Every exception ends the job `failed`
with a code and a readable message (no server paths). A dead worker's job is put back in the
queue by the reaper (api/jobs/reaper.py) once its heartbeat stops; a graceful shutdown hands it
back at once, without spending an attempt.
"""

from __future__ import annotations

import datetime as dt
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

from api import storage
from api.db import session_scope
from api.events.bus import EventBus, make_bus
from api.jobs import states
from api.jobs.dispatch import dispatch
from api.models import Artifact, Job, utcnow
from api.redact import redact, redact_values
from api.settings import Settings

from .publisher import Heartbeat, Publisher

log = logging.getLogger("welore.worker")

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
    """The `should_stop` given to welore_core: a user cancel (bus flag or database flag), a
    shutdown of the worker or the embedded server, or the claim lost (the job was reaped)."""

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
        if self.publisher.lost:
            self.reason = "lost"
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
    return redact_values(out)


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
    from welore_core.finetune.config import FinetuneConfig

    p = dict(job.params)
    # every param but data/merged is an option: one this worker's table lacks is refused, not dropped
    options = {k: v for k, v in p.items() if k not in ("data", "merged")}
    if options.get("teacher"):
        options["teacher"] = model_path(settings, job.model_ref["teacher"])
    config = FinetuneConfig.from_options(options)  # the config the API validated the job with
    result = finetune_checkpoint(model_path(settings, job.model_ref), out, data=data_path(settings, p["data"]),
                                 resume=False, overwrite=False, device=_device(settings), progress=progress,
                                 should_stop=stop, merged_out=out / "merged" if p.get("merged") else None,
                                 **config.to_dict())
    return _summary(result)


def _evaluate(job: JobSpec, out: Path, progress, stop, settings: Settings) -> dict:
    from welore_core.evaluate_config import DEFAULT_DATA, EvaluateConfig
    from welore_core.pipelines import evaluate_model

    p = job.params
    data = p.get("data", DEFAULT_DATA)
    config = EvaluateConfig.from_options({k: v for k, v in p.items() if k != "data"})  # as the API validated it
    result = evaluate_model(model_path(settings, job.model_ref), data_path(settings, data), **config.to_dict(),
                            device=_device(settings), progress=progress, should_stop=stop)
    result = dict(result)
    result["model"], result["data"] = job.model_ref["name"], data  # no server paths
    return _summary(result)


HANDLERS = {"compress": _compress, "finetune": _finetune, "evaluate": _evaluate}


# -- claim / run / end (every transition through api/jobs/states.py) ---------------------------
def _age_s(t: Optional[dt.datetime]) -> float:
    return float("inf") if t is None else (utcnow() - t).total_seconds()


def _list_files(d: Path) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p))
    return out


def runner_id() -> str:
    """This run's claim token: host, process and a random part (two runs never share one)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _publish(bus: EventBus, job_id: str, events, finished: bool = False) -> None:
    try:
        for e in events:
            if e is not None:
                bus.publish(job_id, e)  # idempotent: already published seqs are skipped
        if finished:
            bus.finish(job_id)
    except Exception:
        log.warning("could not publish events of %s on the bus (the database has them)", job_id, exc_info=True)


def _claim(settings: Settings, bus: EventBus, job_id: str, runner: str,
           shutdown: Optional[threading.Event]) -> tuple[Optional[JobSpec], int, str]:
    """→ (spec, seq of the `running` event, "") or (None, 0, why nothing is to be done).

    A job another runner holds is watched: if its heartbeat moves within the heartbeat timeout
    that runner is alive and this delivery is a duplicate ("running elsewhere"); if it does not,
    that runner is dead (a redelivery after a lost worker), and the job is reaped and claimed."""
    deadline = time.monotonic() + settings.heartbeat_timeout_s + settings.heartbeat_s
    seen = None
    while True:
        with session_scope(settings.db_url) as s:
            t, why = states.claim(s, bus, job_id, runner, settings.max_attempts)
            if t is not None and not why:
                job = t.job
                spec = JobSpec(job.id, job.type, dict(job.params), dict(job.model_ref), job.attempts)
            elif why == "running":
                job = s.get(Job, job_id)
                holder, age = (job.runner, job.heartbeat_at), _age_s(job.heartbeat_at)
        if not why:
            _publish(bus, job_id, [t.event])
            storage.remove_work_dirs(settings, job_id)  # half-written output of a dead attempt
            return spec, t.event["seq"], ""
        if why != "running":
            if t is not None:
                _publish(bus, job_id, [t.event], finished=True)
            return None, 0, why
        if seen is not None and holder != seen:
            return None, 0, "running elsewhere"  # its heartbeat moved: that runner is alive
        seen = holder
        if age > settings.heartbeat_timeout_s or time.monotonic() > deadline:
            with session_scope(settings.db_url) as s:
                t = states.reap(s, bus, job_id, settings.heartbeat_timeout_s, settings.max_attempts)
            if t is None:
                return None, 0, "running elsewhere"
            log.warning("job %s: its runner %s is gone; taking it over", job_id, seen[0])
            _publish(bus, job_id, [t.event], finished=t.job.finished)
            seen = None
            continue
        if shutdown is not None and shutdown.is_set():
            return None, 0, "shutting down"
        time.sleep(min(1.0, settings.heartbeat_s / 2))


def run_job(job_id: str, settings: Settings, bus: EventBus, shutdown: Optional[threading.Event] = None,
            enqueue: Optional[Callable[[str, str], None]] = None) -> str:
    """Run job `job_id` to a final state; returns that state (or why nothing was done).

    `shutdown` set: the job stops at its next step and goes back to `queued` with its attempt
    given back; `enqueue(job_id, queue)` then hands it to another worker (Celery), or nothing does
    and the next start runs it (embedded)."""
    runner = runner_id()
    try:
        spec, seq, why = _claim(settings, bus, job_id, runner, shutdown)
    except Exception:  # the database is unreachable: this delivery is spent, the job not claimed
        try:
            bus.unmark_sent(job_id)  # so that the reaper sends it again once the database is back
        except Exception:
            log.warning("could not remove the sent mark of %s", job_id, exc_info=True)
        raise
    if spec is None:
        log.info("job %s: nothing to do (%s)", job_id, why)
        return why
    pub = Publisher(settings, bus, job_id, runner, spec.type, seq + 1, spec.params)
    pub.log(f"{spec.type} of {spec.model_ref['name']} started (attempt {spec.attempt} of {settings.max_attempts})")
    pub.flush()
    stop = _Stop(bus, job_id, pub, shutdown)
    heartbeat = Heartbeat(pub, settings.heartbeat_s)
    heartbeat.start()
    work = storage.tmp_dir(settings) / f"{job_id}.{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    final_dir = storage.job_dir(settings, job_id)
    try:
        from welore_core.errors import Cancelled, WeloreError

        try:
            result = HANDLERS[spec.type](spec, work / "out", pub.on_progress, stop, settings)
            pub.flush()  # still ours? (a worker presumed dead must not publish an output)
            if stop():
                raise Cancelled("cancel requested after the work finished; nothing was kept")
            files = []
            if (work / "out").is_dir():
                final_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(final_dir, ignore_errors=True)  # a previous attempt's orphan
                os.replace(work / "out", final_dir)
                files = [(name, p.stat().st_size, storage.sha256_file(p)) for name, p in _list_files(final_dir)]
            heartbeat.stop()
            return _end(settings, bus, pub, job_id, states.SUCCEEDED, result=result, files=files)
        except Cancelled as exc:
            heartbeat.stop()
            if stop.reason == "lost":
                return "lost"
            if stop.reason == "shutdown":
                return _hand_back(settings, bus, pub, job_id, enqueue)
            pub.log(f"cancelled: {exc.message}")
            return _end(settings, bus, pub, job_id, states.CANCELLED)
        except WeloreError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 — every failure must end the job
            if type(exc).__name__ == "SoftTimeLimitExceeded":
                code, message = "time_limit", (f"the job ran past its time limit of {settings.job_time_limit_s} s "
                                               "(WELORE_JOB_TIME_LIMIT_S)")
            elif _disk_full(exc):
                code, message = "disk_full", _disk_full_message(settings)
            else:
                code, message = "internal_error", f"{type(exc).__name__}: {exc}"
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        heartbeat.stop()
        return _end(settings, bus, pub, job_id, states.FAILED, code=code, message=redact(message, settings))
    finally:
        heartbeat.stop()
        shutil.rmtree(work, ignore_errors=True)


_NO_SPACE = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain, or in the text of one that wraps it (safetensors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if storage.is_disk_full(exc) or any(s in str(exc) for s in _NO_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full_message(settings: Settings) -> str:
    try:
        free = f" ({storage.free_bytes(settings) / 2**20:.1f} MiB free)"
    except OSError:
        free = ""
    return (f"no space left on the disk: the artifact store (WELORE_ARTIFACT_DIR){free} or the cache "
            "(WELORE_CACHE_DIR) is full; free space there (outputs of jobs and uploads you no longer need, cached "
            "spectra) and submit the job again")


FINAL_WRITE_PATIENCE_S = 600.0


def _write_patiently(settings, job_id: str, write: Callable):
    """`write(session)` in one transaction, tried again while the database is unreachable, for up to
    FINAL_WRITE_PATIENCE_S: a job that ends during an outage keeps its outcome. The reaper leaves it
    alone meanwhile (it cannot read the database either, and after an outage it waits a heartbeat
    timeout), and the retries come at least every heartbeat interval."""
    from sqlalchemy.exc import OperationalError

    deadline, delay = time.monotonic() + FINAL_WRITE_PATIENCE_S, 0.5
    while True:
        try:
            with session_scope(settings.db_url) as s:
                return write(s)
        except OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: the database is unreachable; writing its final state again in %.1f s", job_id, delay)
            time.sleep(delay)
            delay = min(2 * delay, settings.heartbeat_s)


def _end(settings, bus, pub: Publisher, job_id: str, status, *, code=None, message=None, result=None,
         files=()) -> str:
    """The job's final state, if this runner still holds its claim; the output is kept only on success."""
    final_dir = storage.job_dir(settings, job_id)
    if status is not states.SUCCEEDED:
        shutil.rmtree(final_dir, ignore_errors=True)
    events, seq = pub.take_pending()

    def write(s):
        if status is states.FAILED:
            t = states.fail(s, job_id, pub.runner, code, message, seq, metrics=pub.final_metrics(), stage=pub.stage,
                            events=events)
        else:
            t = states.finish(s, job_id, pub.runner, status, seq, result=result, metrics=pub.final_metrics(),
                              stage=pub.stage, events=events)
        if t is not None:
            for name, size, sha in files:
                s.add(Artifact(job_id=job_id, name=name, size=size, sha256=sha))
            return t
        job = s.get(Job, job_id)  # an earlier try may have committed, its answer lost with the connection
        return "written" if job is not None and (job.runner, job.status) == (pub.runner, status.value) else None

    try:
        t = _write_patiently(settings, job_id, write)
    except BaseException:
        shutil.rmtree(final_dir, ignore_errors=True)
        raise
    if t is None:  # reaped (presumed dead) meanwhile: the job is someone else's now
        shutil.rmtree(final_dir, ignore_errors=True)
        return "lost"
    _publish(bus, job_id, events if t == "written" else [*events, t.event])
    try:
        bus.set_latest(job_id, {"stage": pub.stage, "progress": 1.0 if status is states.SUCCEEDED else pub.progress,
                                "metrics": pub.final_metrics()})
    except Exception:
        pass
    _publish(bus, job_id, [], finished=True)
    log.info("job %s %s%s", job_id, status.value, f" ({code}: {message})" if code else "")
    return status.value


def _hand_back(settings, bus, pub: Publisher, job_id: str, enqueue) -> str:
    """Graceful shutdown: the job goes back to `queued` with its attempt given back."""
    pub.log("the worker is shutting down; the job goes back to the queue and runs again", "warning")
    with session_scope(settings.db_url) as s:
        events, seq = pub.take_pending()
        t = states.requeue(s, job_id, pub.runner, seq, give_back_attempt=True, reason="worker shutdown",
                           events=events)
    if t is None:
        return "lost"
    _publish(bus, job_id, [*events, t.event])
    if enqueue is not None:
        try:
            dispatch(settings.db_url, bus, enqueue, job_id, t.job.queue)
        except Exception:
            log.warning("could not re-enqueue %s; the reaper will once WELORE_HEARTBEAT_TIMEOUT_S has passed",
                        job_id, exc_info=True)
    return "requeued"
