"""Handing a committed job to its workers, with the marks the reaper relies on (the transport that
carries the message, Celery or the embedded thread pool, is api/dispatch.py's dispatcher)."""

from __future__ import annotations

import logging

from ..db import session_scope
from . import states

log = logging.getLogger("welore.dispatch")


def dispatch(db_url: str, bus, enqueue, job_id: str, queue: str) -> None:
    """Send a committed, queued job to its workers (`enqueue(job_id, queue)`, which raises when the
    broker is unreachable), leave the bus's sent mark next to the message, then mark the row sent.
    A job never marked sent in its row, or whose bus mark is gone (the broker lost the message), is
    sent again by the reaper. A message sent twice is harmless: only one delivery can claim the job."""
    enqueue(job_id, queue)
    try:
        bus.mark_sent(job_id)
    except Exception:  # sent all the same; at worst the reaper sends it once more
        log.warning("could not leave the sent mark of %s on the bus", job_id, exc_info=True)
    try:
        with session_scope(db_url) as s:
            states.dispatched(s, job_id)
    except Exception:  # sent all the same; at worst the reaper sends it once more
        log.warning("could not mark %s dispatched", job_id, exc_info=True)
