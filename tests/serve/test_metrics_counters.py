"""``/metrics`` reads job counters the store's scripts keep, not every job: a real ``melter
serve`` against real Redis answers in milliseconds with 100 000 jobs, and its numbers equal a
count of every job after each kind of change, including job records that expire or are deleted.

Redis database 12 (``MELTER_TEST_SERVICE_REDIS_DB``), under the test's private prefix, deleted
afterwards (the counters' keys are under it too).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from melter.farm.counts import RENDER_BUCKETS
from melter.farm.job import JobState, UnitKind
from melter.farm.store import Dispatch, Store
from melter.farm.sweeper import presence_key
from tests.helpers.farm import FarmHarness
from tests.helpers.service import farm, running_service

__all__ = ["farm"]  # the fixture, used by name

MAIN = UnitKind.MAIN.value
LEASE = 30.0


def fields(priority: str = "auto") -> dict[str, str]:
    return {"spec": "{}", "outputs": "[]", "inputs": "[]", "priority": priority,
            "queue": priority, "max_attempts": "3", "notify": "0"}


def scrape(client: httpx.Client) -> dict[str, Any]:
    """The farm's job metrics from ``/metrics``: jobs by state, and the render histogram."""
    text = client.get("/metrics").text
    out: dict[str, Any] = {"states": {}, "buckets": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "melter_jobs":
                out["states"][sample.labels["state"]] = sample.value
            elif sample.name == "melter_render_seconds_bucket":
                out["buckets"][sample.labels["le"]] = sample.value
            elif sample.name in ("melter_render_seconds_count", "melter_render_seconds_sum",
                                 "melter_workers"):
                out[sample.name] = sample.value
    return out


def recount(store: Store) -> dict[str, Any]:
    """Every job read, as ``/metrics`` counted before the counters (the reference)."""
    ids = store.r.zrange(f"{store.p}:jobs", 0, -1)
    pipe = store.r.pipeline(transaction=False)
    for job in ids:
        pipe.hmget(store.job_key(job), "state", "started", "finished")
    states: Counter[str] = Counter({s.value: 0 for s in JobState})
    durations = []
    for state, started, finished in pipe.execute() if ids else []:
        if state is None:
            continue
        states[state] += 1
        if state == JobState.DONE and started and finished:
            durations.append(float(finished) - float(started))
    buckets = {str(b): float(sum(1 for d in durations if d <= b)) for b in RENDER_BUCKETS}
    buckets["+Inf"] = float(len(durations))
    return {"states": {s: float(n) for s, n in states.items()}, "buckets": buckets,
            "count": float(len(durations)), "sum": sum(durations)}


def assert_counted(client: httpx.Client, store: Store, what: str) -> dict[str, Any]:
    seen = scrape(client)
    truth = recount(store)
    assert seen["states"] == truth["states"], what
    assert seen["buckets"] == truth["buckets"], what
    assert seen["melter_render_seconds_count"] == truth["count"], what
    assert abs(seen["melter_render_seconds_sum"] - truth["sum"]) < 1e-3, what
    return truth


def run_main(store: Store, item: Dispatch, ttl: int, worker: str = "w1") -> str:
    """Claim, commit and complete a job's main unit: the job is done."""
    assert store.claim(item.job, MAIN, item.token, worker, LEASE)[0]
    store.begin_commit(item.job, MAIN, item.token, LEASE)
    return store.complete(item.job, MAIN, item.token, "out.mp4", 30, ttl)[0]


def test_metrics_answer_in_milliseconds_with_100000_jobs(farm: FarmHarness) -> None:
    store = farm.farm.store
    n = 100_000
    with running_service(farm) as service, service.client(None) as client:
        scrape(client)  # the service's first scrape: counting begins on an empty farm
        began = time.perf_counter()
        made = store.create_many(((f"bulk{i:06d}", fields("manual" if i % 10 == 0 else "auto"))
                                  for i in range(n)), time.time(), 3600)
        created_s = time.perf_counter() - began
        assert len(made) == n and store.r.zcard(f"{store.p}:jobs") == n
        # Some move on: done (their records set to expire), failed, cancelled, running.
        for item in made[:100]:
            assert run_main(store, item, ttl=3600) == "done"
        for item in made[100:150]:
            assert store.claim(item.job, MAIN, item.token, "w1", LEASE)[0]
            assert store.fail(item.job, MAIN, item.token, "broken", -1, 3, "w1")[0] == "failed"
            store.expire_finished(item.job, 3600)
        for item in made[150:250]:
            assert store.cancel(item.job)[0] == "cancelled"
        for item in made[250:300]:
            assert store.claim(item.job, MAIN, item.token, "w1", LEASE)[0]
        expected = {"queued": n - 300, "running": 50, "joining": 0, "done": 100, "failed": 50,
                    "cancelled": 100}
        times = []
        for _ in range(9):
            at = time.perf_counter()
            seen = scrape(client)
            times.append(time.perf_counter() - at)
        assert seen["states"] == {k: float(v) for k, v in expected.items()}
        assert seen["melter_render_seconds_count"] == 100
        began = time.perf_counter()
        truth = recount(store)
        recount_s = time.perf_counter() - began
    median = statistics.median(times)
    print(f"\n{n} jobs created through Store.create_many in {created_s:.1f} s; GET /metrics "
          f"median {median * 1000:.1f} ms (min {min(times) * 1000:.1f}, max "
          f"{max(times) * 1000:.1f}, {len(times)} scrapes); reading every job, as /metrics "
          f"did before the counters, took {recount_s * 1000:.0f} ms")
    assert truth["states"] == seen["states"]
    assert median < 0.050, f"/metrics took {median * 1000:.1f} ms (median) with {n} jobs"


def test_counters_equal_a_recount_through_every_change(farm: FarmHarness) -> None:
    store = farm.farm.store
    now = time.time()
    with running_service(farm) as service, service.client(None) as client:
        assert_counted(client, store, "an empty farm")
        made = [store.create(f"one{i:02d}", fields(), now, 30) for i in range(6)]
        made += store.create_many([(f"many{i:02d}", fields()) for i in range(30)], now, 30)
        jobs = {item.job: item for item in made}
        assert_counted(client, store, "created")

        # running, then done whole (their records set to expire in an hour)
        for name in ("one00", "one01", "many00", "many01"):
            assert run_main(store, jobs[name], ttl=3600) == "done"
        assert store.r.zscore(f"{store.p}:expiring", "one00") is not None
        assert_counted(client, store, "done")

        # a long meeting: planned into chunks, the join makes the job joining, then done
        item = jobs["one02"]
        assert store.claim(item.job, MAIN, item.token, "w1", LEASE)[0]
        store.begin_commit(item.job, MAIN, item.token, LEASE)
        parts = [{"name": name, "weight": 1, "output": 0}
                 for name in ("a0", "v0.0", "v0.1")]
        units = [*parts, {"name": "j0", "weight": 1, "output": 0, "deps": "a0,v0.0,v0.1"}]
        ready = store.expand(item.job, item.token, units, 30, {"chunks": "2"})
        assert sorted(d.unit for d in ready) == ["a0", "v0.0", "v0.1"]
        for part in ready:
            assert store.claim(part.job, part.unit, part.token, "w2", LEASE)[0]
        assert_counted(client, store, "chunks running")
        joins: list[Dispatch] = []
        for part in ready:
            store.begin_commit(part.job, part.unit, part.token, LEASE)
            joins += store.complete(part.job, part.unit, part.token, "part", 30, 3600)[1]
        [join] = joins
        assert store.claim(join.job, join.unit, join.token, "w3", LEASE)[0]
        assert store.job(item.job)["state"] == JobState.JOINING
        assert_counted(client, store, "joining")
        store.begin_commit(join.job, join.unit, join.token, LEASE)
        assert store.complete(join.job, join.unit, join.token, "out", 30, 3600)[0] == "done"
        assert_counted(client, store, "joined")

        # failures: retried (the job stays running), for good, and a lost lease
        item = jobs["one03"]
        assert store.claim(item.job, MAIN, item.token, "w1", LEASE)[0]
        retry = store.fail(item.job, MAIN, item.token, "flaky", 0, 3, "w1")
        assert retry[0] == "retry"
        assert store.job(item.job)["state"] == JobState.RUNNING
        assert store.claim(item.job, MAIN, retry[1], "w2", LEASE)[0]
        assert store.fail(item.job, MAIN, retry[1], "broken", -1, 3, "w2")[0] == "failed"
        item = jobs["many02"]
        assert store.claim(item.job, MAIN, item.token, "w1", 0.1)[0]
        time.sleep(0.2)
        assert store.expire(item.job, MAIN, item.token, 1)[0] == "failed"
        assert_counted(client, store, "failed")

        # cancelled: queued, running (its attempt then stops)
        assert store.cancel("many03") == ("cancelled", [])
        item = jobs["many04"]
        assert store.claim(item.job, MAIN, item.token, "w1", LEASE)[0]
        assert store.cancel(item.job) == ("cancelled", [MAIN])
        store.finish_cancelled(item.job, MAIN, item.token)
        assert store.cancel(item.job) == ("ended", ["cancelled"])
        assert_counted(client, store, "cancelled")

        # an ended job's record set to expire, then taken back by a retry: it keeps its record
        store.expire_finished("many04", 3600)
        status, token = store.reset("many04", 30, 3600)
        assert status == "ok" and store.r.pttl(store.job_key("many04")) == -1
        assert store.r.zscore(f"{store.p}:expiring", "many04") is None
        assert store.job("many04")["state"] == JobState.QUEUED
        assert_counted(client, store, "retried")
        # run again, it is done, and stays counted once
        assert run_main(store, Dispatch("many04", MAIN, token), ttl=3600) == "done"
        assert_counted(client, store, "done again")

        # expiry: ended jobs' records vanish after their time to live; the sweeper's pass takes
        # them out of the counters (a scrape would too)
        gone = ("one00", "one03", "many02", "many03")
        for name in gone:
            store.expire_finished(name, 1)
        time.sleep(1.5)
        assert all(not store.job(name) for name in gone)
        assert store.reap() == len(gone)
        truth = assert_counted(client, store, "expired")
        assert truth["states"] == {"queued": 27, "running": 0, "joining": 0, "done": 5,
                                   "failed": 0, "cancelled": 0}

        # a record deleted by hand: `melter jobs` finds it gone and forgets it
        store.r.delete(store.job_key("many05"))
        assert [j["id"] for j in farm.farm.jobs(limit=100) if j["id"] == "many05"] == []
        assert "many05" not in store.r.zrange(f"{store.p}:jobs", 0, -1)
        truth = assert_counted(client, store, "deleted")
        assert truth["states"]["queued"] == 26

        # records that expire between two scrapes leave the counters at the next scrape
        for name in ("many06", "many07"):
            assert run_main(store, jobs[name], ttl=1) == "done"
        assert_counted(client, store, "done, expiring")
        time.sleep(1.5)
        assert_counted(client, store, "expired unswept")

        # counters lost (or a farm counted before them): rebuilt at the next scrape
        store.r.delete(f"{store.p}:counts")
        assert_counted(client, store, "rebuilt")
        assert store.r.hexists(f"{store.p}:counts", "since")

        # workers: their presence keys, counted without a scan of the database
        key = presence_key(store.p, "w9@test")
        store.present(key, 10)
        assert scrape(client)["melter_workers"] == 1
        store.absent(key)
        assert scrape(client)["melter_workers"] == 0
