"""The one Celery configuration that producers and workers share.

A different `priority_steps`/`sep` on either side strands messages in a Redis
list that no worker reads, so both build their app here.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from edgefleet.schemas import PriorityClass, ResourceClass
from edgefleet.settings import Settings

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


def create_celery(settings: Settings, *, main: str = "edgefleet") -> Celery:
    """Build the Celery app; nothing connects until a message is sent or a worker starts."""
    app = Celery(main, broker=settings.effective_broker_url, set_as_current=False)
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
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "unacked_restore_interval": settings.broker_restore_interval,
            "unacked_restore_throttle": settings.broker_restore_throttle,
        },
        task_default_queue=ResourceClass.cpu.value,
        task_queues=[Queue(rc.value) for rc in ResourceClass],
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        timezone="UTC",
    )
    return app
