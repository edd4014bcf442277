"""Melter's Celery application, set up for hour-long renders.

:func:`make_app` builds it (and :func:`client_app` one per farm for submitting); the worker's
own, with its task and signals, is :data:`melter.farm.worker.app`, which
``celery -A melter.farm.worker worker`` (or ``melter worker``) runs. Settings, and why:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged when its task
  ends, and given back when the pool process running it dies, never lost with it;
* ``worker_prefetch_multiplier = 1``: a worker reserves no more messages than it has pool
  processes, so a queued job waits in Redis, where any idle worker can take it;
* ``visibility_timeout`` (broker and result backend transport options alike) above the hard
  time limit: Redis hands an unacknowledged message to another worker after it, which must
  never happen to a job that is still running;
* soft and hard time limits: the soft limit raises in the task, which kills melt; the hard
  limit kills the pool process;
* ``worker_max_memory_per_child``: a pool process that grew is replaced after its task;
* three queues, ``manual``, ``auto`` then ``live``, read in that order
  (``queue_order_strategy: priority``): a re-render someone waits for is taken before any
  automatic one, and a meeting's render after its end before the prerenders of meetings still
  going on;
* task events on, and ``task-progress`` events from the running task, for Flower.

A worker also runs the sweeper (see :mod:`melter.farm.sweeper`): Celery's own redelivery of a
dead worker's message only comes after the visibility timeout, hours later; the farm's leases
bring the job back within ``lease_seconds``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from melter.farm.config import FarmConfig, load_config
from melter.farm.health import HealthFile
from melter.farm.job import Priority

#: The queues, in the order workers read them.
PRIORITIES = tuple(Priority)
TASK = "melter.run_unit"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def celery_settings(config: FarmConfig) -> dict[str, Any]:
    broker = config.broker_url or DEFAULT_BROKER
    visibility = int(config.visibility_timeout)
    transport: dict[str, Any] = {"visibility_timeout": visibility,
                                 "queue_order_strategy": "priority"}
    if config.broker_key_prefix:
        transport["global_keyprefix"] = config.broker_key_prefix
    return {
        "broker_url": broker,
        "result_backend": broker,
        "task_ignore_result": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "visibility_timeout": visibility,
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": config.soft_time_limit,
        "task_time_limit": config.hard_time_limit,
        "worker_max_memory_per_child": config.max_memory_per_child,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_queues": [Queue(config.queue(name), Exchange(config.queue(name), "direct"),
                              routing_key=config.queue(name)) for name in PRIORITIES],
        "task_default_queue": config.queue("auto"),
        "worker_hijack_root_logger": False,
    }


def make_app(config: FarmConfig | None = None) -> Celery:
    """A Celery app for ``config`` (default: from the environment). The task
    (:mod:`melter.farm.tasks`, named :data:`TASK`) registers itself on the apps of a process
    that imports it, as a worker does; a submitter sends it by name."""
    config = config or load_config()
    celery = Celery("melter")
    celery.conf.update(celery_settings(config))
    celery.melter_config = config  # type: ignore[attr-defined]
    if config.health_file is not None:
        celery.steps["consumer"].add(HealthFile)
    return celery


_CLIENTS: dict[tuple[str | None, str], Celery] = {}


def client_app(config: FarmConfig) -> Celery:
    """A (cached) app for submitting: one per broker and queue prefix."""
    key = (config.broker_url, config.queue_prefix)
    if key not in _CLIENTS:
        _CLIENTS[key] = make_app(config)
    return _CLIENTS[key]


def config_of(celery: Celery) -> FarmConfig:
    found = getattr(celery, "melter_config", None)
    return found if isinstance(found, FarmConfig) else load_config()
