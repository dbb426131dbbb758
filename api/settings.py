"""The one configuration object of the service, extending welore_core's CoreSettings.

Every setting has a default that works embedded (SQLite, a local artifact directory, an
in-process worker, no Redis) and an environment variable (prefix WELORE_) for production.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from welore_core.settings import CoreSettings


def _default_state_dir() -> Path:
    return Path.home() / ".local" / "share" / "welore"


class Settings(CoreSettings):
    state_dir: Path = _default_state_dir()
    """Where the embedded server keeps its SQLite database and artifacts (env WELORE_STATE_DIR)."""

    database_url: Optional[str] = None
    """SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (env WELORE_DATABASE_URL).
    Unset: SQLite at <state_dir>/welore.db."""

    redis_url: Optional[str] = None
    """Celery broker and progress streams, e.g. redis://host:6379/0 (env WELORE_REDIS_URL).
    Unset: embedded mode, an in-process worker and an in-memory event bus."""

    artifact_dir: Optional[Path] = None
    """Job outputs and uploaded files (env WELORE_ARTIFACT_DIR); unset: <state_dir>/artifacts.
    API and workers must see the same directory."""

    models_dir: Optional[Path] = None
    """Folders under it can be named as job inputs (env WELORE_MODELS_DIR); never a path outside."""

    queue_prefix: str = "welore"
    """Prefix of Celery queue names and Redis keys (env WELORE_QUEUE_PREFIX)."""

    gpu_queue: str = "gpu"
    light_queue: str = "light"

    job_time_limit_s: int = 6 * 3600
    """Hard limit of one job; the soft limit (a readable `time_limit` failure) is 60 s earlier."""

    upload_max_bytes: int = 200 * 1024 * 1024
    upload_max_line_bytes: int = 8 * 1024 * 1024
    """Longest line of an uploaded JSONL file (env WELORE_UPLOAD_MAX_LINE_BYTES): one record is read
    whole to check it, so this bounds the memory an upload takes; a longer line is a 422."""
    artifact_min_free_mb: int = 1024
    """/readyz is not ready while the artifact store has less free space than this, in MiB (env
    WELORE_ARTIFACT_MIN_FREE_MB)."""
    artifact_verify_max_age_s: float = 24 * 3600
    """A stored artifact's recorded SHA-256 check is trusted this long (env
    WELORE_ARTIFACT_VERIFY_MAX_AGE_S); then the next request re-hashes the file first. Whole-file
    downloads are hashed as they are sent in any case."""
    embedded_workers: int = 1
    """Threads running jobs in embedded mode (env WELORE_EMBEDDED_WORKERS)."""

    api_concurrency: int = 32
    """Requests of one API process that run database work at once (env WELORE_API_CONCURRENCY): the
    size of its request thread pool, and of its database pool plus a few connections for the event
    fan-out and the reaper (see `db_pool_size`). More requests wait for a thread, never for a
    connection; SSE followers hold neither (one fan-out thread per process reads the bus for all)."""

    heartbeat_s: float = 10.0
    """How often a running job writes its heartbeat (and progress) to the database."""
    heartbeat_timeout_s: float = 45.0
    """A running job with no heartbeat for this long has lost its worker: the reaper (in the API
    process) puts it back in the queue, or fails it `worker_lost` once `max_attempts` are spent."""
    max_attempts: int = 3
    """Starts of one job (a lost worker costs one; a graceful shutdown gives its attempt back)."""

    event_ttl_s: int = 7 * 24 * 3600
    """How long Redis keeps a finished job's event stream (Postgres keeps them for good)."""

    worker_device: Optional[str] = None
    """Device the worker passes to welore_core (env WELORE_WORKER_DEVICE); unset: WELORE_DEVICE."""

    @property
    def db_pool_size(self) -> int:
        """Connections of one process: a request thread each, plus the fan-out, the reaper and a spare."""
        return max(1, self.api_concurrency) + 3

    @property
    def reap_every_s(self) -> float:
        return max(0.5, min(15.0, self.heartbeat_timeout_s / 3))

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'welore.db'}"

    @property
    def artifacts(self) -> Path:
        return Path(self.artifact_dir or self.state_dir / "artifacts")

    def queue(self, kind: str) -> str:
        return f"{self.queue_prefix}.{self.gpu_queue if kind == 'gpu' else self.light_queue}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
