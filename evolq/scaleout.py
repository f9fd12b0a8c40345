"""Scale-out on Ray: an evolq EvoTorch ``Problem``'s evaluations on EvoTorch's Ray actors, from
one core to a cluster of GPUs, with the in-process results.

EvoTorch already distributes a ``Problem``'s evaluations (``Problem(num_actors=...,
actor_config=..., num_gpus_per_actor=...)``: its ``EvaluationActor``s each hold a pickled copy
of the problem, created on the first evaluation). This module is the one place where evolq
talks to Ray; any evolq Problem (the block-scale fitness ``evolq.problems.BlockFitnessProblem``,
the bit-allocation search) plugs in with two pieces:

* ``connect(actors, ray_address)`` starts a local Ray with the machine's cores
  (``ray_address=None``) or joins a running cluster (``"auto"``, ``HOST:PORT``), checks that it
  has the CPUs/GPUs asked for, and returns a ``Placement``; every failure (an unreachable
  address, a Ray that does not start, fewer resources than asked) is a one-line
  ``ScaleOutError`` raised before any work is done.
* ``ActorProblem``, a mixin placed before ``evotorch.Problem`` in the bases. The problem
  receives ``placement=`` and EvoTorch creates the actors as usual; the mixin adds what a
  long, exact run needs:

  - ``share(name, obj)`` / ``shared(name)``: what the fitness needs for the whole run (a
    model, calibration tensors, float outputs) goes to Ray's object store once and each
    actor fetches it once; in-process ``shared`` returns the object itself.
  - the per-generation state through EvoTorch's own hooks: ``_make_sync_data_for_actors()``
    (driver: the *whole* small state the actors need now) and ``_use_sync_data_from_main(state)``
    (actor). It travels with the next piece of work, only to actors that do not hold it yet,
    so a restarted actor gets it too.
  - deterministic work split: contiguous pieces, each a multiple of ``piece_multiple``
    solutions (so an actor's chunks are the in-process chunks), one per actor.
  - actor failures: a piece whose actor died (``ray.kill``, SIGKILL, a lost node) is
    evaluated again on a restarted actor (at most ``MAX_FAILURES`` times per piece); an actor
    that cannot be restarted leaves its work to the others.
  - accounting (``ScaleOutStats``): bytes sent and received per generation, each actor's
    busy time, the driver's share of the wall time, restarts, actors alive.
  - EvoTorch keeps one actor as none; evolq keeps it (so 1 actor can be measured and tested),
    and the driver's random generator is left as it was before the actors were created.

Ray is imported only when a run asks for actors.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass, field

from .errors import ConfigError, EvolQError, ScaleOutError

__all__ = ["Placement", "ScaleOutStats", "ActorProblem", "ScaleOutWarning", "connect", "check_actors", "split_work",
           "split_weighted",
           "MAX_FAILURES", "ACTOR_WORDS"]

ACTOR_WORDS = ("max", "num_gpus")  # actors="max": one per free CPU; "num_gpus": one per GPU of the cluster
MAX_FAILURES = 3  # deaths of the actor evaluating one piece before the run gives up
READY_TIMEOUT = 300.0  # seconds for actors to start (import torch, fetch the shared objects, build the fitness)
WAIT_FREE = 30.0  # seconds to wait for resources held by other jobs (or a run that just ended) to free up


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


# -- connecting --------------------------------------------------------------------------
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


def _root_line(e: BaseException) -> str:
    """The last line of a (remote) error's message: the exception that caused it."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines()]
    lines = [x for x in lines if x]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _pythonpath() -> str:
    """PYTHONPATH for actors: this evolq's folder first, so workers import the driver's evolq."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def split_work(n: int, actors: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Contiguous ranges ``(start, stop)`` covering ``0..n``, at most one per actor, each starting
    at a multiple of ``multiple`` (so a piece's chunks of ``multiple`` are the chunks the whole
    batch has), as even as that allows. The same inputs always give the same split."""
    multiple = max(1, int(multiple))
    groups = math.ceil(n / multiple)
    k = max(1, min(actors, groups))
    base, extra = divmod(groups, k)
    out, g0 = [], 0
    for i in range(k):
        g = base + (i < extra)
        if g:
            out.append((g0 * multiple, min(n, (g0 + g) * multiple)))
        g0 += g
    return out


def split_weighted(weights, actors: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``(start, stop)`` covering the rows of ``weights`` (each row's estimated
    cost), at most one per actor, of about equal total cost: the cuts fall where the running total
    crosses ``i / k`` of the whole. The same inputs always give the same split."""
    w = [max(0.0, float(v)) for v in weights]
    n = len(w)
    k = max(1, min(actors, n))
    total = sum(w)
    if n == 0:
        return []
    if total <= 0:
        return split_work(n, k)
    cuts, run = [0], 0.0
    for piece in range(1, k):
        target, i = total * piece / k, cuts[-1]
        run += w[i]  # every piece holds at least one row
        i += 1
        while i < n - (k - piece) and run + w[i] / 2 < target:  # a row goes where most of it falls
            run += w[i]
            i += 1
        cuts.append(i)
    bounds = cuts + [n]
    return list(zip(bounds, bounds[1:]))


# -- accounting --------------------------------------------------------------------------
@dataclass
class ScaleOutStats:
    """What the actors did (driver side). Per generation (one dispatch of a batch): its size, the
    wall time from dispatch to the last result, each actor's busy time (measured on the actor:
    applying the state, evaluating), bytes sent (pickled pieces and states) and received."""

    actors: int = 0
    alive: int = 0
    restarts: int = 0
    generations: int = 0
    evaluations: int = 0
    wall_s: float = 0.0
    busy_mean_s: float = 0.0  # per generation, mean over the actors (idle ones count 0), summed
    busy_max_s: float = 0.0  # per generation, the slowest actor, summed
    bytes_sent: int = 0
    bytes_received: int = 0
    state_bytes: int = 0  # the states sent, included in bytes_sent
    shared_bytes: int = 0  # put once into the object store (each node fetches it once)
    log: list = field(default_factory=list)  # per generation: (n, wall, [busy per actor], sent, received)

    def record(self, n: int, wall: float, busy: list[float], sent: int, received: int) -> None:
        self.generations += 1
        self.evaluations += n
        self.wall_s += wall
        self.busy_mean_s += sum(busy) / max(1, self.actors)
        self.busy_max_s += max(busy, default=0.0)
        self.log.append((n, wall, list(busy), sent, received))

    @property
    def driver_share(self) -> float:
        """Share of the dispatch wall time the actors were not computing on average: serialisation,
        scheduling, transfer, and waiting on the slowest actor (0 with a perfect split)."""
        return max(0.0, 1.0 - self.busy_mean_s / self.wall_s) if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        g = max(1, self.generations)
        return {"actors": self.actors, "alive": self.alive, "restarts": self.restarts,
                "generations": self.generations, "evaluations": self.evaluations,
                "dispatch_seconds": self.wall_s, "actor_busy_mean_seconds": self.busy_mean_s,
                "actor_busy_max_seconds": self.busy_max_s, "driver_share": self.driver_share,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "bytes_sent_per_generation": self.bytes_sent / g, "state_bytes": self.state_bytes,
                "shared_bytes": self.shared_bytes}


# -- the mixin ---------------------------------------------------------------------------
def _nbytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    from ray import cloudpickle

    return len(cloudpickle.dumps(obj))


def _same(a, b) -> bool:
    """Equal states (tensors by value and dtype)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _actor_died(e: BaseException) -> bool:
    from ray import exceptions as rx

    return isinstance(e, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError))


def _raise_remote(e: BaseException):
    """An exception raised by the problem on an actor: evolq's own errors come back as themselves."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, EvolQError):
        raise cause from None
    raise e


class ActorProblem:
    """Mixin for an ``evotorch.Problem`` whose evaluations may run on Ray actors::

        class MyProblem(ActorProblem, evotorch.Problem):
            driver_only = ("model",)                      # stays on the driver
            def __init__(self, model, data, placement=None):
                super().__init__("min", solution_length=..., placement=placement)
                self.model = model
                self.share("data", data)                  # once per run, to every actor
            def _prepare(self):                           # on each actor (or in-process), once
                self.data = self.shared("data")
            def _make_sync_data_for_actors(self):         # driver: the whole small state, now
                return {"step": self.step}
            def _use_sync_data_from_main(self, state):    # actor
                self.step = state["step"]
            def _evaluate_batch(self, batch): ...         # as for any EvoTorch problem

    ``placement`` (from ``connect``) gives EvoTorch its actor arguments; None evaluates in
    this process exactly as EvoTorch does. ``close()`` ends the actors. On an actor,
    ``actor_device`` is its device (its GPU where it has one).
    """

    driver_only: tuple[str, ...] = ()  # attributes actors do not receive (large, or not picklable)
    piece_multiple: int = 1  # an actor's piece is a multiple of this many solutions (the last one excepted)

    def __init__(self, *args, placement: Placement | None = None, **kwargs):
        from ._evotorch import quiet

        if placement is not None:
            kwargs.update(placement.problem_kwargs())
        with quiet():
            super().__init__(*args, **kwargs)
        self.placement = placement
        if placement is not None and placement.actors == 1:  # EvoTorch drops a single actor; evolq keeps it
            self._num_actors = 1
            self._num_gpus_per_actor = placement.gpus if placement.gpus else None
        self._shared_local: dict = {}
        self._shared_refs: dict = {}
        self._shared_cache: dict = {}
        self._scaleout_version = 0  # state version an actor holds (driver: the version of self._state)
        self._state = (0, None, 0)  # driver: (version, a copy of the state, its pickled size)
        self._versions: dict = {}  # driver: actor id -> state version it holds
        self._template = None  # driver: the problem as actors receive it (object store), for restarts
        self.actor_info: list[dict] = []  # driver: per actor, what _scaleout_ready reported
        self.actor_device = None  # actor: its torch device
        self.stats = ScaleOutStats(placement.actors if placement else 0)
        self.dispatch_hook: list = []  # driver: f(problem, actors) after a generation's pieces are submitted

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return [*super()._nonserialized_attribs, "_shared_local", "_shared_cache", "_versions", "_template",
                "_state", "actor_info", "stats", "dispatch_hook", *self.driver_only]

    def seed(self, seed: int) -> None:
        """(Actor) EvoTorch 0.6's ``EvaluationActor`` seeds a problem that has its own generator
        with ``problem.seed(...)``, a method ``Problem`` does not have (it is ``manual_seed``)."""
        self.manual_seed(seed)

    # -- what actors hold for the whole run -----------------------------------------------
    def share(self, name: str, obj) -> None:
        """Make ``obj`` available as ``self.shared(name)`` wherever this problem evaluates: in this
        process ``obj`` itself; with actors, put into Ray's object store at the first evaluation
        and fetched once by each actor (a restarted actor fetches it again)."""
        if self._actors is not None:
            raise RuntimeError("share() must come before the first evaluation")
        self._shared_local[name] = obj

    def shared(self, name: str):
        local = self._shared_local
        if local is not None and name in local:
            return local[name]
        if self._shared_cache is None:
            self._shared_cache = {}
        if name not in self._shared_cache:
            import ray

            self._shared_cache[name] = ray.get(self._shared_refs[name])
        return self._shared_cache[name]

    # -- actors: creation, readiness, restarts ------------------------------------------
    def _parallelize(self):
        if self._actors is not None or self.is_remote or not self._num_actors:
            return super()._parallelize()
        import ray
        import torch

        from ._evotorch import quiet

        for name, obj in self._shared_local.items():
            if name not in self._shared_refs:
                self._shared_refs[name] = ray.put(obj)
                self.stats.shared_bytes += _nbytes(obj)
        self._template = ray.put(self)
        gen = self.generator  # EvoTorch draws the actors' seeds from it: leave it as it was
        rng = gen.get_state() if gen is not None else torch.random.get_rng_state()
        try:
            with quiet():
                super()._parallelize()
        finally:
            gen.set_state(rng) if gen is not None else torch.random.set_rng_state(rng)
        self.actor_info = self._wait_ready(self._actors)
        self._versions = {}
        self.stats.alive = len(self._actors)

    def _wait_ready(self, actors) -> list[dict]:
        """Each actor's ``_scaleout_ready`` report; an actor that fails to start is replaced once (a
        transient failure), then the run gives up with the cause."""
        import ray

        t = self.placement.ready_timeout if self.placement is not None else READY_TIMEOUT
        refs = [a.call.remote("_scaleout_ready", [], {}) for a in actors]
        infos = []
        for i, ref in enumerate(refs):
            try:
                infos.append(ray.get(ref, timeout=t))
            except ray.exceptions.GetTimeoutError:
                self.close()
                raise ScaleOutError(f"{len(actors)} Ray actor(s) did not start within {t:.0f} s: the cluster has no "
                                    f"free resources for them (see 'ray status') or they are slow to start") from None
            except ray.exceptions.RayError as e:
                if not _actor_died(e):
                    self.close()
                    _raise_remote(e)
                self.actor_info = infos + [{}] * (len(actors) - i)
                if not self._restart(i):
                    self.close()
                    raise ScaleOutError(f"a Ray actor could not start ({_root_line(e)}); is this evolq installed on "
                                        f"every node?") from None
                infos.append(self.actor_info[i])
                self.stats.restarts -= 1  # a start retried, not a restart
        return infos

    def _scaleout_ready(self) -> dict:
        """(Actor) threads, device, the problem's ``_prepare``; returns where and how it runs."""
        import ray
        import torch

        import evolq

        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(self.placement.cpus if self.placement else 1)))
        gpu_ids = ray.get_gpu_ids()
        self.actor_device = torch.device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")
        if self._shared_cache is None:
            self._shared_cache = {}
        self._start_preparations()
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "device": str(self.actor_device), "gpus": [str(g) for g in gpu_ids],
                "threads": torch.get_num_threads(), "evolq": evolq.__file__, "seconds": time.perf_counter() - t0}

    def _restart(self, i: int) -> bool:
        """Replace the dead actor ``self._actors[i]`` by a new one; False if none could start."""
        import ray
        from evotorch.core import EvaluationActor
        from ray.util import ActorPool

        try:
            ray.kill(self._actors[i])
        except Exception:
            pass
        self.stats.alive = len(self._actors) - 1
        opts = dict(self._actor_config or {})
        if isinstance(self._num_gpus_per_actor, (int, float)):
            opts["num_gpus"] = self._num_gpus_per_actor
        seeds = tuple((7919 * (i + 1) + k) % 2**32 for k in range(4))  # evaluation uses no randomness
        actor = EvaluationActor.options(**opts).remote(self._template, i, seeds, {})
        try:
            info = self._wait_ready_one(actor)
        except ScaleOutError:
            return False
        self._actors[i] = actor
        self._actor_pool = ActorPool(self._actors)
        self.actor_info[i] = info
        self.stats.restarts += 1
        self.stats.alive = len(self._actors)
        return True

    def _wait_ready_one(self, actor) -> dict:
        import ray

        t = self.placement.ready_timeout if self.placement is not None else READY_TIMEOUT
        try:
            return ray.get(actor.call.remote("_scaleout_ready", [], {}), timeout=t)
        except ray.exceptions.RayError:
            try:
                ray.kill(actor)
            except Exception:
                pass
            raise ScaleOutError("a restarted actor did not start") from None

    def scale_out_report(self) -> dict:
        """(Driver) the run's scale-out figures: the placement, ``stats`` and ``actor_nodes``, the
        number of nodes the actors ran on."""
        nodes = {i.get("node") for i in self.actor_info if i}
        return {**(self.placement.as_dict() if self.placement else {}), **self.stats.as_dict(),
                "actor_nodes": len(nodes)}

    def close(self) -> None:
        """End the actors (a later evaluation creates new ones)."""
        if getattr(self, "_actors", None) is not None and self.is_main:
            try:
                self.kill_actors()
            except Exception:
                self._actors, self._actor_pool = None, None
        self._shared_refs = {}
        self._template = None
        self._versions = {}
        if self.stats is not None:
            self.stats.alive = 0

    # -- evaluation --------------------------------------------------------------------
    def _sync_before(self) -> bool:
        return False  # the state travels with the pieces (map_rows), to the actors that need it

    def _evaluate_all(self, batch):
        if self._actors is None:  # in this process, or on an actor
            return super()._evaluate_all(batch)
        import torch

        values = batch.values.as_subclass(torch.Tensor)
        evals = self.map_rows("_scaleout_evaluate", values, self.piece_multiple)
        batch.set_evals(evals.to(dtype=batch.eval_dtype, device=batch.device))

    def _scaleout_evaluate(self, values):
        """(Actor) EvoTorch's evaluation of the solutions ``values``: their evaluation rows."""
        import torch

        piece = self.generate_batch(values.shape[0], empty=True)
        piece.set_values(values)
        self.evaluate(piece)
        return piece.evals.as_subclass(torch.Tensor).clone()

    def _current_state(self) -> tuple:
        """(Driver) the problem's state now: (version, a copy, its pickled size); the version goes up
        whenever the state differs from the last one."""
        import copy

        state = self._make_sync_data_for_actors()
        state = None if state is NotImplemented else state
        version, last, _ = self._state
        if state is not None and not _same(state, last):
            snap = copy.deepcopy(state)  # the driver may change its tensors in place later
            self._state = (version + 1, snap, len(pickle.dumps(snap, protocol=5)))
        return self._state

    def _submit(self, actor, method: str, rows, a: int, b: int):
        """Send rows ``a:b`` to ``actor`` for ``method``, with the state if it does not hold it yet."""
        version, state, size = self._state
        key = actor._actor_id.hex()
        send = state is not None and self._versions.get(key) != version
        piece = rows[a:b].clone()  # a view would pickle its whole storage
        sent = len(pickle.dumps(piece, protocol=5)) + (size if send else 0)
        self.stats.state_bytes += size if send else 0
        self._versions[key] = version  # (a dead actor's replacement has another id: it gets the state)
        return actor.call.remote("_scaleout_call", [method, piece, version, state if send else None], {}), sent

    def _scaleout_call(self, method: str, rows, version: int, state):
        """(Actor) apply the state if sent, then ``method(rows)``; returns its result and the busy seconds."""
        t0 = time.perf_counter()
        if state is not None:
            self._use_sync_data_from_main(state)
            self._scaleout_version = version
        elif version != self._scaleout_version:
            raise RuntimeError(f"actor holds state {self._scaleout_version}, the driver sent work for {version}")
        self._start_preparations()
        out = getattr(self, method)(rows)
        return out, time.perf_counter() - t0

    def map_rows(self, method: str, rows, multiple: int = 1, weights=None):
        """(Driver) ``method(rows[a:b])`` of the actors' problems on contiguous pieces of ``rows``
        (``split_work``: one per actor, each a multiple of ``multiple`` rows; or, given ``weights``, each
        row's estimated cost, ``split_weighted``: pieces of about equal cost), their results (tensors,
        one row per input row) concatenated in order. The problem's state goes along to actors that do
        not hold it yet; a piece whose actor died is evaluated again on its restarted actor. Counts
        one generation in ``stats``."""
        import ray
        import torch

        self._parallelize()
        self._current_state()
        n = rows.shape[0]
        ranges = split_work(n, len(self._actors), multiple) if weights is None else \
            split_weighted(weights, len(self._actors))
        t0 = time.perf_counter()
        pending, busy, sent, received, out = {}, {}, 0, 0, None
        for actor, (a, b) in zip(self._actors, ranges):
            ref, s = self._submit(actor, method, rows, a, b)
            pending[ref] = (actor, a, b, 0)
            sent += s
        for hook in list(self.dispatch_hook):
            hook(self, [p[0] for p in pending.values()])
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, a, b, fails = pending.pop(ref)
            try:
                res, secs = ray.get(ref)
            except Exception as e:
                if not _actor_died(e):
                    _raise_remote(e)
                if fails + 1 >= MAX_FAILURES:
                    self.close()
                    raise ScaleOutError(f"Ray actors died {MAX_FAILURES} times evaluating the same {b - a} "
                                        f"solution(s) ({type(e).__name__}); giving up") from None
                actor = self._replace(actor)
                ref, s = self._submit(actor, method, rows, a, b)
                pending[ref] = (actor, a, b, fails + 1)
                sent += s
                continue
            if out is None:
                out = torch.empty((n, *res.shape[1:]), dtype=res.dtype)
            out[a:b] = res
            key = actor._actor_id.hex()
            busy[key] = busy.get(key, 0.0) + secs
            received += res.numel() * res.element_size() + 8
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        self.stats.record(n, time.perf_counter() - t0, list(busy.values()), sent, received)
        return out if out is not None else torch.empty(0)

    def call_actors(self, method: str, *args) -> list:
        """(Driver) ``method(*args)`` of every live actor's problem; their results, in actor order
        (e.g. counters an actor keeps). Empty without actors."""
        if self._actors is None:
            return []
        import ray

        return ray.get([a.call.remote(method, list(args), {}) for a in self._actors])

    def _replace(self, dead):
        """A live actor to take over ``dead``'s piece: its restart, else the first other live actor."""
        i = next(k for k, a in enumerate(self._actors) if a is dead)
        if self._restart(i):
            return self._actors[i]
        del self._actors[i]
        if self.actor_info:
            del self.actor_info[i]
        if not self._actors:
            self._actors = None
            raise ScaleOutError("every Ray actor of the run died and none could be restarted; see 'ray status'")
        from ray.util import ActorPool

        self._actor_pool = ActorPool(self._actors)
        self.stats.alive = len(self._actors)
        return self._actors[0]
