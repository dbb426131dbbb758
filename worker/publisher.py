"""Forwarding a running job's progress to the event bus (at once) and the database (in batches).

`Publisher.on_progress` is the `ProgressFn` given to welore_core. Progress events come at a stage's
first and last step and every PROGRESS_EVERY_S between; metric events (memory, RSS and GPU,
throughput and the engine's own metrics: loss, lr, tokens/s, ppl) with each engine report and
every METRIC_EVERY_S. All of them draw on one budget per job (`RATE` a second, `BURST` at once), so
a job reporting every step (fine-tuning: 2 events a step unthinned) publishes at a bounded rate
however fast it steps: a short job keeps every event, a long one a sample, and a metric held back
goes out with the next metric event (its latest value). A stage's first and last events may borrow
up to BURST ahead. `flush()` writes pending events, stage, progress, latest
metrics and a heartbeat to the job row (`states.progress`, conditional on the worker's claim); a
heartbeat thread calls it while the job runs. A flush that finds the claim gone (the job was
reaped as lost, or finished) sets `lost`: the job is no longer this worker's to run.
Messages go out without server paths (api/redact.py).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Any, Optional

from api.db import session_scope
from api.events import store
from api.jobs import states
from api.redact import redact

log = logging.getLogger("welore.worker")

# Share of the overall progress each stage covers, per job type.
STAGE_SPANS: dict[str, dict[str, tuple[float, float]]] = {
    "compress": {"load": (0.0, 0.05), "calibrate": (0.05, 0.2), "spectrum": (0.05, 0.6),
                 "factorize": (0.6, 0.95), "save": (0.95, 1.0)},
    "finetune": {"load": (0.0, 0.05), "train": (0.05, 0.98)},  # saves happen mid-run too
    "evaluate": {"load": (0.0, 0.1), "eval": (0.1, 1.0)},
}
PROGRESS_EVERY_S = 0.5
METRIC_EVERY_S = 1.0
RATE, BURST = 4.0, 20  # events a second per job, sustained / at once
FLUSH_EVERY_S = 2.0


def _numeric(d: dict) -> dict[str, float]:
    """The finite numbers of `d` (NaN and ±inf have no JSON form)."""
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def resource_sample() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        import psutil

        out["rss_mb"] = psutil.Process(os.getpid()).memory_info().rss / 2**20
    except Exception:
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_mem_mb"] = torch.cuda.memory_allocated() / 2**20
            out["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception:
        pass
    return out


class Publisher:
    def __init__(self, settings, bus, job_id: str, runner: str, job_type: str, start_seq: int, params: dict):
        self.settings, self.bus, self.job_id, self.job_type = settings, bus, job_id, job_type
        self.runner = runner
        self.lost = False
        self.params = params
        self._lock = threading.RLock()
        self._seq = start_seq
        self._pending: list[dict] = []
        self._last_flush = 0.0
        self.stage: Optional[str] = None
        self.progress = 0.0
        self.metrics: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.db_cancel = False
        self._stage_t0 = time.monotonic()
        self._stage_done0 = 0
        self._last_progress = 0.0
        self._last_metric = 0.0
        self._unsent: dict[str, float] = {}  # engine metrics not in a metric event yet (their latest values)
        self._tokens, self._refilled = float(BURST), time.monotonic()
        self.t0 = time.monotonic()

    # -- events ---------------------------------------------------------------------------
    def make(self, type_: str, data: dict) -> dict:
        with self._lock:
            event = store.make_event(self._seq, type_, data)
            self._seq += 1
            self._pending.append(event)
            return event

    def emit(self, type_: str, data: dict) -> dict:
        event = self.make(type_, data)
        try:
            self.bus.publish(self.job_id, event)
        except Exception:
            log.warning("event bus unreachable; %s keeps its events for the database", self.job_id, exc_info=True)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", {"level": level, "message": redact(message, self.settings)})

    def _overall(self, stage: str, fraction: float) -> Optional[float]:
        span = STAGE_SPANS.get(self.job_type, {}).get(stage)
        if span is None:
            return None
        lo, hi = span
        return lo + (hi - lo) * min(max(fraction, 0.0), 1.0)

    def _budget(self, now: float, urgent: bool) -> bool:
        """Take one event from the job's budget; an urgent one (a stage's first or last) may borrow."""
        self._tokens = min(BURST, self._tokens + (now - self._refilled) * RATE)
        self._refilled = now
        if self._tokens >= 1 or (urgent and self._tokens > -BURST):
            self._tokens -= 1
            return True
        return False

    def on_progress(self, event) -> None:
        """The ProgressFn handed to welore_core."""
        now = time.monotonic()
        with self._lock:
            new_stage = event.stage != self.stage
            if new_stage:
                self.stage, self._stage_t0, self._stage_done0 = event.stage, now, event.done
                self._last_progress = 0.0
            overall = self._overall(event.stage, event.fraction)
            if overall is not None:
                self.progress = max(self.progress, overall)
            engine = _numeric(event.metrics or {})
            self._unsent.update(engine)
            self.metrics.update(engine)
            last = bool(event.total) and event.done >= event.total
            published = False
            due = new_stage or last or now - self._last_progress >= PROGRESS_EVERY_S
            if due and self._budget(now, new_stage or last):
                self._last_progress, published = now, True
                data = {"stage": event.stage, "done": event.done, "total": event.total,
                        "fraction": round(event.fraction, 6), "progress": round(self.progress, 6),
                        "message": redact(event.message, self.settings)}
                if event.stage == "plan":  # the memory plan (estimated peak, cache bytes), before the work
                    data["metrics"] = {k: v for k, v in (event.metrics or {}).items()  # JSON-safe values only
                                       if isinstance(v, (str, bool)) or k in engine or v is None}
                self.emit("progress", data)
            if (engine or last or now - self._last_metric >= METRIC_EVERY_S) and self._budget(now, last):
                self._last_metric, published = now, True
                values = {**resource_sample(), **self._unsent}
                self._unsent = {}
                elapsed = now - self._stage_t0
                if elapsed > 0 and event.done > self._stage_done0:
                    values.setdefault("items_per_s", (event.done - self._stage_done0) / elapsed)
                    if self.job_type == "evaluate" and event.stage == "eval":
                        values.setdefault("tokens_per_s", (event.done - self._stage_done0)
                                          * int(self.params.get("seq_len", 0)) / elapsed)
                self.metrics.update(values)
                for k in ("rss_mb", "gpu_mem_peak_mb"):
                    if k in values:
                        self.peaks[k] = max(self.peaks.get(k, 0.0), values[k])
                self.emit("metric", {"stage": event.stage, "step": event.done, "values": values})
            if published:
                try:
                    self.bus.set_latest(self.job_id, {"stage": self.stage, "progress": self.progress,
                                                      "metrics": self.metrics})
                except Exception:
                    pass
        if now - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    # -- database -------------------------------------------------------------------------
    def flush(self) -> None:
        """Pending events + stage/progress/metrics + heartbeat → the job row (one transaction)."""
        with self._lock:
            events, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            values: dict[str, Any] = {"progress": self.progress}
            if self.stage:
                values["stage"] = self.stage
            if self.metrics:
                values["metrics"] = dict(self.metrics)
            if self.lost:
                return
            try:
                with session_scope(self.settings.db_url) as s:
                    job = states.progress(s, self.job_id, self.runner, **values)
                    if job is None:
                        self.lost = True
                        log.warning("job %s is no longer this worker's (reaped or finished); stopping it",
                                    self.job_id)
                        return
                    store.add_events(s, self.job_id, events)
                    self.db_cancel = bool(job.cancel_requested)
            except Exception:
                log.warning("could not write progress of %s to the database; will retry", self.job_id,
                            exc_info=True)
                self._pending = events + self._pending

    def take_pending(self) -> tuple[list[dict], int]:
        """The events not yet in the database, and the seq of the next one."""
        with self._lock:
            events, self._pending = self._pending, []
            return events, self._seq

    def final_metrics(self) -> dict:
        out = dict(self.metrics)
        out.pop("gpu_mem_mb", None)
        for k, v in self.peaks.items():
            out[f"{k.removesuffix('_mb')}_peak_mb" if k == "rss_mb" else k] = v
        out["seconds"] = time.monotonic() - self.t0
        return out


class Heartbeat(threading.Thread):
    """Calls `publisher.flush()` every `interval` seconds until stopped."""

    def __init__(self, publisher: Publisher, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{publisher.job_id}")
        self.publisher, self.interval = publisher, interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.publisher.flush()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
