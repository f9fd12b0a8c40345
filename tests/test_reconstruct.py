"""Reconstruction start points (issue 11): GPTQ and BRECQ/QDrop under the Evol-Q search,
and the per-layer search unit. Tiny random models; behaviour, not accuracy."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

from evolq import EvolQConfig, QuantConfig, load_quantized, quantize_model, save_quantized  # noqa: E402
from evolq.api import prepare_model  # noqa: E402
from evolq.cli import main as cli_main  # noqa: E402
from evolq.config import SearchConfig  # noqa: E402
from evolq.engine import SearchEngine  # noqa: E402
from evolq.errors import ConfigError, DataError  # noqa: E402
from evolq.fitness import reference_outputs  # noqa: E402
from evolq.qnn.layers import QLinear  # noqa: E402
from evolq.qnn.reconstruct import GPTQOptions, block_layers  # noqa: E402
from evolq.qnn.reconstruct import brecq as brecq_mod  # noqa: E402
from evolq.qnn.reconstruct.common import folded_weight  # noqa: E402
from evolq.qnn.reconstruct.gptq import collect_hessian, gptq_layer, gptq_quantize  # noqa: E402
from evolq.quant import ChannelFactorQuantizer, UniformQuantizer  # noqa: E402
from evolq.quant.range import fake_quant_axis  # noqa: E402

VIT_KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()


def imgs(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


BRECQ_FAST = {"iters": 30, "batch_size": 8, "progress": False}


def correlated(n, d, seed=0):
    """Samples with correlated features; ``seed`` draws the samples, the mixing is fixed."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234)) / d ** 0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)


def qlinear(bits=3, signed=False, symmetric=False, per_channel=True, input_quant=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(32, 16)
    wq = UniformQuantizer(bits, signed=signed, symmetric=symmetric, per_channel=per_channel, kind="weight")
    layer = QLinear(lin, wq, input_quant)
    wq.calibrate_from(lin.weight.detach())
    return layer


def out_mse(layer, x):
    with torch.no_grad():
        return float(F.mse_loss(layer(x), F.linear(x, layer.weight, layer.bias)))


# --------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("grid", [(False, False, True), (True, True, True), (False, False, False)],
                         ids=["uint-asym-channel", "int-sym-channel", "uint-asym-tensor"])
def test_gptq_single_linear_beats_rtn_and_is_on_grid(grid):
    signed, symmetric, per_channel = grid
    layer = qlinear(signed=signed, symmetric=symmetric, per_channel=per_channel)
    x, x_test = correlated(512, 32), correlated(256, 32, seed=1)
    rtn_mse = out_mse(layer, x_test)
    rtn_w = layer.weight_quant(layer.weight).detach().clone()
    h, rows = collect_hessian(layer, layer, x, 128)
    rec = gptq_layer(layer, h, rows, GPTQOptions(), "lin")
    assert rec["method"] == "gptq" and rec["output_error_gptq"] < rec["output_error_rtn"]
    assert out_mse(layer, x_test) < 0.8 * rtn_mse  # held-out inputs of the same distribution
    q = layer.weight_quant
    delta = q.weight_delta
    gq = q(layer.weight)
    assert not torch.equal(gq, rtn_w)
    # round-to-nearest at the same scale of the stored compensated weights is GPTQ's choice
    axis = 0 if q.scale.numel() > 1 else None
    rtn_of_comp = fake_quant_axis(layer.weight.detach() + delta, q.scale, q.zero_point, q.qmin, q.qmax, axis)
    assert torch.equal(rtn_of_comp, gq)
    # the float layer keeps its weights: the float reference is unchanged
    q.enabled = False
    assert out_mse(layer, x) == 0.0


def test_gptq_quantize_matches_its_own_rounding_and_act_order_is_a_permutation():
    torch.manual_seed(0)
    w = torch.randn(2, 8, 24)
    x = correlated(200, 24)
    h = (2 * x.T @ x / 200).double().expand(2, 24, 24).clone()
    scale = w.abs().amax(2) / 3
    zp = torch.zeros(2, 8)
    for act_order in (False, True):
        qw, comp = gptq_quantize(w, h, scale, zp, -4, 3, act_order=act_order, block_size=5)
        again = torch.clamp(torch.round(comp * torch.reciprocal(scale)[..., None]), -4, 3) * scale[..., None]
        assert torch.equal(again, qw)


def test_gptq_folded_input_factors():
    iq = ChannelFactorQuantizer(8, observer="minmax", strength=1.0)
    layer = qlinear(input_quant=iq)
    x = correlated(512, 32) * torch.linspace(0.2, 5, 32)
    iq.calibrating = True
    layer(x)
    iq.calibrating = False
    iq.finalize()
    layer.after_calibration()
    rtn_mse = out_mse(layer, x)
    h, rows = collect_hessian(layer, layer, x, 128)
    rec = gptq_layer(layer, h, rows, GPTQOptions(), "lin")
    assert rec["method"] == "gptq"
    assert out_mse(layer, x) < rtn_mse
    q, f = layer.weight_quant, iq.factor
    wf = layer.weight.detach() * f  # the quantizer quantizes W * factor; delta lives there
    assert q.weight_delta.shape == wf.shape
    assert torch.equal(fake_quant_axis(wf + q.weight_delta, q.scale, q.zero_point, q.qmin, q.qmax, 0), q(wf))


def test_gptq_start_on_model_lowers_output_error_and_reports():
    x, xt = imgs(24), imgs(16, seed=7)
    errs = {}
    for start in ("rtn", "gptq"):
        qm = prepare_model(tiny_vit(), x, QuantConfig(w_bits=3, start=start))
        with torch.no_grad():
            errs[start] = float(F.mse_loss(qm.model(xt), reference_outputs(qm, xt)))
    assert errs["gptq"] < errs["rtn"]
    rep = qm.start_report
    assert rep["start"] == "gptq" and len(rep["blocks"]) == 4  # stem, 2 blocks, head
    layers = [r for b in rep["blocks"] for r in b["layers"]]
    assert {r["method"] for r in layers} <= {"gptq", "rtn"}
    assert any(r["method"] == "gptq" for r in layers)
    # the head sees one row per image: 24 rows for 48 columns is too few, recorded as a fallback
    assert any(f.startswith("head") and "too few" in f for f in rep["fallbacks"])


# --------------------------------------------------------------------------- BRECQ
def _brecq(seed=0, x=None, **opts):
    x = imgs(24) if x is None else x
    q = QuantConfig(w_bits=3, a_bits=8, start="brecq", start_options={**BRECQ_FAST, "seed": seed, **opts})
    return prepare_model(tiny_vit(), x, q)


def _buffers(qm):
    return {f"{n}.{b}": t.clone() for n, q in qm.quantizers().items() for b, t in q.named_buffers(recurse=False)}


def test_brecq_lowers_block_error_and_stores_offsets():
    x = imgs(24)
    qm = _brecq(x=x)
    rep = qm.start_report
    ok = [b for b in rep["blocks"] if b["status"] == "ok"]
    assert ok and all(b["error_end"] < b["error_start"] for b in ok)
    assert all(b["error_end"] <= b["error_start"] for b in rep["blocks"])
    offs = [q.round_offset for q in qm.quantizers().values() if "round_offset" in q._buffers]
    assert offs and all(bool(((o == 0) | (o == 1)).all()) for o in offs)
    rtn = prepare_model(tiny_vit(), x, QuantConfig(w_bits=3, a_bits=8))
    with torch.no_grad():
        assert float(F.mse_loss(qm.model(x), reference_outputs(qm, x))) < float(F.mse_loss(rtn.model(x),
                                                                                        reference_outputs(rtn, x)))


def test_rounding_offsets_survive_a_scale_change_and_population_mode():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    q = UniformQuantizer(3, per_channel=True, kind="weight")
    q.calibrate_from(w)
    h = (torch.rand(6, 10) < 0.5).float()
    q.set_rounding(offset=h)
    for factor in (1.0, 1.07, 0.9):
        q.scale = q.scale * factor if factor != 1.0 else q.scale
        s, z = q.scale[:, None], q.zero_point[:, None]
        want = torch.clamp(torch.floor(w * torch.reciprocal(s)) + h, q.qmin - z, q.qmax - z) * s
        assert torch.equal(q(w), want)
    pop = torch.stack([q.scale, q.scale * 1.1, q.scale * 0.95])
    q.pop_scale = pop
    out = q(w)
    q.pop_scale = None
    for p in range(3):
        q.scale = pop[p].clone()
        assert torch.allclose(out[p], q(w), atol=0, rtol=1e-6)
    q.set_rounding()  # removed: plain round-to-nearest again
    assert "round_offset" not in q._buffers


def test_brecq_is_deterministic_for_a_seed():
    a, b, c = _buffers(_brecq(seed=3)), _buffers(_brecq(seed=3)), _buffers(_brecq(seed=4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k in c)


def test_brecq_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    x = imgs(24)
    q = QuantConfig(w_bits=3, a_bits=8, start="brecq", start_options=BRECQ_FAST)
    whole = _buffers(prepare_model(tiny_vit(), x, q))
    orig, calls = brecq_mod.brecq_block, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(*a, **k)

    import evolq.qnn.reconstruct.blocks as rc  # the block loop of the gptq and brecq starts

    monkeypatch.setattr(rc, "brecq_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(tiny_vit(), x, q, checkpoint_dir=tmp_path)
    monkeypatch.setattr(rc, "brecq_block", orig)
    assert (tmp_path / "start.safetensors").exists()
    with pytest.raises(Exception, match="start-point checkpoint"):  # not without resume
        prepare_model(tiny_vit(), x, q, checkpoint_dir=tmp_path)
    qm = prepare_model(tiny_vit(), x, q, checkpoint_dir=tmp_path, resume=True)
    assert [b["block"] for b in qm.start_report["blocks"]] == ["stem", "blocks.0", "blocks.1", "head"]
    resumed = _buffers(qm)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_brecq_nan_keeps_the_blocks_start_and_says_so():
    x = imgs(16)
    qm = prepare_model(tiny_vit(), x, QuantConfig(w_bits=3))
    i = 1
    layers = block_layers(qm, qm.blocks[i])
    x_in = qm.blocks[0].run(x).detach()
    before = qm.model(x).detach()
    y = torch.full_like(x_in, float("nan"))
    from evolq.qnn.reconstruct.common import BRECQOptions

    rec = brecq_mod.brecq_block(qm, i, x_in, x_in, y, BRECQOptions(**BRECQ_FAST), layers)
    assert rec["status"].startswith("non-finite")
    assert not any("round_offset" in q._buffers for q in qm.blocks[i].quantizers.values())
    assert torch.equal(qm.model(x), before)


def _weights(qm):
    with torch.no_grad():
        return {n: layer.weight_quant(folded_weight(layer)[0]) for b in qm.blocks for n, layer in block_layers(qm, b)}


def test_brecq_init_gptq_learns_the_rounding_of_gptqs_weights():
    x = imgs(24)
    gptq = prepare_model(tiny_vit(), x, QuantConfig(w_bits=3, a_bits=8, start="gptq"))
    # rounding variables that cannot move: AdaRound's start reproduces GPTQ's weights
    still = _brecq(x=x, init="gptq", lr=1e-12, act_lr=0.0, reg_weight=0.0)
    wg, ws = _weights(gptq), _weights(still)
    assert wg.keys() == ws.keys()
    for k in wg:
        assert float((wg[k] != ws[k]).float().mean()) < 1e-3, k
    # a real reconstruction keeps GPTQ's compensation under the learned rounding, and starts from GPTQ's error
    qm = _brecq(x=x, init="gptq")
    both = [q for q in qm.quantizers().values() if {"weight_delta", "round_offset"} <= set(q._buffers)]
    assert both
    rep = qm.start_report
    assert any(b.get("gptq_layers") for b in rep["blocks"])
    plain = _brecq(x=x)
    starts = {b["block"]: b["error_start"] for b in plain.start_report["blocks"]}
    assert rep["blocks"][0]["error_start"] < starts[rep["blocks"][0]["block"]]
    assert all(b["error_end"] <= b["error_start"] for b in rep["blocks"])
    with pytest.raises(ConfigError, match="init"):
        QuantConfig(start="brecq", start_options={"init": "adaround"})


def test_brecq_then_evolq_and_save_load_round_trip(tmp_path):
    x = imgs(40)
    quant = QuantConfig(w_bits=3, start="brecq", start_options=BRECQ_FAST)
    cfg = EvolQConfig(quant, SearchConfig(passes=1, cycles=2, infonce_batch=8, progress=False))
    qm, rep = quantize_model(tiny_vit(), x, cfg, arch="vit_tiny_patch16_224")
    assert rep["start"]["start"] == "brecq"
    save_quantized(qm, tmp_path / "m", model_kwargs=VIT_KW)
    back = load_quantized(tmp_path / "m")
    assert torch.equal(back.model(x[:4]), qm.model(x[:4]))


# --------------------------------------------------------------------------- bad input
def test_bad_start_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="start"):
        QuantConfig(start="adaquant")
    with pytest.raises(ConfigError, match="unknown brecq option"):
        QuantConfig(start="brecq", start_options={"iterations": 5})
    with pytest.raises(ConfigError, match="takes no start_options"):
        QuantConfig(start_options={"iters": 5})
    with pytest.raises(ConfigError, match="qdrop"):
        QuantConfig(start="brecq", start_options={"qdrop": 1.5})
    with pytest.raises(DataError, match="reconstruction batch"):
        prepare_model(tiny_vit(), imgs(4), QuantConfig(start="brecq", start_options={"batch_size": 8}))
    with pytest.raises(DataError, match="at least 2"):
        prepare_model(tiny_vit(), imgs(1), QuantConfig(start="gptq"))
    w, scale, zp = torch.randn(1, 4, 6), torch.ones(1, 4), torch.zeros(1, 4)
    with pytest.raises(DataError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(6, dtype=torch.float64)[None], scale, zp, -4, 3)
    with pytest.raises(DataError, match="not finite"):
        gptq_quantize(w, torch.full((1, 6, 6), float("nan"), dtype=torch.float64), scale, zp, -4, 3)


def test_cli_start_errors_are_one_line(capsys):
    with pytest.raises(SystemExit):
        cli_main(["eval", "--model", "vit_tiny_patch16_224", "--start", "bogus"])
    rc = cli_main(["eval", "--model", "vit_tiny_patch16_224", "--start", "brecq", "--start-arg", "iterz=3"])
    assert rc == 2 and "unknown brecq option" in capsys.readouterr().err
    rc = cli_main(["eval", "--model", "vit_tiny_patch16_224", "--start", "brecq", "--start-arg", "init=adaround"])
    assert rc == 2 and "brecq init must be 'rtn' or 'gptq'" in capsys.readouterr().err


def test_rtn_start_is_unchanged():
    x = imgs(16)
    a = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4))
    b = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4, start="rtn"))
    assert a.start_report is None and set(a.model.state_dict()) == set(b.model.state_dict())
    assert not any(k.endswith(("round_offset", "weight_delta")) for k in a.model.state_dict())
    assert all(q.bias_correction for q in a.quantizers().values() if getattr(q, "kind", "") == "weight")
    assert torch.equal(a.model(x), b.model(x))
    g = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4, start="gptq"))
    assert not any(q.bias_correction for q in g.quantizers().values() if getattr(q, "kind", "") == "weight")


# --------------------------------------------------------------------------- unit="layer"
def test_unit_layer_one_search_unit_per_layer():
    from evolq.adapters import wrap_model
    from evolq.qnn.calibrate import calibrate

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qm = wrap_model(copy.deepcopy(model), QuantConfig(w_bits=4), "efficientnet")
    calibrate(qm, x)
    n_layers = sum(len(b.searched("attn-weights")) for b in qm.blocks)
    s = SearchConfig(unit="layer", passes=1, cycles=1, population=2, samples=1, infonce_batch=8, progress=False)
    eng = SearchEngine(qm, x, x[:0], s, 4)
    assert len(eng.order) == n_layers == sum(1 for b in qm.blocks for _ in block_layers(qm, b))
    assert all(len(eng.spaces[k].quantizers) == 1 for k in eng.order)
    first = [eng.unit_names[k] for k in eng.order][:2]
    assert first == ["classifier", "conv_head"]  # last-first, layer by layer
    state = eng.run()
    assert len(state["blocks"]) == n_layers and all("unit" in r for r in state["blocks"])
    blk = SearchEngine(qm, x, x[:0], SearchConfig(passes=1, cycles=1, infonce_batch=8, progress=False), 4)
    assert len(blk.order) == sum(1 for b in qm.blocks if b.searched("attn-weights"))
    with pytest.raises(ConfigError, match="unit"):
        SearchConfig(unit="channel")


@pytest.mark.parametrize("groups", [1, 4])
def test_pointwise_conv_rows_equal_unfold(groups):
    """GPTQ's rows of a 1x1 convolution (the fast path, no im2col) are unfold's, bit for bit."""
    from evolq.qnn.layers import QConv2d
    from evolq.qnn.reconstruct.gptq import layer_rows

    layer = QConv2d(nn.Conv2d(16, 8, 1, groups=groups), UniformQuantizer(8, kind="weight"), None)
    x = torch.randn(3, 16, 5, 7, generator=torch.Generator().manual_seed(0))
    cols = F.unfold(x, (1, 1))
    n, _, length = cols.shape
    ref = cols.reshape(n, groups, -1, length).permute(0, 3, 1, 2).reshape(n * length, groups, -1)
    assert torch.equal(layer_rows(layer, x), ref)
