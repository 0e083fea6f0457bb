"""The benchmarks' raw-Celery baseline task, loaded into the class workers only for a benchmark.

`bench_priorities.py` starts its node with `EDGEFLEET_WORKER_TASK_MODULES='["loadtests.bench_tasks"]'`;
the product worker registers nothing of this. `edgefleet.bench_sleep(seconds, label, key)`
stands in for a one-step `sleep` job: it sleeps, then appends `{"label", "start", "end"}`
(wall-clock seconds) to the Redis list `key` on the broker's Redis.
"""

from __future__ import annotations

import functools
import json
import time

import redis
from celery import current_app, shared_task

BENCH_SLEEP = "edgefleet.bench_sleep"
MAX_SECONDS = 3600.0


@functools.cache
def _results() -> redis.Redis:
    return redis.Redis.from_url(current_app.conf.broker_url)


@shared_task(name=BENCH_SLEEP)
def bench_sleep(seconds: float, label: str, key: str) -> None:
    start = time.time()
    time.sleep(min(max(float(seconds), 0.0), MAX_SECONDS))
    _results().rpush(key, json.dumps({"label": label, "start": start, "end": time.time()}))
