"""``SearchConfig`` (how Evol-Q searches block scales) and ``EvolQConfig`` (a ``QuantConfig`` and a
``SearchConfig``: everything ``quantize_model`` needs)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .checks import check_choice, check_int
from .quant import QuantConfig

__all__ = ["SearchConfig", "EvolQConfig", "SCOPES", "UNITS"]

SCOPES = ("attn-weights", "weights", "activations", "block")
UNITS = ("block", "layer")


@dataclass
class SearchConfig:
    """Block-wise evolutionary search settings (paper defaults: P=10, C=3, K=15, S=10).

    ``cycles`` is the fitness-evaluation budget per block and pass: the tournament
    spends one evaluation per cycle; population searchers (cmaes, snes, pgpe) get the
    same number of evaluations, rounded to whole generations of ``popsize``.

    ``searcher`` is a registered name (``evolq.search.list_searchers()``), an EvoTorch
    ``SearchAlgorithm`` class (e.g. ``evotorch.algorithms.XNES``) or a factory;
    ``searcher_kwargs`` go to it (e.g. ``{"abs_child": False}`` for the tournament's
    plain ``parent + U(-eps, eps)``). ``loss`` is a registered loss
    (``evolq.losses.list_losses()``).
    """

    searcher: object = "tournament"
    searcher_kwargs: dict = field(default_factory=dict)
    loss: str = "infonce"
    passes: int = 10
    cycles: int = 3
    population: int = 15  # K, tournament population
    samples: int = 10  # S, tournament sample size
    popsize: int | None = None  # generation size for cmaes/snes/pgpe (default: their own)
    eps: float | None = None  # mutation range; None: 1e-3 for <=4-bit weights, 1e-4 for 8-bit
    noise: str = "absolute"  # "absolute": +U(-eps, eps); "relative": *(1 + U(-eps, eps))
    scope: str = "attn-weights"
    unit: str = "block"  # "layer": each conv/linear layer's weight scales are a search unit of their own
    order: str = "last-first"  # or "first-last"
    holdout: float = 0.1  # fraction of calibration data that decides if a pass is kept
    holdout_metric: str = "kl"  # "kl" or "agreement" to the float outputs, or "loss" (the fitness loss)
    infonce_batch: int = 100
    temperature: float = 3.0
    seed: int = 0
    # population x images per forward chunk: memory bound; small chunks stay in CPU cache (raise on GPU)
    max_batch: int = 32
    reuse_fitness: bool = True
    device: str = "cpu"
    progress: bool = True
    actors: int | str = 0  # Ray actors evaluating the fitness: 0 (in-process), N, "max" or "num_gpus"
    ray_address: str | None = None  # None: a local Ray (the machine's cores); "auto" or HOST:PORT: join a cluster

    def __post_init__(self):
        self.validate()

    def validate(self):
        from ..losses import LOSSES
        from ..scaleout import check_actors
        from ..search import SEARCHERS
        from ..search.registry import is_search_algorithm

        check_choice("loss", self.loss, LOSSES.names())
        if isinstance(self.searcher, str):
            check_choice("searcher", self.searcher, SEARCHERS.names())
        elif isinstance(self.searcher, type):
            if not is_search_algorithm(self.searcher):
                raise ConfigError(f"searcher class {self.searcher.__name__} is not an EvoTorch SearchAlgorithm")
        elif not callable(self.searcher):
            raise ConfigError(f"searcher must be a name ({', '.join(SEARCHERS.names())}), an EvoTorch "
                              f"SearchAlgorithm class or a factory, got {type(self.searcher).__name__}")
        if not isinstance(self.searcher_kwargs, dict) or not all(isinstance(k, str) for k in self.searcher_kwargs):
            raise ConfigError("searcher_kwargs must be a dict with string keys")
        check_choice("scope", self.scope, SCOPES)
        check_choice("unit", self.unit, UNITS)
        check_choice("noise", self.noise, ("absolute", "relative"))
        check_choice("order", self.order, ("last-first", "first-last"))
        check_int("passes", self.passes, 0, 10_000)
        check_int("cycles", self.cycles, 1, 1_000_000)
        check_int("population", self.population, 1, 100_000)
        check_int("samples", self.samples, 1, 100_000)
        check_int("infonce_batch", self.infonce_batch, 2, 1_000_000)
        check_int("max_batch", self.max_batch, 1, 1 << 30)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.popsize is not None:
            check_int("popsize", self.popsize, 2, 100_000)
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"eps must be positive, got {self.eps!r}")
        check_choice("holdout_metric", self.holdout_metric, ("kl", "agreement", "loss"))
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be positive, got {self.temperature!r}")
        check_actors(self.actors, self.ray_address)

    def eps_for(self, w_bits: int) -> float:
        if self.eps is not None:
            return self.eps
        if self.noise == "relative":
            return 0.02
        return 1e-3 if w_bits <= 4 else 1e-4


@dataclass
class EvolQConfig:
    """Everything ``quantize_model`` needs: the quantization regime and the search."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    @classmethod
    def make(cls, **kw) -> EvolQConfig:
        """Build from flat keyword arguments, e.g. ``EvolQConfig.make(w_bits=4, passes=2)``;
        ``preset="outlier-aware"`` starts the quantization fields from that preset."""
        kw = dict(kw)
        preset = kw.pop("preset", "fq-vit")
        qf = {f.name for f in dataclasses.fields(QuantConfig)}
        sf = {f.name for f in dataclasses.fields(SearchConfig)}
        unknown = set(kw) - qf - sf
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return cls(QuantConfig.preset(preset, **{k: v for k, v in kw.items() if k in qf}),
                   SearchConfig(**{k: v for k, v in kw.items() if k in sf}))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(self.search.searcher, str):
            d["search"]["searcher"] = getattr(self.search.searcher, "__name__", "custom")
        return d
