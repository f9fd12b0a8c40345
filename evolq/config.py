"""Configuration objects: what to quantize (``QuantConfig``) and how to search
(``SearchConfig``), bundled in ``EvolQConfig`` for ``quantize_model``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["QuantConfig", "SearchConfig", "EvolQConfig", "AllocationConfig", "parse_budget", "SCOPES", "REGIMES",
           "STARTS", "UNITS", "BUDGET_KINDS", "field_default"]

SCOPES = ("attn-weights", "weights", "activations", "block")
REGIMES = ("fq-vit", "deploy")
DEPLOY_WEIGHTS = ("auto", "symmetric", "asymmetric")
DEPLOY_STRENGTH = {8: 1.0, 4: 0.8}  # w_bits -> smooth_strength (others, not measured: 0.5); QuantConfig.deploy_strength
STARTS = ("rtn", "gptq", "brecq", "ofq")
UNITS = ("block", "layer")


def field_default(cls, name: str):
    """The default of dataclass field ``name`` (the CLI reads its defaults from here)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@dataclass
class QuantConfig:
    """The end-to-end fake-quantization regime (the start point).

    Defaults reproduce the authors' FQ-ViT start point: weights unsigned asymmetric
    per-channel MinMax with bias correction, activations uint8 per-tensor OMSE,
    PTF on LayerNorm inputs, softmax output uint8 uniform.

    Beyond the authors' regime (``QuantConfig.preset("outlier-aware")``), for models
    with a few huge activation channels (e.g. AugReg ViTs):

    * ``ptf_zero_point="channel"``: one zero-point per LayerNorm-input channel
      (FQ-ViT shares one), and ``ptf_max_alpha`` more power-of-two factors;
    * ``linear_input="channel"``: per-channel scales and zero-points on the inputs of
      Linear layers (for transformer MLPs this includes fc2, i.e. the GELU output),
      folded into the weights before weight quantization (RepQ-ViT's
      reparameterization), so the deployed matmul stays per-tensor.
      ``linear_input_strength`` (0..1, default 0.5) says how much of each channel's
      range moves into the weights, as SmoothQuant's migration strength: factors
      ``(s_c / mean s) ** strength``; 1 is fully per-channel activations (best for
      8-bit weights only), 0 keeps one scale and only per-channel zero-points.

    ``start`` chooses how weights are rounded before the search: ``"rtn"``
    (round-to-nearest, the default), ``"gptq"`` (one-shot Hessian-based error
    compensation), ``"brecq"`` (block reconstruction with learned AdaRound rounding,
    QDrop optional) or ``"ofq"`` (a short end-to-end distillation fine-tune of the
    quantized weights, OFQ's StatsQ and CGA as switches); ``start_options`` sets their
    knobs (``evolq.qnn.reconstruct``). Bias correction applies to the ``rtn`` start only:
    the others correct the rounding error themselves.

    ``weight_observer="statsq"`` (OFQ's StatsQ) gives every weight row the step
    ``2 * mean|w| / 2^(b-1)`` on a grid of 2^b levels with none at zero (a half-step
    zero-point), under any start.

    ``regime="deploy"`` (``QuantConfig.preset("deploy")``) is what CPU integer kernels
    execute (oneDNN through PyTorch's inductor, onnxruntime, OpenVINO): the input of every
    Linear/Conv quantized per tensor, unsigned and asymmetric (``a_bits``, u8 container); its
    weights signed, symmetric, per output channel, zero-point 0 (``w_bits``, int8 container);
    nothing else (LayerNorm inputs, residual adds, q/k/v, softmax and GELU stay float, so the
    fields of the FQ-ViT regime, ``ptf``, ``attn_probs``, ``linear_input`` and
    ``bias_correction``, do not apply). Outlier channels are handled offline, so every
    activation stays per tensor: SmoothQuant factors ``f_c = max|x_c|^a / max|W_c|^(1-a)``
    (``smooth_strength`` a; 0 is off) divide a LayerNorm's affine (or the v rows of qkv) and
    multiply the next Linear's input columns, an exact float transform applied before
    calibration (``evolq.qnn.smooth``). ``smooth_strength=None`` takes
    ``QuantConfig.deploy_strength(w_bits)``. ``deploy_weights`` (weights below 8 bits):
    ``"auto"`` (default) and ``"asymmetric"`` give each row a grid of 2^b levels with an integer
    zero-point z; the integers q - z lie in [-(2^b - 1), 2^b - 1], so they are stored as s8 with
    zero-point 0 and the same int8 kernels run them (lower calibration-pool KL than the symmetric
    grid at W4A8 under GPTQ: 0.343 against 0.479); ``"symmetric"`` keeps the 2^b - 1 levels centred
    on zero. 8-bit weights stay symmetric (their q - z would not fit in s8).

    ``edge_bits`` (default None: every layer alike, the FQ-ViT regime) gives the first
    Linear/Conv (patch embedding, stem convolution) and the classifier at least that
    many bits, weights and input alike: BRECQ, QDrop and Brevitas' PTQ example keep these
    two layers at 8 bits. The input of the first layer is the image, which 4-bit
    activations cut to 16 levels.

    ``layer_bits`` (default empty) gives single layers other widths, after ``edge_bits``: a
    mapping from layer names or glob patterns (``"blocks.*.mlp.fc2"``) to weight bits (2..8),
    ``"float"`` (the layer stays unquantized) or ``{"w_bits": ..., "a_bits": ...}``; later
    entries override earlier ones (``evolq.qnn.layer_bits``; ``evolq allocate`` writes one).
    ``w_bits`` and ``a_bits`` stay the widths of every layer it does not name.

    ``w_group`` (default None: one weight grid per output channel) gives every quantized layer's
    weights one scale and zero-point per ``w_group`` consecutive input columns of each row
    (group-wise weights, ``evolq.quant.groups``; a conv's input is ``in_channels / groups * kh * kw``);
    it must divide every such layer's input and be at least 8. ``layer_bits`` entries
    ``{"w_bits": 3, "group": 64}`` (or ``"3g64"``; ``"group": None`` for per channel) set it per layer.

    ``rotation`` (default ``"none"``) fuses orthogonal rotations into the float model before it
    is wrapped (QuaRot-style incoherence processing, ``evolq.qnn.rotate``), so every start and
    regime sees a float model that computes the same function with its outlier channels spread:
    ``"hadamard"`` (randomised Hadamard, signs from ``rotation_seed``) or ``"random"`` (seeded
    random orthogonal matrices) on the residual stream and the attention heads, exact and free at
    run time. ``rotation_mlp`` also rotates every MLP hidden with an online Hadamard before fc2
    (exact; the one rotation that costs run time). Families without rotation points (the CNNs)
    stay unrotated, with a warning.
    """

    w_bits: int = 8
    a_bits: int = 8
    weight_observer: str = "minmax"
    act_observer: str = "omse"
    bias_correction: bool = True
    ptf: bool = True
    attn_probs: str = "uniform"  # "uniform" (a_bits) or "log2" (attn_bits, default 4)
    attn_bits: int | None = None
    ptf_zero_point: str = "shared"  # "shared" (FQ-ViT) or "channel"
    ptf_max_alpha: int = 3
    linear_input: str = "tensor"  # "tensor" (FQ-ViT) or "channel" (folded into the weights)
    linear_input_strength: float = 0.5  # "channel": factors (s_c / mean s)^strength; 1 = fully per channel
    start: str = "rtn"  # weight rounding of the start point: "rtn", "gptq", "brecq" or "ofq" (evolq.qnn.reconstruct)
    start_options: dict = field(default_factory=dict)  # settings of the start (GPTQ/BRECQ/OFQOptions)
    edge_bits: int | None = None  # at least this many bits for the first and last layer (weights and inputs)
    regime: str = "fq-vit"  # "fq-vit" (the authors' fake-quantized regime) or "deploy" (what integer kernels run)
    smooth_strength: float | None = None  # deploy: SmoothQuant migration strength (0 = off; None: deploy_strength)
    deploy_weights: str = "auto"  # deploy, weights below 8 bits: "asymmetric", "symmetric"; "auto": asymmetric
    layer_bits: dict = field(default_factory=dict)  # layer name or glob -> bits, "float", "3g64" or {w_bits, ...}
    # group-wise weights (evolq.quant.groups): one grid per w_group input columns of each row; None: per channel
    w_group: int | None = None
    # rotations (evolq.qnn.rotate), fused into the float model before it is wrapped:
    rotation: str = "none"  # "none", "hadamard" or "random": residual stream and attention heads, exact, offline
    rotation_seed: int = 0  # the rotation's random signs / matrices
    rotation_mlp: bool = False  # also an online Hadamard on every MLP hidden before fc2 (exact; costs run time)

    PRESETS = {
        "fq-vit": {},
        "outlier-aware": {"ptf_zero_point": "channel", "ptf_max_alpha": 5, "linear_input": "channel"},
        "deploy": {"regime": "deploy", "bias_correction": False},
    }

    @staticmethod
    def deploy_strength(w_bits: int) -> float:
        """The deploy regime's SmoothQuant strength for ``w_bits`` (``smooth_strength=None``),
        chosen by KL on calibration-pool images (``python -m benchmarks deploy_strengths``, ViT-Tiny,
        rtn start): 1.0 at 8 bits, 0.8 at 4 (re-checked under GPTQ with the asymmetric 4-bit
        grid: 0.8 again, against 0.5, 0.9 and 1.0); other widths were not measured and take 0.5."""
        return DEPLOY_STRENGTH.get(w_bits, 0.5)

    @staticmethod
    def outlier_strength(w_bits: int, start: str = "rtn") -> float:
        """The outlier-aware preset's ``linear_input_strength`` for ``w_bits`` and ``start``:
        the lowest KL on calibration-pool images. Round-to-nearest
        (``benchmarks/suites/preset_strength.py``, ViT-Tiny): 0.75 at 8 bits, 0.25 at 4 and 3 bits;
        5-7 bits were not measured and get 0.5. With a gptq or brecq start the rounding
        error is compensated, so more of each channel's range can move into the weights:
        0.625 at 4 bits and 0.5 at 3 bits and below (``benchmarks/suites/start_choices.py``,
        calibration pool only; measured with gptq, brecq assumed alike)."""
        if w_bits >= 8:
            return 0.75
        if start == "rtn":
            return 0.25 if w_bits <= 4 else 0.5
        return 0.625 if w_bits == 4 else 0.5

    @classmethod
    def preset(cls, name: str, **overrides) -> QuantConfig:
        """A named regime: ``"fq-vit"`` (the authors' start point, the defaults),
        ``"outlier-aware"`` (its ``linear_input_strength`` follows ``w_bits``, see
        ``outlier_strength``) or ``"deploy"`` (what CPU integer kernels run, see the class
        docstring); keyword arguments override single fields."""
        _check_choice("preset", name, tuple(cls.PRESETS))
        fields = {**cls.PRESETS[name], **overrides}
        if name == "outlier-aware" and "linear_input_strength" not in overrides:
            w_bits = fields.get("w_bits", cls.w_bits)
            if isinstance(w_bits, int) and not isinstance(w_bits, bool):  # else validation reports it
                fields["linear_input_strength"] = cls.outlier_strength(w_bits, fields.get("start", cls.start))
        return cls(**fields)

    def __post_init__(self):
        self.validate()

    def validate(self):
        from .quant import OBSERVERS, WEIGHT_ONLY_OBSERVERS

        _check_int("w_bits", self.w_bits, 2, 8)
        _check_int("a_bits", self.a_bits, 4, 8)
        _check_choice("weight observer", self.weight_observer, tuple(OBSERVERS))
        _check_choice("activation observer", self.act_observer,
                      tuple(o for o in OBSERVERS if o not in WEIGHT_ONLY_OBSERVERS))
        _check_choice("attn_probs", self.attn_probs, ("uniform", "log2"))
        if self.attn_bits is not None:
            _check_int("attn_bits", self.attn_bits, 2, 8)
        _check_choice("ptf_zero_point", self.ptf_zero_point, ("shared", "channel"))
        _check_int("ptf_max_alpha", self.ptf_max_alpha, 0, 8)
        _check_choice("linear_input", self.linear_input, ("tensor", "channel"))
        st = self.linear_input_strength
        if isinstance(st, bool) or not isinstance(st, (int, float)) or not 0.0 <= st <= 1.0:
            raise ConfigError(f"linear_input_strength must be a number in [0, 1], got {st!r}")
        _check_choice("start", self.start, STARTS)
        _check_choice("regime", self.regime, REGIMES)
        ss = self.smooth_strength
        if ss is not None and (isinstance(ss, bool) or not isinstance(ss, (int, float)) or not 0.0 <= ss <= 1.0):
            raise ConfigError(f"smooth_strength must be a number in [0, 1] or None, got {ss!r}")
        _check_choice("deploy_weights", self.deploy_weights, DEPLOY_WEIGHTS)
        if self.deploy_weights == "asymmetric" and not self.deploy:
            raise ConfigError(f"deploy_weights={self.deploy_weights!r} applies to the deploy regime; the "
                              f"{self.regime!r} regime's weights are asymmetric already")
        if self.edge_bits is not None:
            _check_int("edge_bits", self.edge_bits, 2, 8)
        self._validate_rotation()
        from .qnn.layer_bits import normalize_layer_bits

        normalize_layer_bits(self.layer_bits)  # types and ranges; names are checked against the model at wrap time
        from .qnn.layer_bits import check_group

        check_group(self.w_group, "w_group")  # whether it divides each layer's input is checked at wrap time
        if not isinstance(self.start_options, dict):
            raise ConfigError(f"start_options must be a dict, got {type(self.start_options).__name__}")
        if self.start_options:
            from .start_options import start_options

            start_options(self.start, self.start_options)  # raises ConfigError on unknown or bad values
            if self.deploy and self.start == "ofq" and self.start_options.get("qkr") is True:
                raise ConfigError("ofq qkr (query-key reparameterization) quantizes the attention's q.k product, "
                                  "which the deploy regime keeps in float: use the fq-vit or outlier-aware regime, "
                                  "or qkr=false")

    def _validate_rotation(self):
        from .qnn.rotate import ROTATIONS

        _check_choice("rotation", self.rotation, ROTATIONS)
        _check_int("rotation_seed", self.rotation_seed, 0, 2**63 - 1)
        if not isinstance(self.rotation_mlp, bool):
            raise ConfigError(f"rotation_mlp must be true or false, got {self.rotation_mlp!r}")
        if self.rotation_mlp and self.rotation == "none":
            raise ConfigError("rotation_mlp rotates the MLP hidden on top of a rotation: set rotation to hadamard "
                              "or random")

    @property
    def deploy(self) -> bool:
        return self.regime == "deploy"

    def deploy_symmetric(self, bits: int) -> bool:
        """Whether a deploy-regime weight quantizer of ``bits`` is symmetric. ``"asymmetric"``
        gives weights below 8 bits a grid of 2^b levels with a per-channel integer zero-point z:
        the integers q - z lie in [-2^b + 1, 2^b - 1], so they are stored as s8 with
        zero-point 0 and the int8 kernels run them unchanged (one more level than the
        symmetric grid's 2^b - 1, and the grid follows each row's range). 8-bit weights stay
        symmetric: their q - z would not fit in s8. ``"auto"`` (the default) is asymmetric:
        at ViT-Tiny W4A8 under GPTQ its calibration-pool dev KL was 0.343 against the
        symmetric grid's 0.479 (``python -m benchmarks deploy_strengths``)."""
        return bits >= 8 or self.deploy_weights == "symmetric"

    @property
    def smoothing(self) -> float:
        """The SmoothQuant strength in effect (0 outside the deploy regime)."""
        if not self.deploy:
            return 0.0
        return self.deploy_strength(self.w_bits) if self.smooth_strength is None else float(self.smooth_strength)

    @property
    def probs_bits(self) -> int:
        if self.attn_bits is not None:
            return self.attn_bits
        return 4 if self.attn_probs == "log2" else self.a_bits


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
        from .losses import LOSSES
        from .scaleout import check_actors
        from .search import SEARCHERS
        from .search.registry import is_search_algorithm

        _check_choice("loss", self.loss, LOSSES.names())
        if isinstance(self.searcher, str):
            _check_choice("searcher", self.searcher, SEARCHERS.names())
        elif isinstance(self.searcher, type):
            if not is_search_algorithm(self.searcher):
                raise ConfigError(f"searcher class {self.searcher.__name__} is not an EvoTorch SearchAlgorithm")
        elif not callable(self.searcher):
            raise ConfigError(f"searcher must be a name ({', '.join(SEARCHERS.names())}), an EvoTorch "
                              f"SearchAlgorithm class or a factory, got {type(self.searcher).__name__}")
        if not isinstance(self.searcher_kwargs, dict) or not all(isinstance(k, str) for k in self.searcher_kwargs):
            raise ConfigError("searcher_kwargs must be a dict with string keys")
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("unit", self.unit, UNITS)
        _check_choice("noise", self.noise, ("absolute", "relative"))
        _check_choice("order", self.order, ("last-first", "first-last"))
        _check_int("passes", self.passes, 0, 10_000)
        _check_int("cycles", self.cycles, 1, 1_000_000)
        _check_int("population", self.population, 1, 100_000)
        _check_int("samples", self.samples, 1, 100_000)
        _check_int("infonce_batch", self.infonce_batch, 2, 1_000_000)
        _check_int("max_batch", self.max_batch, 1, 1 << 30)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.popsize is not None:
            _check_int("popsize", self.popsize, 2, 100_000)
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"eps must be positive, got {self.eps!r}")
        _check_choice("holdout_metric", self.holdout_metric, ("kl", "agreement", "loss"))
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


BUDGET_KINDS = ("avg-bits", "size-mb", "latency-ms")
TABLE_METHODS = ("auto", "gptq", "rtn")


def parse_budget(text) -> tuple[str, float]:
    """``"avg-bits=3.3"`` / ``"size-mb=2.7"`` / ``"latency-ms=12"`` -> (kind, value)."""
    if isinstance(text, tuple) and len(text) == 2:
        kind, value = text
    else:
        kind, sep, value = str(text).partition("=")
        if not sep:
            raise ConfigError(f"a budget is KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}, got {text!r}")
    kind = kind.strip()
    _check_choice("budget kind", kind, BUDGET_KINDS)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"the {kind} budget must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"the {kind} budget must be positive, got {value!r}")
    return kind, v


@dataclass
class AllocationConfig:
    """Per-layer bit allocation (``evolq.allocate_bits``, ``evolq allocate``): which widths a layer
    may take, under what budget, searched how.

    ``menu``: the options, e.g. ``"2,3,4,8"`` (widths 2..8 per output channel, ``BITSgGROUP`` such as
    ``3g64`` for group-wise weights, optionally ``float``). ``budget``:
    ``"avg-bits=3.3"`` (parameter-weighted mean weight bits, a grouped option's extra scales counted:
    ``SizeModel.bits_table``), ``"size-mb=2.7"`` (the packed size, scales included,
    ``evolq.problems.menu.SizeModel``) or ``"latency-ms=12"`` (a per-layer latency table measured
    in the deploy runtime, ``evolq.allocation.latency``: the deploy regime only, ``"float"`` on the
    menu, timed at ``latency_batch`` images and ``latency_threads`` threads). ``searcher``: a
    registered allocation searcher (``evolq.search.allocators``: nsga2, ilp, greedy, random) or an
    EvoTorch ``SearchAlgorithm`` class. ``evaluations``: the fitness evaluations the search may spend, the sensitivity
    measurement included. The fitness is the ``loss`` (KL to the float logits by default) on
    ``fitness_images`` calibration images; ``holdout`` of the calibration images is kept out of
    everything (calibration, tables, fitness) and chooses the allocation among the ``select``
    best front points under the budget. ``tables``: how each layer is quantized at each width for
    the fitness (``"gptq"``, ``"rtn"``; ``"auto"``: rtn for the rtn start, gptq otherwise). The
    front spans ``[front * budget, budget]``: below it, the cost no longer counts as better.
    ``actors``/``ray_address``: the fitness on Ray actors, as ``SearchConfig``'s (docs/scale-out.md);
    the result is the same.
    """

    menu: str = "2,3,4,8"
    budget: str = "avg-bits=3.3"
    searcher: object = "nsga2"
    searcher_kwargs: dict = field(default_factory=dict)
    evaluations: int = 500
    popsize: int = 24
    fitness_images: int = 64
    holdout: float = 0.2
    loss: str = "kl"
    tables: str = "auto"
    sensitivity: str = "max"  # reference of the single-layer sensitivities: "max" (HAWQ/ModelOpt) or "budget"
    front: float = 0.95  # chosen on the hold-out KL (calibration pool): 0.95 < 1.0 < 0.85 < ilp, benchmarks dev
    select: int = 6
    chunk: int = 32
    cache_mb: float = 1024.0
    latency_batch: int = 1  # images per call the latency-ms table is timed at
    latency_threads: int = 2  # threads inductor compiles for and the table is timed with
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    actors: int | str = 0  # Ray actors computing the fitness: 0 (in-process), N, "max" or "num_gpus"
    ray_address: str | None = None  # None: a local Ray (the machine's cores); "auto" or HOST:PORT: join a cluster

    def __post_init__(self):
        self.validate()

    def validate(self):
        from .losses import LOSSES
        from .problems.menu import parse_menu
        from .scaleout import check_actors

        menu = parse_menu(self.menu)
        kind, _ = parse_budget(self.budget)
        if kind == "latency-ms" and "float" not in menu.options:
            raise ConfigError(f"a latency-ms budget needs \"float\" on the menu (e.g. {menu.label()},float): every "
                              f"integer width runs the same int8 kernels, so without it all allocations take the same "
                              f"time")
        if kind == "latency-ms" and menu.grouped:
            raise ConfigError(f"a latency-ms budget cannot time the grouped menu options {','.join(menu.grouped)}: the "
                              f"deploy runtime runs per-channel int8 weights only; use size-mb or avg-bits")
        _check_int("latency_batch", self.latency_batch, 1, 4096)
        _check_int("latency_threads", self.latency_threads, 1, 1024)
        if isinstance(self.searcher, str):
            from .search.allocators import ALLOCATORS

            _check_choice("allocation searcher", self.searcher, ALLOCATORS.names())
        elif not isinstance(self.searcher, type):
            raise ConfigError(f"searcher must be an allocation searcher's name or an EvoTorch SearchAlgorithm "
                              f"class, got {type(self.searcher).__name__}")
        if not isinstance(self.searcher_kwargs, dict) or not all(isinstance(k, str) for k in self.searcher_kwargs):
            raise ConfigError("searcher_kwargs must be a dict with string keys")
        _check_int("evaluations", self.evaluations, 1, 10_000_000)
        _check_int("popsize", self.popsize, 2, 100_000)
        _check_int("fitness_images", self.fitness_images, 1, 10_000_000)
        _check_int("select", self.select, 1, 100_000)
        _check_int("chunk", self.chunk, 1, 1 << 20)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_choice("loss", self.loss, LOSSES.names())
        _check_choice("tables", self.tables, TABLE_METHODS)
        _check_choice("sensitivity", self.sensitivity, ("max", "budget"))
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if isinstance(self.front, bool) or not isinstance(self.front, (int, float)) or not 0.0 <= self.front <= 1.0:
            raise ConfigError(f"front must be a fraction in [0, 1], got {self.front!r}")
        if isinstance(self.cache_mb, bool) or not isinstance(self.cache_mb, (int, float)) or self.cache_mb < 0:
            raise ConfigError(f"cache_mb must be a non-negative number, got {self.cache_mb!r}")
        check_actors(self.actors, self.ray_address)

    @property
    def menu_options(self):
        from .problems.menu import parse_menu

        return parse_menu(self.menu)

    @property
    def budget_kind(self) -> tuple[str, float]:
        return parse_budget(self.budget)

    def table_method(self, start: str) -> str:
        return ("rtn" if start == "rtn" else "gptq") if self.tables == "auto" else self.tables

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(self.searcher, str):
            d["searcher"] = getattr(self.searcher, "__name__", "custom")
        return d
