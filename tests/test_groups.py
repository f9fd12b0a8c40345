"""Group-wise weights (issue 36): one grid per group of input columns through the observers, every
start, saving and loading, the scale search, the size model and the allocation menu; the bad inputs
are one-line errors. Random tiny models: mechanics, not accuracy."""
from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from test_allocation import tiny_vit  # noqa: E402  (tests/test_allocation.py)

from evolq import (  # noqa: E402
    ConfigError,
    EvolQConfig,
    QuantConfig,
    allocate_bits,
    load_quantized,
    prepare_model,
    quantize_model,
    save_quantized,
)
from evolq.config import AllocationConfig  # noqa: E402
from evolq.errors import ExportError  # noqa: E402
from evolq.problems.menu import SizeModel, model_bytes, parse_menu  # noqa: E402
from evolq.qnn.layer_bits import layer_bits_summary, layer_columns, quantized_layers  # noqa: E402
from evolq.qnn.layers import QLinear  # noqa: E402
from evolq.qnn.reconstruct.common import folded_weight  # noqa: E402
from evolq.qnn.reconstruct.gptq import gptq_layer  # noqa: E402
from evolq.quant import UniformQuantizer  # noqa: E402
from evolq.start_options import GPTQOptions  # noqa: E402

# tiny_vit (tests/test_allocation.py): input columns patch embedding 192, qkv/proj/fc1/head 48, fc2 192


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def calibrated(w, bits, group, observer="minmax"):
    q = UniformQuantizer(bits, per_channel=True, kind="weight", observer=observer)
    q.set_group(group)
    q.calibrate_from(w)
    return q


def assert_on_group_grids(layer):
    """The layer's quantized weight lies on its own grid in every group: integers (ints - z) * s with
    ints in [qmin, qmax], s and z one per (row, group)."""
    wq = layer.weight_quant
    w, _ = folded_weight(layer)
    cols = layer_columns(layer)
    assert wq.group is not None and tuple(wq.scale.shape) == (w.shape[0], cols // wq.group)
    with torch.no_grad():
        out = wq(w)
    s, z = wq.qparams_like(w)
    codes = out / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= wq.qmin and codes.round().max() <= wq.qmax
    assert bool((wq.scale != wq.scale[:, :1]).any())  # the groups of a row have grids of their own


# -- the quantizer and its observers --------------------------------------------------------
@pytest.mark.parametrize("observer", ["minmax", "percentile", "omse"])
def test_observers_fit_each_group_as_a_row_of_its_own(observer):
    w = torch.randn(6, 4, 2, 4, generator=torch.Generator().manual_seed(0))  # a conv: 32 columns
    w[0, 0] *= 20  # one group of the first row with a far larger range
    q = calibrated(w, 3, 8, observer)
    rows = calibrated(w.reshape(24, 8), 3, None, observer)  # every group of 8 columns as one channel
    assert q.scale.shape == (6, 4)
    assert torch.equal(q.scale.reshape(-1), rows.scale) and torch.equal(q.zero_point.reshape(-1), rows.zero_point)
    if observer == "minmax":
        v = w.reshape(6, 4, 8)
        want = (v.amax(-1).clamp(min=0) - v.amin(-1).clamp(max=0)) / 7
        assert torch.allclose(q.scale, want)
    per_channel = calibrated(w, 3, None, observer)
    err_g, err_c = (q(w) - w).pow(2).sum(), (per_channel(w) - w).pow(2).sum()
    assert err_g < err_c


def test_population_mode_quantizes_each_candidate_at_its_group_scales():
    w = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    q = calibrated(w, 3, 16)
    pop = torch.stack([q.scale.reshape(-1), q.scale.reshape(-1) * 1.3])
    q.pop_scale = pop
    both = q(w)
    q.pop_scale = None
    one = q(w)
    q.scale = (q.scale * 1.3).clone()
    assert torch.equal(both[0], one) and torch.equal(both[1], q(w))


def test_statsq_fits_each_group():
    w = torch.randn(4, 24, generator=torch.Generator().manual_seed(2))
    q = calibrated(w, 3, 8)
    q.fit_statsq(w)
    means = w.reshape(4, 3, 8).abs().mean(-1)
    assert torch.allclose(q.scale, 2 * means / 4) and torch.all(q.zero_point == 3.5)


# -- GPTQ -----------------------------------------------------------------------------------
def _gptq_case(group, act_order):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 64, generator=g) * torch.linspace(0.2, 3.0, 64))
    q = UniformQuantizer(3, per_channel=True, kind="weight")
    q.set_group(group)
    layer = QLinear(lin, q, None)
    q.calibrate_from(lin.weight.detach())
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3
    h = (2.0 * x.T.double() @ x.double() / x.shape[0])[None]
    start = q.scale.clone()
    rec = gptq_layer(layer, h, x.shape[0], GPTQOptions(act_order=act_order), "lin")
    return layer, rec, start, h


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_groups_lowers_the_hessian_weighted_error_at_the_same_bits(act_order):
    _, per_channel, _, _ = _gptq_case(None, act_order)
    layer, grouped, start, h = _gptq_case(16, act_order)
    assert per_channel["method"] == grouped["method"] == "gptq"
    assert grouped["output_error_gptq"] < per_channel["output_error_gptq"]
    q = layer.weight_quant
    w = layer.weight.detach()
    e = (q(w) - w).double()  # what the quantizer now computes is GPTQ's result
    assert float(torch.einsum("rd,de,re->", e, h[0], e)) == pytest.approx(grouped["output_error_gptq"], rel=1e-4)
    if act_order:  # static groups: the calibrated grids
        assert torch.equal(q.scale, start)
    else:  # each grid taken when GPTQ reaches its group: the first group's columns were not updated yet
        assert torch.equal(q.scale[:, 0], start[:, 0]) and not torch.equal(q.scale[:, 1:], start[:, 1:])


# -- every start ------------------------------------------------------------------------------
@pytest.mark.parametrize("start,opts", [("rtn", {}), ("gptq", {}), ("gptq", {"act_order": False}),
                                        ("brecq", {"iters": 8, "batch_size": 8}),
                                        ("ofq", {"epochs": 2, "batch_size": 8, "statsq": True})],
                         ids=["rtn", "gptq", "gptq-in-order", "brecq", "ofq-statsq"])
def test_every_start_holds_group_grids(start, opts):
    quant = QuantConfig(w_bits=3, w_group=16, start=start, start_options=opts, bias_correction=False)  # on the grid
    q = prepare_model(tiny_vit(), images(24), quant, progress=False)
    for layer in quantized_layers(q.model).values():
        assert_on_group_grids(layer)
    buf = {"gptq": "weight_delta", "brecq": "round_offset", "ofq": "weight_delta"}.get(start)
    if buf:
        assert buf in q.model.blocks[0].mlp.fc2.weight_quant._buffers
    ref = prepare_model(tiny_vit(), images(24), QuantConfig(w_bits=3, start=start, start_options=opts),
                        progress=False)
    with torch.no_grad():
        assert not torch.equal(q.model(images(2, 5)), ref.model(images(2, 5)))


def test_layer_bits_groups_and_save_load_round_trip(tmp_path):
    spec = {"blocks.*.mlp.fc2": "3g64", "head": {"w_bits": 4, "group": None}}
    quant = QuantConfig(w_bits=3, w_group=16, start="gptq", layer_bits=spec)
    q = prepare_model(tiny_vit(), images(24), quant, progress=False)
    held = layer_bits_summary(q.model)["layers"]
    assert held["blocks.0.mlp.fc2"]["group"] == 64 and held["head"]["group"] is None
    assert held["blocks.0.attn.qkv"]["group"] == 16 and q.model.head.weight_quant.scale.ndim == 1
    save_quantized(q, tmp_path / "m")
    back = load_quantized(tmp_path / "m", tiny_vit(seed=9))
    for name, layer in quantized_layers(back.model).items():
        mine = quantized_layers(q.model)[name].weight_quant
        assert layer.weight_quant.group == mine.group and torch.equal(layer.weight_quant.scale, mine.scale)
    with torch.no_grad():
        assert torch.equal(back.model(images(2, 5)), q.model(images(2, 5)))


def test_the_block_scale_search_moves_group_scales():
    quant = QuantConfig(w_bits=3, w_group=16, bias_correction=False)
    x = images(40)
    q = prepare_model(tiny_vit(), x, quant, progress=False)
    before = {n: layer.weight_quant.scale.clone() for n, layer in quantized_layers(q.model).items()}
    config = EvolQConfig.make(w_bits=3, w_group=16, bias_correction=False, passes=1, cycles=6, scope="weights",
                              holdout=0.0, progress=False, noise="relative", eps=0.05, loss="kl")
    q, rep = quantize_model(q, x, config)
    moved = [n for n, layer in quantized_layers(q.model).items()
             if layer.weight_quant.scale.shape == before[n].shape and not torch.equal(layer.weight_quant.scale,
                                                                                       before[n])]
    assert all(layer.weight_quant.scale.shape == before[n].shape for n, layer in quantized_layers(q.model).items())
    assert moved  # some block's search kept a candidate: the group scales were its genes
    for layer in quantized_layers(q.model).values():
        assert_on_group_grids(layer)


# -- sizes ------------------------------------------------------------------------------------
def test_the_size_model_counts_each_groups_scale_and_zero_point():
    q = prepare_model(tiny_vit(), images(16), QuantConfig(w_bits=3), progress=False)
    layers = quantized_layers(q.model)
    sizes = SizeModel(q.model, parse_menu("3,3g16,3g64"))
    per_ch, g16, g64 = (sizes.uniform(o) for o in (3, "3g16", "3g64"))
    extra16 = sum(m.weight.shape[0] * (layer_columns(m) // 16 - 1) * 5 for m in layers.values())
    assert float(sizes.bytes(g16)[0] - sizes.bytes(per_ch)[0]) == pytest.approx(extra16)
    n = sum(m.weight.numel() for m in layers.values())
    assert float(sizes.avg_bits(g16)[0]) == pytest.approx(3 + 8 * extra16 / n)
    assert float(sizes.avg_bits(per_ch)[0]) == pytest.approx(3.0)
    fits64 = [layer_columns(m) % 64 == 0 for m in layers.values()]
    assert sizes.menu.options == (3, "3g64", "3g16")  # by bits per weight, the scales counted
    assert sizes.allowed[:, 1].tolist() == fits64 and any(fits64) and not all(fits64)
    # uniform 3g64: the layers 64 does not divide stay at 3 bits per channel
    assert g64.tolist() == [1 if f else 0 for f in fits64]
    grouped = prepare_model(tiny_vit(), images(16), QuantConfig(w_bits=3, w_group=16), progress=False)
    assert model_bytes(grouped.model, grouped.config) == pytest.approx(float(sizes.bytes(g16)[0]))
    assert model_bytes(q.model, q.config) == pytest.approx(float(sizes.bytes(per_ch)[0]))


# -- the allocation menu ---------------------------------------------------------------------------
def test_menu_order_and_parsing():
    menu = parse_menu("2g32,3g64,3,4g128,4,8")
    assert menu.options == (3, "2g32", "3g64", 4, "4g128", 8)
    assert menu.groups == [None, 32, 64, None, 128, None] and menu.grouped == ["2g32", "3g64", "4g128"]


@pytest.mark.parametrize("searcher", ["ilp", "greedy", "random", "nsga2"])
def test_grouped_menus_in_every_searcher(searcher):
    x = images(40)
    quant = QuantConfig(w_bits=3)
    probe = prepare_model(tiny_vit(), x[:8], quant, progress=False)
    sizes = SizeModel(probe.model, parse_menu("2,3g64,3,4g16,8"))
    lo, hi = sizes.range()
    budget = (lo + 0.45 * (hi - lo)) / 1e6
    cfg = AllocationConfig(menu="2,3g64,3,4g16,8", budget=f"size-mb={budget:.6f}", searcher=searcher, evaluations=30,
                           popsize=6, fitness_images=8, tables="gptq" if searcher == "ilp" else "rtn", progress=False)
    q, rep = allocate_bits(tiny_vit(), x, quant, cfg, arch="m")
    assert rep["size_bytes"] <= float(f"{budget:.6f}") * 1e6 + 1e-6
    held = layer_bits_summary(q.model)["layers"]
    mods = quantized_layers(q.model)
    for name, option in rep["allocation"].items():
        group = int(option.split("g")[1]) if isinstance(option, str) else None
        assert held[name]["group"] == group and layer_columns(mods[name]) % (group or 1) == 0
    assert model_bytes(q.model, q.config) == pytest.approx(rep["size_bytes"])


def test_avg_bits_budget_counts_the_scales():
    x = images(40)
    cfg = AllocationConfig(menu="3,3g16,4", budget="avg-bits=3.4", searcher="greedy", evaluations=20, popsize=4,
                           fitness_images=8, tables="rtn", progress=False)
    q, rep = allocate_bits(tiny_vit(), x, QuantConfig(w_bits=3), cfg, arch="m")
    assert rep["avg_bits"] <= 3.4 + 1e-9
    sizes = SizeModel(q.model, parse_menu("3,3g16,4"))
    genes = torch.tensor([sizes.menu.index(rep["allocation"][n]) for n in sizes.layers])
    assert float(sizes.avg_bits(genes)[0]) == pytest.approx(rep["avg_bits"])


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [({"w_group": 4}, "below the smallest group size 8"),
                                       ({"w_group": 12.5}, "integer"),
                                       ({"layer_bits": {"head": "3g"}}, "BITSgGROUP"),
                                       ({"layer_bits": {"head": "g64"}}, "BITSgGROUP"),
                                       ({"layer_bits": {"head": {"w_bits": 3, "group": 2}}}, "below"),
                                       ({"layer_bits": {"head": {"w_bits": "float", "group": 16}}}, "float layer")])
def test_bad_groups_are_one_line_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        QuantConfig(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("quant,needle", [
    (QuantConfig(w_group=64), r"w_group=64: layer blocks\.0\.attn\.qkv: a group of 64 is above the layer's 48"),
    (QuantConfig(w_group=40), r"does not divide the layer's 192 input columns \(sizes that would: 8, 12, 16, 24"),
    (QuantConfig(layer_bits={"head": "3g32"}), r"layer_bits for head: layer head: .*48 input columns \(sizes that "
                                               r"would: 8, 12, 16, 24, 48\)")])
def test_a_group_that_does_not_fit_a_layer_names_it_and_the_sizes_that_would(quant, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        prepare_model(tiny_vit(), images(8), quant, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("menu,needle", [("3g,4", "BITSgGROUP"), ("g64,4", "BITSgGROUP"), ("3g4,4", "below"),
                                         ("9g64", "2..8"), ("3g64,3g64", "repeats")])
def test_bad_grouped_menu_entries_are_one_line_errors(menu, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        AllocationConfig(menu=menu)
    assert "\n" not in str(e.value)


def test_menu_groups_that_fit_no_layer_and_grouped_latency_budgets_are_refused():
    cfg = AllocationConfig(menu="3g65,4", budget="avg-bits=4", evaluations=4, popsize=2, fitness_images=4,
                           progress=False)
    with pytest.raises(ConfigError, match="3g65 fits no quantized layer.*input columns: 48, 192") as e:
        allocate_bits(tiny_vit(), images(16), QuantConfig(), cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot time the grouped menu options 3g64"):
        AllocationConfig(menu="3g64,8,float", budget="latency-ms=5")


def test_exports_refuse_group_wise_weights_in_one_line(tmp_path):
    q = prepare_model(tiny_vit(), images(8), QuantConfig(w_bits=4, w_group=16), progress=False)
    pytest.importorskip("onnx")
    from evolq.export import export_onnx

    with pytest.raises(ExportError, match="group-wise weights") as e:
        export_onnx(q, tmp_path / "m.onnx", example=images(1))
    assert "\n" not in str(e.value)
    deploy = prepare_model(tiny_vit(), images(8), QuantConfig.preset("deploy", w_bits=4, w_group=16), progress=False)
    from evolq.export import export_pt2

    with pytest.raises(ExportError, match="group-wise weights export to ONNX only") as e:
        export_pt2(deploy, tmp_path / "m.pt2", example=images(1))
    assert "\n" not in str(e.value)
    assert math.isfinite(model_bytes(deploy.model, deploy.config))


def test_cli_w_group_reaches_the_quant_config():
    from evolq.cli import build_parser, quant_config

    for cmd in (["quantize", "--model", "m", "--w-bits", "3", "--a-bits", "8", "--out", "o"],
                ["allocate", "--model", "m", "--out", "o"]):
        args = build_parser().parse_args(cmd + ["--w-group", "64"])
        if args.w_bits is None:
            args.w_bits = 3
        assert quant_config(args).w_group == 64
    args = build_parser().parse_args(["quantize", "--model", "m", "--w-bits", "3", "--a-bits", "8", "--out", "o"])
    assert quant_config(args).w_group is None


def test_a_resumed_ofq_start_keeps_its_group_grids(tmp_path):
    """StatsQ refits every group's grid at each step: killed at epoch 2 and resumed, the buffers (the
    (rows, groups) scales among them) equal an uninterrupted run's."""
    x = images(24)
    quant = QuantConfig(w_bits=3, w_group=16, start="ofq", start_options={"epochs": 2, "batch_size": 8,
                                                                             "statsq": True, "cga": False})

    def buffers(qm):
        return {f"{n}.{b}": t.clone() for n, q in qm.quantizers().items() for b, t in q.named_buffers(recurse=False)}

    def stop(info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    whole = buffers(prepare_model(tiny_vit(), x, quant, progress=False))
    with pytest.raises(KeyboardInterrupt):
        prepare_model(tiny_vit(), x, quant, progress=False, checkpoint_dir=tmp_path,
                      subscribers=[lambda hooks: hooks.epoch_start_hook.append(stop)])
    back = prepare_model(tiny_vit(), x, quant, progress=False, checkpoint_dir=tmp_path, resume=True)
    got = buffers(back)
    assert whole.keys() == got.keys() and all(torch.equal(whole[k], got[k]) for k in whole)
    assert back.model.blocks[0].mlp.fc2.weight_quant.scale.shape == (48, 12)
