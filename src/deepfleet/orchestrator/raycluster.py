"""Starting or joining Ray: local by default, ``--address`` for a cluster.

An unreachable address is checked with a plain TCP connect first, so the user gets one clear
error in seconds instead of Ray's minute of retries and a stack trace.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

from deepfleet.errors import ConfigError

DEFAULT_PORT = 6379


def _host_port(address: str) -> tuple[str, int]:
    addr = address.removeprefix("ray://")
    host, _, port = addr.rpartition(":")
    if not host:
        return addr, DEFAULT_PORT
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379)") from None


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Raise ConfigError unless a TCP connection to the Ray head at ``address`` opens."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "'ray start --head' or 'ray up cluster.yaml', or drop --address to run locally"
        ) from None


def start_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Connect to the cluster at ``address`` or start a local Ray; return its resources.

    Idempotent within a process. The local instance gets no dashboard (nothing to serve here).
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING if quiet else logging.INFO,
                              "log_to_driver": not quiet}
    if address:
        check_reachable(address)
        ray.init(address=address, **kwargs)
    else:
        # "local": always a fresh Ray of our own. A bare ray.init() would join any cluster a
        # `ray start` left recorded in /tmp/ray, and hang for minutes if that one is dead.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray.cluster_resources()


def driver_node_id() -> str:
    """The id of this process's Ray node: device actors are pinned here (keys live here)."""
    return ray.get_runtime_context().get_node_id()
