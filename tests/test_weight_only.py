"""The weight-only regime (issue 36 item 5): what onnxruntime's MatMulNBits computes, modelled in
PyTorch (dynamic int8 input blocks, unsigned codes with integer zero-points per group), exported as
MatMulNBits nodes, sized as the file stores them, and the bad inputs as one-line errors. Random tiny
models: mechanics and export parity, not accuracy."""
from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from test_allocation import tiny_vit  # noqa: E402  (tests/test_allocation.py)

from evolq import ConfigError, QuantConfig, allocate_bits, load_quantized, prepare_model, save_quantized  # noqa: E402
from evolq.config import AllocationConfig  # noqa: E402
from evolq.errors import ExportError  # noqa: E402
from evolq.problems.menu import SizeModel, model_bytes, parse_menu, stored_nbits  # noqa: E402
from evolq.qnn.layer_bits import quantized_layers  # noqa: E402
from evolq.qnn.layers import QConv2d, QLinear  # noqa: E402
from evolq.quant import DynamicBlockQuantizer  # noqa: E402
from evolq.quant.nbits import container_bits, dynamic_block_quant, nbits_block, nbits_bytes  # noqa: E402

# tiny_vit: input columns patch embedding 192, qkv/proj/fc1/head 48, fc2 192


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def weight_only(**kw):
    kw.setdefault("w_group", 16)
    return prepare_model(tiny_vit(), images(8), QuantConfig.preset("weight-only", **kw), progress=False)


def test_dynamic_block_quant_is_int8_per_row_and_block():
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 64)
    q = dynamic_block_quant(x, 16)
    blocks, qb = x.reshape(3, 5, 4, 16), q.reshape(3, 5, 4, 16)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    codes = qb / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.0 + 1e-3
    assert (qb - blocks).abs().le(0.5 * step + 1e-6).all()
    assert (codes.abs().amax(-1) > 126.99).all()  # the largest value of each block maps to +-127
    z = torch.zeros(2, 32)
    assert torch.equal(dynamic_block_quant(z, 16), z)  # a block of zeros stays zero (no 0/0)
    odd = torch.randn(2, 40)  # a last partial block is quantized over its own columns
    assert torch.allclose(dynamic_block_quant(odd, 32)[:, 32:], dynamic_block_quant(odd[:, 32:], 8))


def test_the_regime_quantizes_linear_inputs_dynamically_and_conv_inputs_not_at_all():
    q = weight_only(w_bits=4)
    layers = quantized_layers(q.model)
    for name, m in layers.items():
        if isinstance(m, QLinear):
            assert isinstance(m.input_quant, DynamicBlockQuantizer), name
            assert m.input_quant.block == 16 and m.weight_quant.group == 16
            assert not m.weight_quant.signed and not m.weight_quant.symmetric
        else:
            assert isinstance(m, QConv2d) and isinstance(m.input_quant, torch.nn.Identity), name
    names = {type(m).__name__ for m in q.model.modules()}
    assert "QNorm" not in names and "QAct" not in names  # nothing else quantized
    zp = torch.cat([m.weight_quant.zero_point.reshape(-1) for m in layers.values()])
    assert torch.equal(zp, zp.round())  # integer zero-points, as MatMulNBits stores them
    fc2 = q.model.blocks[0].mlp.fc2
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        want = torch.nn.functional.linear(dynamic_block_quant(x, 16), fc2.weight_quant(fc2.weight), fc2.bias)
        assert torch.allclose(fc2(x), want, atol=1e-6)


def test_per_channel_layers_take_the_largest_block_that_divides():
    assert nbits_block(192, None) == 64 and nbits_block(768, None) == 256 and nbits_block(48, None) == 16
    assert nbits_block(100, None) == 32 and nbits_block(768, 32) == 32
    q = weight_only(w_bits=8, w_group=None)
    fc2 = q.model.blocks[0].mlp.fc2
    assert fc2.input_quant.block is None and fc2.input_quant.block_for(192) == 64


def test_containers_and_the_size_rule():
    assert [container_bits(b, 64) for b in (2, 3, 4, 5, 8)] == [2, 4, 4, 8, 8]
    assert container_bits(2, 16) == 4 and container_bits(2, 256) == 4  # no int8 2-bit kernel at those blocks
    # 3 bits cost what 4 do (4-bit containers); scales f32 per block, zero-points packed at the container's bits
    assert nbits_bytes(576, 192, 3, 32) == nbits_bytes(576, 192, 4, 32) == 576 * (96 + 6 * 4 + 3)
    assert nbits_bytes(10, 48, 8, None) == 10 * (48 + 3 * 4 + 3)
    q = weight_only(w_bits=4)
    sizes = SizeModel(q.model, parse_menu("3g16,4g16,8"))
    mods = quantized_layers(q.model)
    for i, m in enumerate(mods.values()):
        rows, cols = m.weight.shape[0], math.prod(m.weight.shape[1:])
        if stored_nbits(m):
            assert sizes.cost[i, 0] == sizes.cost[i, 1] == nbits_bytes(rows, cols, 4, 16)
        else:  # convolutions keep the bit-packed rule
            assert sizes.cost[i, 0] < sizes.cost[i, 1]


def _ort_parity(q, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from evolq.export import export_onnx
    from evolq.export.runtimes import get_runtime

    path = export_onnx(q, tmp_path / "m.onnx", example=images(1))
    runner = get_runtime("onnxruntime", "onnx").load(path, 1)
    x = images(6, seed=5)
    with torch.no_grad():
        ref = q.model(x)
    got = runner(x)
    linears = sum(isinstance(m, QLinear) for m in quantized_layers(q.model).values())
    return ort, path, runner.kernels(), ref, got, linears


@pytest.mark.parametrize("kw", [dict(w_bits=4), dict(w_bits=3, w_group=16), dict(w_bits=2, w_group=None),
                                dict(w_bits=8, w_group=None), dict(w_bits=6, w_group=48 // 3 * 2)])
def test_every_linear_runs_as_matmulnbits_and_matches_pytorch(kw, tmp_path):
    if kw.get("w_group") == 32:  # 32 does not divide the 48-column layers
        kw["w_group"] = 16
    q = weight_only(edge_bits=8, **kw)
    _, _, kernels, ref, got, linears = _ort_parity(q, tmp_path)
    assert kernels["integer"].get("MatMulNBits") == linears
    rows = (ref - got).abs().amax(1) / ref.abs().max()
    # equal to float rounding, except where float rounding moved an int8 code by one (a tie in a block)
    assert (rows <= 1e-5).float().mean() >= 0.5 and rows.max() <= 0.05, rows


def test_the_file_holds_what_the_size_model_counts(tmp_path):
    onnx = pytest.importorskip("onnx")
    q = weight_only(w_bits=3)
    _, path, *_ = _ort_parity(q, tmp_path)
    proto = onnx.load(str(path))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    stored = sum(inits[i].nbytes for n in nbits for i in n.input[1:4])
    mods = quantized_layers(q.model)
    counted = sum(nbits_bytes(m.weight.shape[0], m.weight.shape[1], 3, 16) for m in mods.values() if stored_nbits(m))
    assert stored == counted
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert math.isfinite(model_bytes(q.model, q.config))


def test_save_load_keeps_the_blocks(tmp_path):
    q = weight_only(w_bits=4, layer_bits={"blocks.1.mlp.fc2": "3g64"})
    assert q.model.blocks[1].mlp.fc2.input_quant.block == 64
    save_quantized(q, tmp_path / "m")
    back = load_quantized(tmp_path / "m", model=tiny_vit())
    assert back.model.blocks[1].mlp.fc2.input_quant.block == 64 and back.model.blocks[0].mlp.fc2.input_quant.block == 16
    x = images(3, seed=9)
    with torch.no_grad():
        assert torch.equal(q.model(x), back.model(x))


def test_the_allocation_switches_input_blocks_with_the_groups():
    x = images(40)
    quant = QuantConfig.preset("weight-only", w_bits=4, w_group=None)
    probe = prepare_model(tiny_vit(), x[:8], quant, progress=False)
    sizes = SizeModel(probe.model, parse_menu("2g32,3g16,4,8"))
    lo, hi = sizes.range()
    budget = (lo + 0.45 * (hi - lo)) / 1e6
    cfg = AllocationConfig(menu="2g32,3g16,4,8", budget=f"size-mb={budget:.6f}", searcher="random", evaluations=12,
                           popsize=4, fitness_images=8, tables="rtn", progress=False)
    q, rep = allocate_bits(tiny_vit(), x, quant, cfg, arch="m")
    assert rep["size_bytes"] <= float(f"{budget:.6f}") * 1e6 + 1e-6
    assert model_bytes(q.model, q.config) == pytest.approx(rep["size_bytes"])
    for name, m in quantized_layers(q.model).items():
        if isinstance(m, QLinear):
            assert m.input_quant.block == m.weight_quant.group, name


@pytest.mark.parametrize("kw, needle", [
    (dict(w_group=48), "MatMulNBits runs blocks of 16, 32, 64, 128, 256"),
    (dict(w_group=8), "not 8"),
    (dict(a_bits=4), "a_bits must be 8"),
    (dict(weight_observer="statsq"), "StatsQ"),
    (dict(layer_bits={"blocks.0.*": "3g24"}), "not 24"),
    (dict(layer_bits={"blocks.0.*": {"w_bits": 4, "a_bits": 6}}), "dynamic int8"),
])
def test_bad_weight_only_configs_are_one_line_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        QuantConfig.preset("weight-only", **kw)
    assert "\n" not in str(e.value)


def test_a_weight_only_menu_needs_matmulnbits_blocks():
    q = QuantConfig.preset("weight-only", w_bits=4, w_group=None)
    cfg = AllocationConfig(menu="3g24,4,8", budget="avg-bits=4", searcher="random", evaluations=4, popsize=4,
                           fitness_images=6, progress=False)
    with pytest.raises(ConfigError, match="not 24") as e:
        allocate_bits(tiny_vit(), images(16), q, cfg, arch="m")
    assert "\n" not in str(e.value)


def test_pt2_refuses_a_weight_only_model_and_points_to_onnx(tmp_path):
    from evolq.export import export_pt2

    with pytest.raises(ExportError, match="--format onnx") as e:
        export_pt2(weight_only(w_bits=4), tmp_path / "m.pt2", example=images(1))
    assert "\n" not in str(e.value)


def test_the_allocation_tables_switch_each_layers_input_block_with_its_option():
    from evolq.allocation.tables import WeightTables

    x = images(8)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset("weight-only", w_bits=4, w_group=None), progress=False)
    menu = parse_menu("2g32,3g16,4,8")
    tables = WeightTables.build(q, x, menu, method="rtn", quant=q.config)
    mods = quantized_layers(q.model)
    with tables.installed():
        for k, option in enumerate(menu.options):
            tables.set([k] * len(tables.layers))
            for name in tables.layers:
                m = mods[name]
                if isinstance(m, QLinear):
                    fits = isinstance(option, str) and m.in_features % int(option.split("g")[1]) == 0
                    assert m.input_quant.block == (int(option.split("g")[1]) if fits else None), (name, option)
    assert all(m.input_quant.block is None for m in mods.values() if isinstance(m, QLinear))  # restored


def test_a_cnn_ships_its_classifier_as_matmulnbits_and_float_convs_folded_at_load(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from test_allocation import tiny_cnn

    from evolq.export import export_onnx
    from evolq.export.onnx import onnx_session

    x = images(8)
    q = prepare_model(tiny_cnn(), x, QuantConfig.preset("weight-only", w_bits=4), progress=False)
    convs = [m for m in quantized_layers(q.model).values() if isinstance(m, QConv2d)]
    assert convs and all(m.weight_quant.group is None for m in convs)  # w_group groups the Linears only
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    onnx_session(path, 1, optimized_path=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 1 and "DequantizeLinear" not in ops  # conv weights folded once at load
    sess = onnx_session(path, 1)
    with torch.no_grad():
        ref = q.model(x)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert (ref - got).abs().max() <= 1e-3 * ref.abs().max() + 1e-5
