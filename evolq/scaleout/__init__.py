"""Scale-out on Ray: an evolq EvoTorch ``Problem``'s evaluations on EvoTorch's Ray actors, from
one core to a cluster of GPUs, with the in-process results.

EvoTorch already distributes a ``Problem``'s evaluations (``Problem(num_actors=...,
actor_config=..., num_gpus_per_actor=...)``: its ``EvaluationActor``s each hold a pickled copy
of the problem, created on the first evaluation). This package is the one place where evolq
talks to Ray; any evolq Problem (the block-scale fitness ``evolq.problems.BlockFitnessProblem``,
the bit-allocation search) plugs in with two pieces:

* ``connect(actors, ray_address)`` (``placement``) starts a local Ray with the machine's cores
  (``ray_address=None``) or joins a running cluster (``"auto"``, ``HOST:PORT``), checks that it
  has the CPUs/GPUs asked for, and returns a ``Placement``; every failure (an unreachable
  address, a Ray that does not start, fewer resources than asked) is a one-line
  ``ScaleOutError`` raised before any work is done.
* ``ActorProblem`` (``actor``), a mixin placed before ``evotorch.Problem`` in the bases. The
  problem receives ``placement=`` and EvoTorch creates the actors as usual; the mixin adds what a
  long, exact run needs:

  - ``share(name, obj)`` / ``shared(name)``: what the fitness needs for the whole run (a
    model, calibration tensors, float outputs) goes to Ray's object store once and each
    actor fetches it once; in-process ``shared`` returns the object itself.
  - the per-generation state through EvoTorch's own hooks: ``_make_sync_data_for_actors()``
    (driver: the *whole* small state the actors need now) and ``_use_sync_data_from_main(state)``
    (actor). It travels with the next piece of work, only to actors that do not hold it yet,
    so a restarted actor gets it too.
  - deterministic work split (``split``): contiguous pieces, each a multiple of
    ``piece_multiple`` solutions (so an actor's chunks are the in-process chunks), one per actor.
  - actor failures (``restart``): a piece whose actor died (``ray.kill``, SIGKILL, a lost node)
    is evaluated again on a restarted actor (at most ``MAX_FAILURES`` times per piece); an actor
    that cannot be restarted leaves its work to the others.
  - accounting (``stats``, ``ScaleOutStats``): bytes sent and received per generation, each
    actor's busy time, the driver's share of the wall time, restarts, actors alive.
  - EvoTorch keeps one actor as none; evolq keeps it (so 1 actor can be measured and tested),
    and the driver's random generator is left as it was before the actors were created.

Ray is imported only when a run asks for actors.
"""
from .actor import ActorProblem
from .placement import ACTOR_WORDS, READY_TIMEOUT, WAIT_FREE, Placement, ScaleOutWarning, check_actors, connect
from .restart import MAX_FAILURES
from .split import split_weighted, split_work
from .stats import ScaleOutStats

__all__ = ["Placement", "ScaleOutStats", "ActorProblem", "ScaleOutWarning", "connect", "check_actors", "split_work",
           "split_weighted", "MAX_FAILURES", "ACTOR_WORDS", "READY_TIMEOUT", "WAIT_FREE"]
