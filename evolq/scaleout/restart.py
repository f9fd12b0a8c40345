"""Restart on failure: an actor that dies (``ray.kill``, SIGKILL, a lost node) is replaced by a
new one built from the problem as the actors received it, and its piece is evaluated again there
(at most ``MAX_FAILURES`` deaths per piece); an actor that cannot be restarted leaves its work to
the others; an actor that fails to start is replaced once (a transient failure) before the run
gives up with the cause. ``actor_died`` tells such deaths from errors the problem raised, which
``raise_remote`` raises on the driver (evolq's own errors as themselves).
"""
from __future__ import annotations

from ..errors import EvolQError, ScaleOutError
from .placement import READY_TIMEOUT

__all__ = ["ActorRestarts", "MAX_FAILURES", "actor_died", "raise_remote"]

MAX_FAILURES = 3  # deaths of the actor evaluating one piece before the run gives up


def actor_died(e: BaseException) -> bool:
    from ray import exceptions as rx

    return isinstance(e, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError))


def raise_remote(e: BaseException):
    """An exception raised by the problem on an actor: evolq's own errors come back as themselves."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, EvolQError):
        raise cause from None
    raise e


def _root_line(e: BaseException) -> str:
    """The last line of a (remote) error's message: the exception that caused it."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines()]
    lines = [x for x in lines if x]
    return (lines[-1] if lines else type(e).__name__)[:300]


class ActorRestarts:
    """(Driver) waiting for actors to start and replacing dead ones: a base of ``ActorProblem``,
    whose ``_actors``, ``_actor_pool``, ``_template`` (the problem as actors receive it),
    ``actor_info``, ``stats``, ``placement`` and ``close()`` it uses."""

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
                if not actor_died(e):
                    self.close()
                    raise_remote(e)
                self.actor_info = infos + [{}] * (len(actors) - i)
                if not self._restart(i):
                    self.close()
                    raise ScaleOutError(f"a Ray actor could not start ({_root_line(e)}); is this evolq installed on "
                                        f"every node?") from None
                infos.append(self.actor_info[i])
                self.stats.restarts -= 1  # a start retried, not a restart
        return infos

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
