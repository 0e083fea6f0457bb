"""The one Celery configuration that producers and workers share.

A different `priority_steps`/`sep` on either side strands messages in a Redis
list that no worker reads, so both build their app here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis
from celery import Celery
from kombu.entity import Queue
from kombu.transport import redis as kombu_redis

from edgefleet.schemas import PriorityClass, ResourceClass
from edgefleet.settings import Settings
from edgefleet.tcp_liveness import BROKER_LIVENESS

RUN_SUBTASK = "edgefleet.run_subtask"
PROBE = "edgefleet.probe"
# Interactive subtasks go to `<queue>.express`: every worker of the class consumes it, and a
# node's express slots consume only it (see `workers.node`).
EXPRESS_SUFFIX = ".express"

# Redis priorities: 0 is the most urgent.
MESSAGE_PRIORITY: dict[PriorityClass, int] = {
    PriorityClass.interactive: 0,
    PriorityClass.normal: 4,
    PriorityClass.batch: 8,
}


def node_queue(node_name: str) -> str:
    """The direct queue of one box, for work that must run there."""
    return f"node.{node_name}"


def worker_hostname(resource_class: str, node: str, *, express: bool = False) -> str:
    """The Celery hostname of a node's class worker (Flower and celery_worker_up show it)."""
    return f"{resource_class}{'-express' if express else ''}@{node}"


class _ClosedSafeChannel(kombu_redis.Channel):
    """kombu's Redis channel, minus a crash when the broker restarts under running tasks.

    When the broker connection breaks, Celery (5.7) first `collect()`s the connection, which
    detaches the transport (`transport.client = None`), then closes it. Closing the default
    channel puts back the messages of tasks still running (acks_late), and for that kombu
    builds a new connection pool from `self.connection.client`: None, so `AttributeError:
    'NoneType' object has no attribute 'hostname'` (or `'client'` once the channel itself is
    detached). That is not one of the connection errors Celery ignores while closing, so the
    worker dies ("Unrecoverable error"); see kombu#582 and later reports of the same path,
    reproduced here with kombu 5.7.0 / Celery 5.7.0. Saying "not connected" instead lets
    Celery finish closing and reconnect; the running tasks' messages stay unacked in Redis
    (restored after the visibility timeout, and then refused by the job store's claim)."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("broker connection already closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class ClosedSafeRedisTransport(kombu_redis.Transport):
    Channel = _ClosedSafeChannel


def create_celery(settings: Settings, *, main: str = "edgefleet") -> Celery:
    """Build the Celery app; nothing connects until a message is sent or a worker starts."""
    app = Celery(main, broker=settings.effective_broker_url, set_as_current=False)
    if urlparse(settings.effective_broker_url).scheme == "redis":
        # rediss:// keeps kombu's own transport: an explicit transport would drop its TLS default.
        app.conf.broker_transport = ClosedSafeRedisTransport
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # The job store holds results; Celery's own result backend would duplicate them.
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A worker outlives any broker outage (default: gives up after 100 tries, ~50 min).
        broker_connection_max_retries=None,
        # Running plugins keep running when the broker connection drops: the job store, not the
        # message, owns the attempt (its lease and result write wait out a Redis restart).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "unacked_restore_interval": settings.broker_restore_interval,
            "unacked_restore_throttle": settings.broker_restore_throttle,
            # A dead link (no RST) is noticed within seconds, not at TCP's timeout, and no command
            # blocks the worker's event loop longer than that (edgefleet.tcp_liveness).
            "socket_timeout": BROKER_LIVENESS.socket_timeout,
            "socket_connect_timeout": BROKER_LIVENESS.connect_timeout,
            "socket_keepalive": True,
            "socket_keepalive_options": BROKER_LIVENESS.keepalive_options(),
            "health_check_interval": BROKER_LIVENESS.health_check_interval,
        },
        # ...and a lost broker is tried again every second, not with Celery's growing back-off.
        worker_consumer="edgefleet.broker_reconnect:QuickReconnectConsumer",
        task_default_queue=ResourceClass.cpu.value,
        task_queues=[Queue(rc.value) for rc in ResourceClass],
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        # Off on joined boxes: their Redis user may not use the remote-control channel, through which
        # any worker could tell every other one to shut down (edgefleet/store/acl.py).
        worker_enable_remote_control=settings.worker_remote_control,
        worker_send_task_events=False,
        task_send_sent_event=False,
        timezone="UTC",
    )
    return app
