"""How soon a connection to Redis counts as dead when the other end goes silent.

A box whose link dies mid-conversation hears nothing: no RST, no FIN. Left alone, a read waits
for TCP to give up retransmitting (~15 min with Linux's `tcp_retries2`), an idle connection is
trusted until it is next used, and once the link is back TCP's exponential back-off can keep a
connection quiet for many seconds more. A blocked synchronous command also stalls kombu's event
loop, so its own check of the BRPOP connection never runs: measured in the network lab
(tests/test_lab.py), a box whose switch port went silent for 15 to 40 s served again only 13 to 15 s
after the port came back ("Redis BRPOP got no reply for 55 seconds"). These options bound each
wait to `dead_after` seconds, so the client gives up on the connection and makes a fresh one,
which works as soon as the link does.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkLiveness:
    dead_after: float  # seconds without an answer after which a connection is dropped

    @property
    def socket_timeout(self) -> float:
        """The longest a command waits for its reply (above kombu's 1 s BRPOP server timeout)."""
        return self.dead_after

    @property
    def connect_timeout(self) -> float:
        """A connect to a live Redis on the LAN takes milliseconds; a dead one is tried again soon."""
        return min(self.dead_after, 3.0)

    @property
    def health_check_interval(self) -> int:
        """redis-py pings a connection idle this long before using it; kombu checks its BRPOP
        and pub/sub connections this often (a BRPOP reply overdue by this is a dead link)."""
        return max(1, math.floor(self.dead_after / 2))

    def keepalive_options(self) -> dict[int, int]:
        """TCP options (redis-py's `socket_keepalive_options`): probes after a short idle time,
        and a user timeout so that data left unacknowledged that long drops the connection."""
        idle = max(1, math.floor(self.dead_after / 2))
        wanted = {
            # macOS names the idle time TCP_KEEPALIVE and has no TCP_USER_TIMEOUT.
            getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None)): idle,
            getattr(socket, "TCP_KEEPINTVL", None): 1,
            getattr(socket, "TCP_KEEPCNT", None): max(1, math.ceil(self.dead_after) - idle),
            getattr(socket, "TCP_USER_TIMEOUT", None): int(self.dead_after * 1000),
        }
        return {option: value for option, value in wanted.items() if option is not None}


# The Celery broker connections (workers' consumers, the router's producer).
BROKER_LIVENESS = LinkLiveness(dead_after=6.0)
# A worker's job-store client: its renewals, claims and results (workers/store_retry.py). Shorter,
# since the runner's own loop, which also watches the plugin, waits on each call.
WORKER_STORE_LIVENESS = LinkLiveness(dead_after=4.0)
