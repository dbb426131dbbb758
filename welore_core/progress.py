"""Progress reporting and cancellation: the callbacks long operations receive.

`ProgressFn(event)` is called as work advances; `StopFn()` is polled between units of work
and, when it returns True, the operation raises `Cancelled` before writing anything.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import Cancelled


@dataclass
class ProgressEvent:
    stage: str  # e.g. "spectrum", "factorize", "eval", "train"
    done: int
    total: int
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


ProgressFn = Callable[[ProgressEvent], None]
StopFn = Callable[[], bool]


def no_progress(event: ProgressEvent) -> None:
    return None


def check_stop(should_stop: Optional[StopFn]) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("stopped at the caller's request; nothing was written")


class TqdmProgress:
    """A ProgressFn drawing one tqdm bar per stage on stderr (the command line's reporter)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self._bar = None
        self._stage = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        bar = self._bar
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        post = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.metrics.items()}
        if event.message:
            post["at"] = event.message
        if post:
            bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None
