"""The actor-side problem: ``ActorProblem``, a mixin placed before ``evotorch.Problem`` in the
bases, that runs an evolq EvoTorch ``Problem``'s evaluations on EvoTorch's Ray actors with the
in-process results. It owns what actors hold for the whole run (``share`` / ``shared``: Ray's
object store, fetched once per actor), the actors' creation and readiness report, the
per-generation state (EvoTorch's ``_make_sync_data_for_actors`` / ``_use_sync_data_from_main``,
sent with the next piece only to actors that do not hold it yet) and the dispatch of a
generation's pieces (``map_rows``); the split is ``split``'s, the restarts ``restart``'s, the
accounting ``stats``'.
"""
from __future__ import annotations

import os
import pickle
import socket
import time

from ..errors import ScaleOutError
from .placement import EVOLQ_DIR, Placement
from .restart import MAX_FAILURES, ActorRestarts, actor_died, raise_remote
from .split import split_weighted, split_work
from .stats import ScaleOutStats

__all__ = ["ActorProblem"]


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


class ActorProblem(ActorRestarts):
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
        from .._evotorch import quiet

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

    # -- actors: creation, readiness (restarts: ActorRestarts) ------------------------
    def _parallelize(self):
        if self._actors is not None or self.is_remote or not self._num_actors:
            return super()._parallelize()
        import ray
        import torch

        from .._evotorch import quiet

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

    def _scaleout_ready(self) -> dict:
        """(Actor) threads, device, the problem's ``_prepare``; returns where and how it runs."""
        import ray
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(self.placement.cpus if self.placement else 1)))
        gpu_ids = ray.get_gpu_ids()
        self.actor_device = torch.device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")
        if self._shared_cache is None:
            self._shared_cache = {}
        self._start_preparations()
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "device": str(self.actor_device), "gpus": [str(g) for g in gpu_ids],
                "threads": torch.get_num_threads(), "evolq": os.path.join(EVOLQ_DIR, "__init__.py"),
                "seconds": time.perf_counter() - t0}

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

    def map_rows(self, method: str, rows, multiple: int = 1, weights=None, assign=None):
        """(Driver) ``method(rows[a:b])`` of the actors' problems on contiguous pieces of ``rows``
        (``split_work``: one per actor, each a multiple of ``multiple`` rows; or, given ``weights``, each
        row's estimated cost, ``split_weighted``: pieces of about equal cost; or, given ``assign``, the
        index of the actor each row goes to: actor ``i`` gets its rows in their order), their results
        (tensors, one row per input row) in the rows' order. The problem's state goes along to actors
        that do not hold it yet; a piece whose actor died is evaluated again on its restarted actor.
        Counts one generation in ``stats``."""
        import ray
        import torch

        self._parallelize()
        self._current_state()
        n = rows.shape[0]
        perm = None
        if assign is not None:  # rows grouped by actor, in order within each: contiguous pieces again
            assign = [int(a) for a in assign]
            if len(assign) != n or any(not 0 <= a < len(self._actors) for a in assign):
                raise ValueError(f"assign needs one actor index in 0..{len(self._actors) - 1} per row")
            perm = sorted(range(n), key=lambda i: (assign[i], i))
            rows = rows[perm]
            bounds, ranges = 0, []
            for i in range(len(self._actors)):
                c = assign.count(i)
                ranges.append((bounds, bounds + c))
                bounds += c
        elif weights is None:
            ranges = split_work(n, len(self._actors), multiple)
        else:
            ranges = split_weighted(weights, len(self._actors))
        t0 = time.perf_counter()
        pending, busy, sent, received, out = {}, {}, 0, 0, None
        for actor, (a, b) in zip(self._actors, ranges):
            if b <= a:
                continue
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
                if not actor_died(e):
                    raise_remote(e)
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
        if out is None:
            return torch.empty(0)
        if perm is not None:
            back = torch.empty_like(out)
            back[torch.tensor(perm)] = out
            out = back
        return out

    def call_actors(self, method: str, *args) -> list:
        """(Driver) ``method(*args)`` of every live actor's problem; their results, in actor order
        (e.g. counters an actor keeps). Empty without actors."""
        if self._actors is None:
            return []
        import ray

        return ray.get([a.call.remote(method, list(args), {}) for a in self._actors])
