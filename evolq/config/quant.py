"""``QuantConfig``: the end-to-end fake-quantization regime of the start point (what to quantize,
how, and the start's rounding)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .checks import check_choice, check_int

__all__ = ["QuantConfig", "REGIMES", "DEPLOY_WEIGHTS", "DEPLOY_STRENGTH", "STARTS"]

REGIMES = ("fq-vit", "deploy", "weight-only")
DEPLOY_WEIGHTS = ("auto", "symmetric", "asymmetric")
DEPLOY_STRENGTH = {8: 1.0, 4: 0.8}  # w_bits -> smooth_strength (others, not measured: 0.5); QuantConfig.deploy_strength
STARTS = ("rtn", "gptq", "brecq", "ofq")


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

    ``regime="weight-only"`` (``QuantConfig.preset("weight-only")``, weight group 32 unless
    ``w_group`` says otherwise) is what onnxruntime's ``MatMulNBits`` runs
    (``evolq.quant.nbits``): every Linear's weights unsigned with an integer zero-point per group
    (or per output channel), at their bits and groups (3-bit codes in 4-bit containers), and its
    input quantized dynamically to int8 per row and per block of the weight's group
    (``accuracy_level=4``); nothing else is quantized, and convolutions keep float inputs (their
    weights quantized, dequantized at load; ``w_group`` groups only the Linears, convolutions stay
    per channel unless a ``layer_bits`` entry gives them a group). Groups must be MatMulNBits blocks (16, 32, 64, 128,
    256), ``a_bits`` 8; StatsQ's half-step grid has no integer zero-point and is refused.

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
        "weight-only": {"regime": "weight-only", "bias_correction": False, "w_group": 32},
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
        check_choice("preset", name, tuple(cls.PRESETS))
        fields = {**cls.PRESETS[name], **overrides}
        if name == "outlier-aware" and "linear_input_strength" not in overrides:
            w_bits = fields.get("w_bits", cls.w_bits)
            if isinstance(w_bits, int) and not isinstance(w_bits, bool):  # else validation reports it
                fields["linear_input_strength"] = cls.outlier_strength(w_bits, fields.get("start", cls.start))
        return cls(**fields)

    def __post_init__(self):
        self.validate()

    def validate(self):
        from ..quant import OBSERVERS, WEIGHT_ONLY_OBSERVERS

        check_int("w_bits", self.w_bits, 2, 8)
        check_int("a_bits", self.a_bits, 4, 8)
        check_choice("weight observer", self.weight_observer, tuple(OBSERVERS))
        check_choice("activation observer", self.act_observer,
                      tuple(o for o in OBSERVERS if o not in WEIGHT_ONLY_OBSERVERS))
        check_choice("attn_probs", self.attn_probs, ("uniform", "log2"))
        if self.attn_bits is not None:
            check_int("attn_bits", self.attn_bits, 2, 8)
        check_choice("ptf_zero_point", self.ptf_zero_point, ("shared", "channel"))
        check_int("ptf_max_alpha", self.ptf_max_alpha, 0, 8)
        check_choice("linear_input", self.linear_input, ("tensor", "channel"))
        st = self.linear_input_strength
        if isinstance(st, bool) or not isinstance(st, (int, float)) or not 0.0 <= st <= 1.0:
            raise ConfigError(f"linear_input_strength must be a number in [0, 1], got {st!r}")
        check_choice("start", self.start, STARTS)
        check_choice("regime", self.regime, REGIMES)
        ss = self.smooth_strength
        if ss is not None and (isinstance(ss, bool) or not isinstance(ss, (int, float)) or not 0.0 <= ss <= 1.0):
            raise ConfigError(f"smooth_strength must be a number in [0, 1] or None, got {ss!r}")
        check_choice("deploy_weights", self.deploy_weights, DEPLOY_WEIGHTS)
        if self.deploy_weights == "asymmetric" and not self.deploy:
            raise ConfigError(f"deploy_weights={self.deploy_weights!r} applies to the deploy regime; the "
                              f"{self.regime!r} regime's weights are asymmetric already")
        if self.edge_bits is not None:
            check_int("edge_bits", self.edge_bits, 2, 8)
        self._validate_rotation()
        if self.weight_only:
            self._validate_weight_only()
        from ..qnn.layer_bits import normalize_layer_bits

        normalize_layer_bits(self.layer_bits)  # types and ranges; names are checked against the model at wrap time
        from ..qnn.layer_bits import check_group

        check_group(self.w_group, "w_group")  # whether it divides each layer's input is checked at wrap time
        if not isinstance(self.start_options, dict):
            raise ConfigError(f"start_options must be a dict, got {type(self.start_options).__name__}")
        if self.start_options:
            from ..start_options import start_options

            start_options(self.start, self.start_options)  # raises ConfigError on unknown or bad values
            if self.deploy and self.start == "ofq" and self.start_options.get("qkr") is True:
                raise ConfigError("ofq qkr (query-key reparameterization) quantizes the attention's q.k product, "
                                  "which the deploy regime keeps in float: use the fq-vit or outlier-aware regime, "
                                  "or qkr=false")

    def _validate_rotation(self):
        from ..qnn.rotate import ROTATIONS

        check_choice("rotation", self.rotation, ROTATIONS)
        check_int("rotation_seed", self.rotation_seed, 0, 2**63 - 1)
        if not isinstance(self.rotation_mlp, bool):
            raise ConfigError(f"rotation_mlp must be true or false, got {self.rotation_mlp!r}")
        if self.rotation_mlp and self.rotation == "none":
            raise ConfigError("rotation_mlp rotates the MLP hidden on top of a rotation: set rotation to hadamard "
                              "or random")

    def _validate_weight_only(self):
        from ..qnn.layer_bits import normalize_layer_bits
        from ..quant.nbits import nbits_group_error

        if self.a_bits != 8:
            raise ConfigError(f"the weight-only regime's layer inputs are dynamic int8 (MatMulNBits, "
                              f"accuracy_level 4): "
                              f"a_bits must be 8, got {self.a_bits}")
        why = nbits_group_error(self.w_group)
        if why is not None:
            raise ConfigError(f"w_group={self.w_group} in the weight-only regime: {why}")
        for pattern, entry in normalize_layer_bits(self.layer_bits).items():
            if isinstance(entry, dict):
                if "a_bits" in entry:
                    raise ConfigError(f"layer_bits[{pattern!r}] sets a_bits, but the weight-only regime's inputs are "
                                      f"dynamic int8")
                why = nbits_group_error(entry.get("group"))
                if why is not None:
                    raise ConfigError(f"layer_bits[{pattern!r}] in the weight-only regime: {why}")
        statsq = self.weight_observer == "statsq" or (self.start == "ofq" and self.start_options.get("statsq") is True)
        if statsq:
            raise ConfigError("StatsQ's half-step grid has no integer zero-point, which MatMulNBits stores: use "
                              "another weight observer (minmax) in the weight-only regime")
        if self.start == "ofq" and self.start_options.get("qkr") is True:
            raise ConfigError("ofq qkr quantizes the attention's q.k product, which the weight-only regime keeps in "
                              "float: qkr=false")

    @property
    def deploy(self) -> bool:
        return self.regime == "deploy"

    @property
    def weight_only(self) -> bool:
        return self.regime == "weight-only"

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
