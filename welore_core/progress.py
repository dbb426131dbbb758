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
    """A ProgressFn drawing one tqdm bar per stage on stderr (the command line's reporter on a
    terminal). A context manager: leaving it clears the bar, so what follows starts a line."""

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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(TqdmProgress):
    """A ProgressFn for a stderr that is not a terminal (a log file, a pipe): no redraws, one
    line when a stage starts, each time it passes another `step` of its total, and at its end."""

    def __init__(self, enabled: bool = True, step: float = 0.1, stream=None):
        super().__init__(enabled)
        self.step, self.stream = step, stream
        self._shown, self._last = -1.0, 0

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if event.stage != self._stage or event.done < self._last:  # a new stage, or the stage again
            self._stage, self._shown = event.stage, -1.0
        self._last = event.done
        frac = event.fraction
        bucket = int(frac / self.step + 1e-9) if event.done < event.total else float("inf")
        if bucket <= self._shown:
            return
        self._shown = bucket
        metrics = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.metrics.items())
        total = f"{event.done}/{event.total} ({100 * frac:.0f}%)" if event.total else str(event.done)
        line = " ".join(x for x in (f"{event.stage}:", total, event.message, metrics) if x)
        print(line, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        self._stage = None


def cli_progress(quiet: bool = False):
    """The command line's reporter: bars on a terminal, plain lines otherwise, nothing if quiet."""
    if quiet or sys.stderr is None:
        return TqdmProgress(enabled=False)
    return TqdmProgress() if sys.stderr.isatty() else LineProgress()
