"""The hold-out rule: split before calibration, disjoint sets, a criterion defined on
small hold-outs, a warning below the minimum size, and an exact rollback."""
from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import faultkit as fk  # noqa: E402

from evolq import DataError, QuantConfig, prepare_model, quantize_model  # noqa: E402
from evolq.data import split_calibration  # noqa: E402
from evolq.holdout import MIN_HOLDOUT, HoldOut, HoldoutWarning  # noqa: E402
from evolq.losses import infonce  # noqa: E402
from evolq.qnn.calibrate import sample_digests  # noqa: E402


def scales(qm):
    return {n: q.scale.clone() for n, q in qm.quantizers().items() if hasattr(q, "scale")}


def test_split_is_disjoint_and_covers_the_data():
    x = fk.images(40)
    fit, hold = split_calibration(x, 0.25, seed=3)
    assert (fit.shape[0], hold.shape[0]) == (30, 10)
    fd, hd = sample_digests(fit), sample_digests(hold)
    assert not fd & hd and fd | hd == sample_digests(x)


def test_the_holdout_never_reaches_calibration_statistics():
    x = fk.images(40)
    config = fk.small_config(holdout=0.25, passes=0)
    qm, rep = quantize_model(fk.tiny_vit(), x, config)
    fit, hold = split_calibration(x, 0.25, config.search.seed)
    assert rep["calibration"]["holdout_samples"] == 10
    on_fit = prepare_model(fk.tiny_vit(), fit, config.quant)
    on_all = prepare_model(fk.tiny_vit(), x, config.quant)
    assert fk.same_tensors(scales(qm), scales(on_fit))  # calibrated on the fitness part only
    assert not fk.same_tensors(scales(qm), scales(on_all))  # (the hold-out would have changed them)
    assert not qm.calibration_digests & sample_digests(hold)


def test_a_qmodel_calibrated_on_the_holdout_is_refused():
    x = fk.images(40)
    qm = prepare_model(fk.tiny_vit(), x, QuantConfig(w_bits=4))
    with pytest.raises(DataError, match="calibrated on images that the search holds out"):
        quantize_model(qm, x, fk.small_config(holdout=0.25))
    fit, _ = split_calibration(x, 0.25, 0)
    ok = prepare_model(fk.tiny_vit(), fit, QuantConfig(w_bits=4))
    quantize_model(ok, x, fk.small_config(holdout=0.25, passes=1))  # the fitness part only: accepted


def test_kl_criterion_is_defined_on_one_image_where_infonce_is_not():
    qm = prepare_model(fk.tiny_vit(), fk.images(16), QuantConfig(w_bits=3))
    one = fk.images(1, seed=5)
    with pytest.warns(HoldoutWarning, match="fewer than"):
        h = HoldOut(qm, one, lambda o, r: infonce(o, r, batch_size=8), max_batch=32, metric="kl")
    assert h.score() > 0  # the quantized model differs from the float one: KL sees it
    h.metric = "loss"
    assert h.score() == 0.0  # infoNCE of a single image: always 0, it cannot decide
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HoldOut(qm, fk.images(MIN_HOLDOUT, seed=6), None, max_batch=32)  # at the minimum: no warning


class AlwaysRevert:
    """A subscriber that replaces the hold-out rule by one that reverts every pass."""

    def subscribe(self, engine):
        engine.holdout.keep = lambda before, after: False
        self.engine = engine
        self.pre_pass = []
        engine.run_start_hook.append(lambda state: self.pre_pass.append(engine.all_space.vector()))


def test_a_forced_rollback_restores_the_pre_pass_scales_exactly():
    x = fk.images(32)
    qm0 = prepare_model(fk.tiny_vit(), split_calibration(x, 0.25, 0)[0], QuantConfig(w_bits=4))
    before = scales(qm0)
    revert = AlwaysRevert()
    qm, rep = quantize_model(qm0, x, fk.small_config(holdout=0.25, passes=2, eps=0.01), subscribers=[revert])
    assert [p["kept"] for p in rep["passes"]] == [False, False]
    assert any(b["final_fitness"] < b["start_fitness"] for b in rep["blocks"])  # the passes did move scales
    assert fk.same_tensors(scales(qm), before)  # ... and every move was undone, bit for bit
    assert torch.equal(revert.engine.all_space.vector(), revert.pre_pass[0])


def test_the_holdout_is_scored_once_per_pass():
    calls = []

    def count(engine):
        real = engine.holdout.score
        engine.holdout.score = lambda: calls.append(1) or real()

    x = fk.images(32)
    qm, rep = quantize_model(fk.tiny_vit(), x, fk.small_config(holdout=0.25, passes=3, eps=0.01), subscribers=[count])
    assert len(calls) == 1 + 3  # the start, then the end of each pass; a pass's start reuses the last score
    for prev, cur in zip(rep["passes"], rep["passes"][1:]):
        assert cur["holdout_before"] == (prev["holdout_after"] if prev["kept"] else prev["holdout_before"])
