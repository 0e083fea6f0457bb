"""Celery's worker consumer, made to notice a dead broker link and to come back within seconds.

Named by `worker_consumer` in edgefleet.celery_app and loaded by Celery only in a worker, so
producers (the router, the CLI) never import Celery's worker machinery.

Two things in Celery 5.7 kept a box cut off from Redis from ever noticing it, measured in the
network lab (tests/test_lab.py):

* The worker's event heartbeat (`worker-heartbeat`, every 2 s, which Flower reads) is published
  with `retry=True` and no limit: on a dead link it retries reconnecting, forever, inside the
  event loop. Nothing else runs meanwhile: not kombu's check of the BRPOP connection, not the
  acks of finished tasks. Here a heartbeat is sent once; one that fails is dropped (buffered
  by the dispatcher), its error already bounded by the socket timeouts (edgefleet.tcp_liveness).
* A lost connection is retried with kombu's default back-off (2 s, 2 s longer each try, up to
  30 s), so after a minute without a link a box could wait ~12 s more once the link was back.
  The broker is one Redis on the LAN and a try costs one SYN, so here it is tried every second.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from celery.worker import heartbeat
from celery.worker.consumer import Consumer
from celery.worker.consumer.heart import Heart as HeartStep

# Seconds between two tries to reach a lost broker.
RECONNECT_EVERY = 1.0


class _OneShotHeart(heartbeat.Heart):  # type: ignore[misc]
    def _send(self, event: str, retry: bool = True) -> Any:
        return super()._send(event, retry=False)


class OneShotHeartStep(HeartStep):  # type: ignore[misc]
    """Celery's heartbeat bootstep, sending each heartbeat once."""

    def start(self, c: Any) -> None:
        c.heart = _OneShotHeart(c.timer, c.event_dispatcher, self.heartbeat_interval)
        c.heart.start()


class QuickReconnectConsumer(Consumer):  # type: ignore[misc]
    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            f"{__name__}:OneShotHeartStep" if step == "celery.worker.consumer.heart:Heart" else step
            for step in Consumer.Blueprint.default_steps
        ]

    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) with kombu's
        # default intervals; this connection object is new for each connect, so wrapping it here
        # changes only these retries.
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_EVERY,
            interval_step=RECONNECT_EVERY,
            interval_max=RECONNECT_EVERY,
        )
        return super().ensure_connected(conn)
