"""Scale-out accounting (``ScaleOutStats``, driver side): bytes sent and received per
generation, each actor's busy time, the driver's share of the wall time, restarts, actors alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ScaleOutStats"]


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
