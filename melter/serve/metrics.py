"""Prometheus metrics, read from Redis at each scrape (the farm's state is there, not in this
process, so several service replicas report the same numbers). Jobs are counted by the store's
scripts as they change (:mod:`melter.farm.counts`), so a scrape reads a few keys, however many
jobs Redis holds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from melter.farm.celery_app import PRIORITIES
from melter.farm.counts import RENDER_BUCKETS

# kombu's Redis transport keeps one list per priority step of a queue.
PRIORITY_STEPS = (0, 3, 6, 9)


def _queue_keys(prefix: str, queue: str) -> list[str]:
    return [f"{prefix}{queue}" if step == 0 else f"{prefix}{queue}\x06\x16{step}"
            for step in PRIORITY_STEPS]


class FarmCollector(Collector):
    """Jobs by state, render seconds, queue depth, live workers, callbacks, rooms."""

    def __init__(self, farm: Any, tracker: Any = None, limiter: Any = None) -> None:
        self.farm = farm
        self.tracker = tracker
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        store = self.farm.store
        r = store.r
        counts = store.counts()
        jobs = GaugeMetricFamily("melter_jobs", "Jobs in Redis by state", labels=["state"])
        for state, n in counts.states.items():
            jobs.add_metric([state], n)
        yield jobs

        buckets = [(str(b), n) for b, n in zip(RENDER_BUCKETS, counts.render_buckets, strict=True)]
        buckets.append(("+Inf", counts.render_count))
        yield HistogramMetricFamily(
            "melter_render_seconds", "Submission-to-done render time of the done jobs Redis "
            "still holds (MELTER_JOB_TTL_DAYS)", buckets=buckets,
            sum_value=counts.render_seconds)

        config = self.farm.config
        depth = GaugeMetricFamily("melter_queue_depth", "Messages waiting in the broker's "
                                  "queues", labels=["queue"])
        pipe = r.pipeline(transaction=False)
        for name in PRIORITIES:
            for key in _queue_keys(config.broker_key_prefix, config.queue(name)):
                pipe.llen(key)
        lengths = pipe.execute()
        per = len(PRIORITY_STEPS)
        for k, name in enumerate(PRIORITIES):
            depth.add_metric([name], sum(lengths[k * per:(k + 1) * per]))
        yield depth

        yield GaugeMetricFamily("melter_workers", "Live workers (presence refreshed each "
                                "second, expiring after 10 s)", value=store.live_workers())
        yield GaugeMetricFamily("melter_callbacks_pending", "Jobs with a status callback "
                                "still to deliver", value=r.zcard(f"{store.p}:outbox"))
        if self.tracker is not None:
            stats = self.tracker.stats()
            yield CounterMetricFamily("melter_janus_events", "VideoRoom events received",
                                      value=stats.get("events", 0))
            auto = CounterMetricFamily("melter_auto_renders", "Automatic renders decided",
                                       labels=["outcome"])
            auto.add_metric(["submitted"], stats.get("auto_submitted", 0))
            auto.add_metric(["skipped"], stats.get("auto_skipped", 0))
            auto.add_metric(["failed"], stats.get("auto_failed", 0))
            yield auto
            dropped = CounterMetricFamily(
                "melter_janus_events_dropped", "VideoRoom events dropped unread: a room or "
                "publisher id Janus could not have sent, or a timestamp too far from the "
                "service's clock (MELTER_JANUS_CLOCK_SKEW_SECONDS)", labels=["reason"])
            for reason in ("room", "publisher", "timestamp"):
                dropped.add_metric([reason], stats.get(f"dropped_{reason}", 0))
            yield dropped
            due = r.zcount(f"{self.tracker.p}:due", "-inf", "+inf")
            yield GaugeMetricFamily("melter_rooms_in_grace", "Rooms nobody publishes in, "
                                    "waiting for their grace period", value=due)
            yield GaugeMetricFamily("melter_rooms_failed", "Rooms a pass failed on (GET "
                                    "/rooms names them and the error)",
                                    value=r.hlen(f"{self.tracker.p}:failed"))
            yield CounterMetricFamily("melter_room_failures", "Passes that failed on a room "
                                      "(the other rooms went on)",
                                      value=stats.get("room_failures", 0))
        if self.limiter is not None:
            yield CounterMetricFamily("melter_janus_rate_limited", "POST /janus/events "
                                      "refused with 429 by this process",
                                      value=self.limiter.refused)
        yield GaugeMetricFamily("melter_scrape_timestamp_seconds", "When these were read",
                                value=time.time())
