"""The options of the weight-rounding start points (``QuantConfig.start_options``):
plain dataclasses validated on construction, kept below ``config`` so that validating a
``QuantConfig`` imports no reconstruction code (``evolq.qnn.reconstruct`` runs them)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["GPTQOptions", "BRECQOptions", "OFQOptions", "OPTIONS", "start_options"]


def _on_gpu(device: str) -> bool:
    return str(device).startswith("cuda")


@dataclass
class GPTQOptions:
    """GPTQ (Frantar et al., 2023) settings.

    Args:
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ: 0.01);
            multiplied by 10 and retried (up to 4 times) when the Hessian is not positive definite.
        act_order: quantize columns in order of decreasing Hessian diagonal (GPTQ's "act-order").
        block_size: columns per lazy batch update (GPTQ: 128; the result does not depend on it
            beyond float rounding).
        batch_size: images per forward while collecting Hessians.
        device: where the Hessians are collected and the columns quantized.
    """

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp > 0):
            raise ConfigError(f"gptq damp must be a positive number, got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"gptq act_order must be true or false, got {self.act_order!r}")
        for name in ("block_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"gptq {name} must be a positive integer, got {v!r}")


@dataclass
class BRECQOptions:
    """BRECQ (Li et al., 2021) block reconstruction with AdaRound rounding, QDrop optional.

    ``None`` settings take a default by device. CPU: ``iters=200, batch_size=16, lr=1e-2``
    (ViT-Tiny, 14 blocks, with ``init="gptq"``: 13-15 minutes alone on 2 cores, ``benchmarks/suites/start_points.py``);
    GPU: ``iters=5000, batch_size=32, lr=3e-3``.
    BRECQ's paper runs 20000 iterations at lr 1e-3; with 25-100x fewer steps the
    rounding variables need a larger step to leave their round-to-nearest start before
    the regulariser freezes them (see ``docs/concepts.md``).

    Args:
        iters: Adam steps per block.
        batch_size: calibration samples per step (the calibration set must hold at least this many).
        lr: Adam learning rate of the AdaRound variables.
        act_lr: Adam learning rate of the activation steps (LSQ-style, per-tensor uniform
            activation quantizers inside the block); 0 keeps them fixed.
        qdrop: probability of dropping activation quantization per element (QDrop, 0.5);
            0 is plain BRECQ.
        reg_weight: weight of the rounding regulariser (BRECQ: 0.01).
        warmup: fraction of the iterations without the regulariser, before beta anneals.
        beta: (start, end) of the regulariser's annealed exponent (20 -> 2).
        seed: the reconstruction's seed (batches, QDrop masks); same seed, same result.
        init: what the rounding variables start from: ``"rtn"`` (round-to-nearest of the
            weights, AdaRound's initialisation) or ``"gptq"`` (GPTQ runs on each block first,
            with default ``GPTQOptions`` on ``device``, and AdaRound learns the rounding of its
            compensated weights).
        device: where blocks are reconstructed.
        progress: a tqdm bar per block.
    """

    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    act_lr: float = 4e-5
    qdrop: float = 0.5
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple = (20.0, 2.0)
    seed: int = 0
    init: str = "rtn"
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        gpu = _on_gpu(self.device)
        if self.iters is None:
            self.iters = 5000 if gpu else 200
        if self.batch_size is None:
            self.batch_size = 32 if gpu else 16
        if self.lr is None:
            self.lr = 3e-3 if gpu else 1e-2
        for name in ("iters", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"brecq {name} must be a positive integer, got {v!r}")
        for name in ("lr", "act_lr", "reg_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"brecq {name} must be a non-negative number, got {v!r}")
        if self.lr <= 0:
            raise ConfigError(f"brecq lr must be positive, got {self.lr!r}")
        for name in ("qdrop", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"brecq {name} must be a number in [0, 1), got {v!r}")
        b = tuple(self.beta) if isinstance(self.beta, (list, tuple)) else ()
        if len(b) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in b):
            raise ConfigError(f"brecq beta must be two positive numbers (start, end), got {self.beta!r}")
        self.beta = (float(b[0]), float(b[1]))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"brecq seed must be a non-negative integer, got {self.seed!r}")
        if self.init not in ("rtn", "gptq"):
            raise ConfigError(f"brecq init must be 'rtn' or 'gptq', got {self.init!r}")


@dataclass
class OFQOptions:
    """The ``ofq`` start: a short end-to-end fine-tune of the quantized weights by distillation
    to the float model's logits, with OFQ's parts (Liu et al., ICML 2023) as switches.

    OFQ trains 300 epochs on ImageNet; here the budget is the calibration images on 2 CPU
    cores. The defaults (12 epochs, lr 2e-5, DeiT-style mixed views, the block-output term at
    weight 1, StatsQ off, CGA on for the last epoch, GPTQ init, QKR with the q bias's exact term
    where the model has q and k) had the lowest KL on
    calibration-pool dev images at ViT-Tiny W3A8 (``python -m benchmarks ofq_start --mode dev``;
    ``docs/concepts.md``): at lr 1e-4 the fine-tune overfits the few hundred images (dev KL
    above GPTQ's); with flips alone 6 epochs at 2e-5 beat 3 but the train KL falls to 0.15
    against a dev KL of 1.06; mixed views and the block-output term each lower the dev KL,
    together more, and with them the train KL stays near the dev KL, so 12 epochs beat 6; 24
    epochs lowered the dev KL less (0.954 to 0.913, twice the time) than QKR with the exact
    q-bias term at 12 (0.788).
    StatsQ's start at 3 bits is far worse than the calibrated grid in the outlier-aware regime
    and three epochs do not recover it.

    What is trained is a per-weight change ``D`` of every quantized Linear/Conv weight, in its
    weight quantizer's input space (the float layer keeps its weights, so the
    float model stays the reference of the search, the hold-out and the evaluation); it ends
    up as the quantizer's ``weight_delta``, as GPTQ's compensation does. LayerNorm affines,
    biases are not trained; activation scales only with ``act_lr`` (by default the search owns
    them).

    Args:
        epochs: passes over the fitness images (1..1000).
        batch_size: images per step (the fitness set must hold at least this many).
        lr: AdamW learning rate of the weight changes (absolute weight units; (0, 1]).
        weight_decay: AdamW decay of the changes, i.e. towards the start weights, not towards 0.
        schedule: ``"cosine"`` (to 0 over all steps, OFQ's) or ``"constant"``.
        augment: ``"flip"`` (random horizontal flips; the float model's logits of both views are
            computed once), ``"mix"`` (DeiT-style: a random resized crop per batch, flips, then
            mixup or cutmix with another image of the batch; every step's teacher outputs are
            computed from the mixed images: one more forward per step) or ``"none"``.
        block_weight: the loss is the KL to the float model's logits plus ``block_weight`` times
            the mean over blocks of each block output's squared error to the float model's,
            normalised per channel by the float output's variance (the blocks run one after
            another: more signal per image than the logits alone; the teacher then runs on
            every step). 0: the logits' KL alone.
        init: the start weights: ``"gptq"`` (GPTQ's compensated weights, default GPTQOptions)
            or ``"rtn"`` (the float weights).
        statsq: OFQ's StatsQ: every step, each weight row's scale is ``2 * mean|w| / 2^(b-1)`` of
            the current weights, on a grid of 2^b levels and none at zero; the last one is kept
            as the row's (searchable) scale. False: the calibrated scales stay fixed.
        cga: OFQ's confidence-guided annealing for the last ``cga_epochs`` epochs (never the
            first: a one-epoch run has no CGA phase): weights farther than ``cga_br`` (in steps)
            from a rounding threshold are frozen (restored after every step); only the
            near-threshold ones keep training.
        cga_epochs: length of the CGA phase (1..epochs).
        cga_br: CGA's confidence band, in units of the quantization step (OFQ: 0.005).
        qkr: OFQ's query-key reparameterization. ``"auto"`` (default): on for timm ViT/DeiT attention
            without q/k norms outside the deploy regime, off elsewhere; ``true``: on, and other
            families (and the deploy regime) are refused; ``false``: off. When on, at the start
            of the fine-tune every attention switches to one quantized ``W_q,h^T W_k,h`` per head
            (from the float weights; its weight quantizer, StatsQ's with ``statsq``, and the quantizer
            of ``u = x W_qk`` calibrated on the fitness images), trained as a change of that weight
            like the others (GPTQ init, CGA). The report's ``qkr`` gives the fitness KL before and
            after the switch and after the fine-tune, ``qkr_used`` whether it ran. The float model
            stays the original. The ONNX export writes the form; the deploy regime (and so the pt2
            export) never has it.
        qkr_bias: ``"exact"`` (default): the q bias's term ``b_q,h^T W_k,h x_j`` is W_qk's bias, so
            the QKR form equals the original attention in float (the terms of the query alone, from
            the k bias, cancel in softmax); ``"drop"``: OFQ's form, without the q and k biases, which
            changes the function (ViT-Tiny's float logits move by KL 5.9).
        act_lr: 0 (default): activation scales stay as calibrated. Above 0: the scales of the
            calibrated uniform activation quantizers train too (LSQ, Esser et al. 2020, on
            ``log s``, AdamW at this learning rate on the same schedule, no decay); PTF /
            channel-factor and log2 quantizers keep their calibration. The report's
            ``act_scales`` says how many trained and how far they moved. The search then starts
            from the trained scales. Off by default: on EfficientNet-Lite0 W4A4's calibration-pool
            dev split (the case where activations carry the error) 0.005 lowered the dev KL from
            0.280 to 0.264, but the dev top-1 fell from 82.0 to 77.0, the agreement from 86.0 to
            83.0, and the fitness KL did not move (0.146 both).
        keep: which weights the fine-tune ends with: ``"last"`` (default), the last epoch's, or
            ``"holdout"``, the epoch's (the GPTQ init counted as epoch 0) with the lowest KL on the
            hold-out images (``prepare_model(holdout=...)``: kept out of calibration and training; never
            the evaluation split); without hold-out images, the last. ``"last"`` stays the default:
            on ViT-Tiny W3A8 (3 seeds) the hold-out itself tells the kept and the last epoch apart by
            at most 0.008 KL (calibration data only; the evaluation split's figures in
            ``docs/results.md`` are reported, not used to decide).
        seed: order of the images and augmentation; same seed, same weights.
        device: where the fine-tune runs.
        progress: a tqdm bar with the loss.
    """

    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-5
    weight_decay: float = 0.0
    schedule: str = "cosine"
    augment: str = "mix"
    block_weight: float = 1.0
    init: str = "gptq"
    statsq: bool = False
    cga: bool = True
    cga_epochs: int = 1
    cga_br: float = 0.005
    qkr: bool | str = "auto"
    qkr_bias: str = "exact"
    act_lr: float = 0.0
    keep: str = "last"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if self.keep not in ("last", "holdout"):
            raise ConfigError(f"ofq keep must be 'last' or 'holdout', got {self.keep!r}")
        for name, lo, hi in (("epochs", 1, 1000), ("batch_size", 1, 4096), ("cga_epochs", 1, 1000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"ofq {name} must be an integer in {lo}..{hi}, got {v!r}")
        v = self.lr
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
            raise ConfigError(f"ofq lr must be a number in (0, 1], got {v!r}")
        v = self.weight_decay
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"ofq weight_decay must be a non-negative number, got {v!r}")
        v = self.act_lr
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ConfigError(f"ofq act_lr must be a number in [0, 1], got {v!r}")
        v = self.cga_br
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 0.5:
            raise ConfigError(f"ofq cga_br must be a number in (0, 0.5), got {v!r}")
        v = self.block_weight
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1000:
            raise ConfigError(f"ofq block_weight must be a number in [0, 1000], got {v!r}")
        for name, choices in (("schedule", ("cosine", "constant")), ("augment", ("flip", "mix", "none")),
                              ("init", ("rtn", "gptq")), ("qkr_bias", ("exact", "drop"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"ofq {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not (isinstance(self.qkr, bool) or self.qkr == "auto"):
            raise ConfigError(f"ofq qkr must be true, false or auto, got {self.qkr!r}")
        for name in ("statsq", "cga", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ofq {name} must be true or false, got {getattr(self, name)!r}")
        if self.cga and self.cga_epochs > self.epochs:
            raise ConfigError(f"ofq cga_epochs ({self.cga_epochs}) cannot exceed epochs ({self.epochs})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"ofq seed must be a non-negative integer, got {self.seed!r}")


OPTIONS = {"gptq": GPTQOptions, "brecq": BRECQOptions, "ofq": OFQOptions}


def start_options(start: str, options: dict | None):
    """The options object of ``start`` from a dict; ConfigError on unknown keys or bad values."""
    options = dict(options or {})
    if start not in OPTIONS:
        if options:
            raise ConfigError(f"start {start!r} takes no start_options (got {', '.join(sorted(options))})")
        return None
    cls = OPTIONS[start]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown {start} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**options)
