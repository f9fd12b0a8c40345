"""Connecting to Ray and placing a run's actors: ``check_actors`` (the ``SearchConfig.actors`` /
``ray_address`` values, no Ray import), ``connect`` (start a local Ray with the machine's cores or
join a running cluster, check it has the CPUs/GPUs asked for, wait for busy ones), the resulting
``Placement`` and the actors' PYTHONPATH (this evolq's folder first, ``EVOLQ_DIR``). Every
failure is a one-line ``ScaleOutError`` raised before any work is done; ``ScaleOutWarning`` is
for actors that cannot gain anything.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from ..errors import ConfigError, ScaleOutError

__all__ = ["Placement", "ScaleOutWarning", "connect", "check_actors", "ACTOR_WORDS", "READY_TIMEOUT", "WAIT_FREE",
           "EVOLQ_DIR"]

ACTOR_WORDS = ("max", "num_gpus")  # actors="max": one per free CPU; "num_gpus": one per GPU of the cluster
READY_TIMEOUT = 300.0  # seconds for actors to start (import torch, fetch the shared objects, build the fitness)
WAIT_FREE = 30.0  # seconds to wait for resources held by other jobs (or a run that just ended) to free up
EVOLQ_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this evolq's package folder


class ScaleOutWarning(UserWarning):
    """Actors that cannot gain anything (a steady-state searcher evaluates one candidate per step)."""


def check_actors(actors, ray_address=None) -> None:
    """Validate ``SearchConfig.actors`` / ``ray_address`` (no Ray import): ``ConfigError`` if bad."""
    if isinstance(actors, str):
        if actors not in ACTOR_WORDS:
            raise ConfigError(f"actors must be an integer >= 0, 'max' or 'num_gpus', got {actors!r}")
    elif isinstance(actors, bool) or not isinstance(actors, int) or not 0 <= actors <= 100_000:
        raise ConfigError(f"actors must be an integer in 0..100000, 'max' or 'num_gpus', got {actors!r}")
    if ray_address is None:
        return
    if not isinstance(ray_address, str) or not ray_address.strip():
        raise ConfigError(f"ray_address must be None, 'auto' or HOST:PORT, got {ray_address!r}")
    if actors == 0:
        raise ConfigError("ray_address needs actors (actors=0 evaluates in this process): give actors=N, 'max' "
                          "or 'num_gpus'")
    if ray_address != "auto" and not ray_address.startswith("ray://"):
        host, sep, port = ray_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"ray_address must be 'auto', HOST:PORT or ray://HOST:PORT, got {ray_address!r}")


@dataclass(frozen=True)
class Placement:
    """Where a run's actors go: ``actors`` of ``cpus`` CPUs (= torch threads) and ``gpus`` GPUs each,
    on the Ray cluster at ``address`` (``nodes`` alive when connected)."""

    actors: int
    cpus: int = 1
    gpus: float = 0.0
    address: str = ""
    nodes: int = 1
    ready_timeout: float = READY_TIMEOUT

    def problem_kwargs(self) -> dict:
        """The EvoTorch ``Problem`` arguments for these actors."""
        return {"num_actors": self.actors, "actor_config": {"num_cpus": self.cpus},
                "num_gpus_per_actor": self.gpus if self.gpus else None}

    def as_dict(self) -> dict:
        return {"actors": self.actors, "cpus_per_actor": self.cpus, "gpus_per_actor": self.gpus,
                "address": self.address, "nodes": self.nodes}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _pythonpath() -> str:
    """PYTHONPATH for actors: this evolq's folder first, so workers import the driver's evolq."""
    root = os.path.dirname(EVOLQ_DIR)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise ScaleOutError(f"cannot reach a Ray cluster at {address} ({reason}): start one there with 'ray start "
                            f"--head' or check the address") from None


def _ensure_ray(address: str | None) -> str:
    """Start or join Ray (once per process); returns the cluster's GCS address."""
    import ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in (None, "auto") and not address.startswith("ray://") and address != current:
            raise ScaleOutError(f"this process is already connected to the Ray cluster at {current}; it cannot join "
                                f"{address} as well")
        return current
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=False,
                  runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}})
    if address is None:
        try:
            ray.init(num_cpus=_cores(), include_dashboard=False, **kwargs)
        except Exception as e:
            _shutdown_quietly()
            raise ScaleOutError(f"could not start a local Ray ({type(e).__name__}: {_first_line(e)})") from None
    else:
        if address != "auto" and not address.startswith("ray://"):
            _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:
            _shutdown_quietly()
            raise ScaleOutError(f"could not join the Ray cluster at {address} ({_first_line(e)})") from None
    return ray.get_runtime_context().gcs_address


def _shutdown_quietly() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass


def connect(actors, ray_address: str | None = None, *, cpus_per_actor: int = 1, wait_s: float = WAIT_FREE,
            ready_timeout: float = READY_TIMEOUT) -> Placement | None:
    """Start or join Ray and place ``actors``; ``None`` for ``actors=0`` (in-process).

    Args:
        actors: a count, ``"max"`` (one actor per free CPU) or ``"num_gpus"`` (one actor per GPU
            of the cluster, each with that GPU).
        ray_address: ``None`` starts a local Ray with this machine's cores (or uses the Ray this
            process already runs); ``"auto"`` or ``HOST:PORT`` joins a running cluster.
        cpus_per_actor: CPUs reserved for each actor, which is also its torch thread count.
        wait_s: how long to wait for resources that other jobs hold (they may be finishing).
        ready_timeout: how long actors may take to start before the run gives up.

    Raises ``ConfigError`` for bad values and a one-line ``ScaleOutError`` for a cluster that
    cannot be reached or started, or that has fewer resources than asked.
    """
    check_actors(actors, ray_address)
    if actors == 0:
        return None
    if isinstance(cpus_per_actor, bool) or not isinstance(cpus_per_actor, int) or cpus_per_actor < 1:
        raise ConfigError(f"cpus_per_actor must be a positive integer, got {cpus_per_actor!r}")
    import ray

    local = ray_address is None and not ray.is_initialized()
    if local and isinstance(actors, int) and actors * cpus_per_actor > _cores():  # fail before starting Ray
        raise ScaleOutError(f"this machine has {_cores()} CPUs; {actors} actors x {cpus_per_actor} CPU need "
                            f"{actors * cpus_per_actor}: ask for fewer actors, or join a cluster (ray_address)")
    address = _ensure_ray(ray_address)
    where = "the local Ray" if ray_address is None else f"the Ray cluster at {address}"
    total = ray.cluster_resources()
    free = ray.available_resources()
    if actors == "num_gpus":
        n, gpus = int(total.get("GPU", 0)), 1.0
        if n < 1:
            raise ScaleOutError(f"actors='num_gpus' but {where} has no GPU; give a number of CPU actors instead")
    elif actors == "max":
        n, gpus = int(free.get("CPU", 0) // cpus_per_actor), 0.0
        if n < 1:
            raise ScaleOutError(f"actors='max' but {where} has no free CPU ({free.get('CPU', 0):g} of "
                                f"{total.get('CPU', 0):g})")
    else:
        n, gpus = int(actors), 0.0
    need = {"CPU": n * cpus_per_actor, "GPU": n * gpus}
    for res, amount in need.items():
        if amount and total.get(res, 0) < amount:
            raise ScaleOutError(f"{where} has {total.get(res, 0):g} {res}s; {n} actors x "
                                f"{amount / n:g} {res} need {amount:g}: ask for fewer actors")
    end = time.monotonic() + wait_s
    while any(amount and free.get(res, 0) < amount for res, amount in need.items()):
        if time.monotonic() > end:
            have = ", ".join(f"{free.get(r, 0):g} of {total.get(r, 0):g} {r}s" for r, a in need.items() if a)
            raise ScaleOutError(f"{where} is busy: {have} free, {n} actors need {need['CPU']:g} CPUs"
                                + (f" and {need['GPU']:g} GPUs" if need["GPU"] else "")
                                + f" (waited {wait_s:.0f} s; see 'ray status')")
        time.sleep(0.5)
        free = ray.available_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return Placement(n, cpus_per_actor, gpus, address, nodes, ready_timeout)
