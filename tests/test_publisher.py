"""The worker's event publisher (worker/publisher.py) thins a job's events at the source: a job
reporting every step publishes at a bounded rate however fast it steps, a slow or short one keeps
every event, and no metric name or stage end is lost. On the embedded bus and an embedded (SQLite)
database; the clock is a fake one, so the rates are exact."""

from __future__ import annotations

import pytest

from welore_core.progress import ProgressEvent


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def publisher(tmp_path, monkeypatch):
    from api import migrate
    from api.events.bus import LocalEventBus
    from api.settings import Settings
    from worker import publisher as module

    settings = Settings(state_dir=tmp_path)
    migrate.upgrade(settings.db_url)
    clock = Clock()
    monkeypatch.setattr(module.time, "monotonic", clock)
    bus = LocalEventBus()
    pub = module.Publisher(settings, bus, "job_x", "runner", "finetune", 0, {})
    return pub, bus, clock


def _train(pub, clock, steps: int, step_s: float, eval_every: int = 0) -> None:
    for step in range(1, steps + 1):
        clock.t += step_s
        pub.on_progress(ProgressEvent("train", step, steps, metrics={"loss": 1.0 / step, "lr": 1e-3,
                                                                     "tokens_per_s": 100.0}))
        if eval_every and step % eval_every == 0 and step < steps:  # as the trainer does
            pub.on_progress(ProgressEvent("eval", 0, 1))
            pub.on_progress(ProgressEvent("eval", 1, 1, metrics={"val_ppl": 10.0 + step}))


def test_a_fast_job_publishes_at_a_bounded_rate(publisher):
    from worker.publisher import BURST, RATE

    pub, bus, clock = publisher
    _train(pub, clock, steps=5000, step_s=0.01, eval_every=1000)  # 100 steps a second for 50 s
    events = bus.read("job_x", -1)
    assert len(events) <= 2 * BURST + RATE * 50  # unthinned: 2 a step and 4 an eval, 10,020
    assert len(events) >= RATE * 50 - 1  # the budget is used, not starved
    metrics = [e for e in events if e["type"] == "metric"]
    names = {k for e in metrics for k in e["data"]["values"]}
    assert {"loss", "lr", "tokens_per_s", "val_ppl", "rss_mb"} <= names
    val = [e["data"]["values"]["val_ppl"] for e in metrics if "val_ppl" in e["data"]["values"]]
    assert val[-1] == 10.0 + 4000  # the last evaluation's value came out (held back or not)
    last = [e for e in events if e["type"] == "progress"][-1]["data"]
    assert (last["stage"], last["done"]) == ("train", 5000)  # a stage's last step is always published


def test_a_slow_or_short_job_keeps_every_event(publisher):
    pub, bus, clock = publisher
    _train(pub, clock, steps=30, step_s=1.0)
    losses = [e["data"]["values"]["loss"] for e in bus.read("job_x", -1) if e["type"] == "metric"]
    assert losses == [1.0 / step for step in range(1, 31)]
