"""The deploy regime and its exports: only Linear/Conv inputs (per tensor, u8) and weights
(s8 symmetric per channel) are quantized; SmoothQuant leaves the float function unchanged;
the pt2 program carries the PyTorch model's own integers and computes its logits; ONNX
holds per-tensor activation Q/DQ and int8 weights; inductor runs oneDNN int8 kernels;
bad input gives one-line errors and no file."""
from __future__ import annotations

import copy
import json

import pytest
import torch

timm = pytest.importorskip("timm")

from tiny_models import randomize_bn, tiny_levit, tiny_swin, tiny_torchvision_vit  # noqa: E402

from evolq import QuantConfig, prepare_model, save_quantized  # noqa: E402
from evolq.cli import main  # noqa: E402
from evolq.errors import ConfigError, ExportError  # noqa: E402
from evolq.export import export_pt2, load_pt2  # noqa: E402
from evolq.export.pt2 import deploy_module, float_module  # noqa: E402
from evolq.qnn.layers import QConv2d, QLinear, QNorm  # noqa: E402
from evolq.quant import UniformQuantizer  # noqa: E402


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
                          num_heads=3, num_classes=10).eval()
    with torch.no_grad():  # outlier channels on the LayerNorm affine, as trained ViTs have
        for blk in m.blocks:
            blk.norm1.weight[:3] *= 20
            blk.norm2.weight[:2] *= 15
    return m


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval(), seed)


def _images(n=24, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _deploy(model, x, **kw):
    return prepare_model(model, x, QuantConfig.preset("deploy", **kw), arch="")


def test_deploy_regime_quantizes_only_layer_inputs_and_weights():
    q = _deploy(tiny_vit(), _images())
    assert not any(isinstance(m, QNorm) for m in q.model.modules())
    layers = [m for m in q.model.modules() if isinstance(m, (QLinear, QConv2d))]
    assert len(layers) == 2 * 4 + 2  # qkv, proj, fc1, fc2 per block; patch embedding; head
    for m in layers:
        w, a = m.weight_quant, m.input_quant
        assert isinstance(w, UniformQuantizer) and w.signed and w.symmetric and not w.bias_correction
        assert bool((w.zero_point == 0).all()) and w.per_channel
        assert isinstance(a, UniformQuantizer) and not a.signed and a.scale.numel() == 1
    n_quantizers = sum(isinstance(m, UniformQuantizer) for m in q.model.modules())
    assert n_quantizers == 2 * len(layers)  # nothing on q/k/v, softmax, GELU or LayerNorm inputs
    assert all(b.float_attention for b in (blk.attn for blk in q.model.blocks))


def test_smoothing_keeps_the_float_function_and_flattens_outliers():
    x = _images()
    ref_model = tiny_vit()
    with torch.no_grad():
        ref = ref_model(x)
    q = _deploy(tiny_vit(), x, smooth_strength=1.0)
    q.set_quant_enabled(False)
    with torch.no_grad():
        got = q.model(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    groups = q.smooth_report["groups"]
    assert len(groups) == 2 * 4 + 1  # norm1->qkv, v->proj, norm2->fc1, explicit fc2 input, final norm->head
    norm1 = [g for g in groups if g["producer"].endswith("norm1")]
    assert all(g["outlier_ratio_after"] < g["outlier_ratio_before"] / 3 for g in norm1)
    fc2 = [m for m in q.model.modules() if isinstance(m, QLinear) and m.input_scale is not None]
    assert len(fc2) == 2
    off = _deploy(tiny_vit(), x, smooth_strength=0.0)
    assert off.smooth_report is None and all(m.input_scale is None for m in off.model.modules()
                                             if isinstance(m, QLinear))


def test_smoothing_lowers_the_quantization_error():
    x = _images(48)
    with torch.no_grad():
        ref = tiny_vit()(x)
    errs = {}
    for s in (0.0, 1.0):
        q = _deploy(tiny_vit(), x, smooth_strength=s, a_bits=6)
        with torch.no_grad():
            errs[s] = (q.model(x) - ref).pow(2).mean().item()
    assert errs[1.0] < errs[0.0]


def test_bad_deploy_settings_are_config_errors():
    with pytest.raises(ConfigError, match="smooth_strength"):
        QuantConfig.preset("deploy", smooth_strength=1.5)
    with pytest.raises(ConfigError, match="regime"):
        QuantConfig(regime="int8")
    with pytest.raises(ConfigError, match="deploy_weights"):
        QuantConfig.preset("deploy", deploy_weights="offset")
    with pytest.raises(ConfigError, match="deploy regime"):
        QuantConfig(deploy_weights="asymmetric")


def test_asymmetric_4bit_weights_run_as_int8_codes_with_zero_point_0(tmp_path):
    x = _images()
    q = _deploy(tiny_vit(), x, w_bits=4, edge_bits=8, deploy_weights="asymmetric")
    layers = [m for m in q.model.modules() if isinstance(m, QLinear)]
    four = [m for m in layers if m.weight_quant.bits == 4]
    assert len(four) == 8 and all(not m.weight_quant.symmetric for m in four)
    assert any(bool((m.weight_quant.zero_point != 0).any()) for m in four)  # the grid follows each row's range
    assert all(m.weight_quant.symmetric for m in layers if m.weight_quant.bits == 8)  # edge layers: s8 as before
    sym = _deploy(tiny_vit(), x, w_bits=4, edge_bits=8, deploy_weights="symmetric")
    assert all(m.weight_quant.symmetric for m in sym.model.modules() if isinstance(m, QLinear))
    auto = _deploy(tiny_vit(), x, w_bits=4, edge_bits=8)  # the default: asymmetric below 8 bits
    assert [m.weight_quant.symmetric for m in auto.model.modules() if isinstance(m, QLinear)] == \
        [m.weight_quant.symmetric for m in layers]
    errs = {}
    with torch.no_grad():
        for name, model in (("asymmetric", q), ("symmetric", sym)):
            errs[name] = sum(float((m.weight_quant(m.weight) - m.weight).pow(2).sum())
                             for m in model.model.modules() if isinstance(m, QLinear) and m.weight_quant.bits == 4)
    assert errs["asymmetric"] < errs["symmetric"]  # 16 levels on each row's range against 15 centred on 0
    ep = load_pt2(export_pt2(q, tmp_path / "m.pt2", example=x[:2]))
    with torch.no_grad():
        assert torch.allclose(q.model(x), ep.module()(x), atol=1e-5)
    lowered = [m for m in deploy_module(q).modules() if type(m).__name__ == "DeployLinear"]
    for m, d in zip(layers, lowered):
        wq = m.weight_quant
        assert bool((d.weight.zero_point == 0).all())
        with torch.no_grad():
            codes = torch.round(wq(m.weight) / wq.scale.reshape(-1, 1))  # q - z
        assert torch.equal(d.weight.qweight.to(torch.float32), codes)
        assert int(codes.abs().max()) <= 2 ** wq.bits - 1


def test_pt2_program_holds_the_models_integers_and_computes_its_logits(tmp_path):
    x = _images()
    q = _deploy(tiny_vit(), x, w_bits=4, edge_bits=8, deploy_weights="symmetric")
    path = export_pt2(q, tmp_path / "m.pt2", example=x[:2])
    ep = load_pt2(path)
    with torch.no_grad():
        ref, got = q.model(x), ep.module()(x)
    assert torch.allclose(ref, got, atol=1e-5)
    # the int8 constants are the codes the PyTorch model's weight quantizers round to
    lowered = deploy_module(q)
    for (name, m), (_, d) in zip(((n, m) for n, m in q.model.named_modules() if isinstance(m, QLinear)),
                                 ((n, m) for n, m in lowered.named_modules() if type(m).__name__ == "DeployLinear")):
        wq = m.weight_quant
        with torch.no_grad():
            codes = torch.round(wq(m.weight) / wq.scale.reshape(-1, 1))
        assert torch.equal(d.weight.qweight.to(torch.float32), codes), name
        assert int(codes.abs().max()) <= wq.qmax
    assert sum(int(m.weight_quant.bits) == 4 for m in q.model.modules() if isinstance(m, QLinear)) == 8
    # the batch dimension is dynamic
    with torch.no_grad():
        assert ep.module()(x[:3]).shape == (3, 10)


@pytest.mark.parametrize("build", [tiny_swin, tiny_levit, tiny_torchvision_vit, tiny_cnn],
                         ids=["swin", "levit", "torchvision-vit", "efficientnet"])
def test_pt2_round_trip_every_family(build, tmp_path):
    model = build()
    size = {tiny_levit: 64, tiny_cnn: 64}.get(build, 32)
    x = _images(8, size)
    q = _deploy(model, x)
    path = export_pt2(q, tmp_path / "m.pt2", example=x[:2])
    with torch.no_grad():
        ref, got = q.model(x), load_pt2(path).module()(x)
    assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    flt = float_module(q)
    q.set_quant_enabled(False)
    with torch.no_grad():
        assert torch.allclose(flt(x), q.model(x), atol=1e-4, rtol=1e-4)


def test_pt2_refuses_the_fq_vit_regime_naming_the_quantizer(tmp_path):
    x = _images()
    q = prepare_model(tiny_vit(), x, QuantConfig(), arch="")
    with pytest.raises(ExportError, match=r"quantizer .*(norm|q_quant|input_quant).*deploy"):
        export_pt2(q, tmp_path / "m.pt2", example=x[:2])
    assert not (tmp_path / "m.pt2").exists()


def test_deploy_onnx_has_per_tensor_activations_and_int8_weights(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from evolq.export import check_onnx, export_onnx

    x = _images()
    q = _deploy(tiny_vit(), x)
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    g = onnx.load(str(path)).graph
    inits = {t.name: t for t in g.initializer}
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 10 and all(not any(a.name == "axis" for a in n.attribute) for n in qs)
    weights = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight.quantized")]
    assert len(weights) == 10
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weights)
    res = check_onnx(q, path, x)
    assert res["agreement"] == 100.0 and res["max_abs_diff"] < 1e-2  # float reassociation only


def test_inductor_runs_int8_kernels(tmp_path):
    pytest.importorskip("torchao")
    from evolq.export.check import check_export

    x = _images(8)
    q = _deploy(tiny_vit(), x)
    path = export_pt2(q, tmp_path / "m.pt2", example=x[:2])
    res = check_export(q, path, "pt2", "inductor", x, torch.zeros(8, dtype=torch.long), threads=1, batch_size=8)
    assert res["integer_kernels"].get("onednn.qlinear_pointwise", 0) == 9  # 8 block Linears and the head
    assert res["layers_in_float"] <= 1 and res["agreement"] >= 75.0


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    x = _images()
    q = prepare_model(tiny_vit(), x, QuantConfig(), arch="vit_tiny_patch16_224")
    folder = save_quantized(q, tmp_path / "model", model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                                     num_heads=3, num_classes=10))
    rc = main(["export", str(folder), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "deploy" in err[0] and not (tmp_path / "m.pt2").exists()
    rc = main(["export", str(folder), "--format", "pt2", "--runtime", "onnxruntime", "--check",
               "--out", str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not run the pt2 format" in err[0]


def test_missing_runtime_names_the_extra(monkeypatch):
    from evolq.export.runtimes import get_runtime
    from evolq.export.runtimes.openvino import OpenVINORuntime

    monkeypatch.setattr(OpenVINORuntime, "package", "evolq_no_such_package")
    with pytest.raises(ExportError, match=r"pip install 'evolq\[openvino\]'"):
        get_runtime("openvino", "onnx")


def test_deploy_model_saves_and_loads_with_its_smoothing(tmp_path):
    from evolq import load_quantized

    x = _images()
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    q = _deploy(tiny_vit(), x)
    q.arch = "vit_tiny_patch16_224"
    folder = save_quantized(q, tmp_path / "model", model_kwargs=kw)
    back = load_quantized(folder)
    with torch.no_grad():
        assert torch.allclose(q.model(x), back.model(x), atol=1e-6)
    assert sum(m.input_scale is not None for m in back.model.modules() if isinstance(m, QLinear)) == 2
    json.dumps(copy.deepcopy(back.config).__dict__, default=str)


def test_gptq_sees_the_input_after_the_explicit_smoothing_multiply():
    from evolq.qnn.reconstruct.gptq import layer_rows

    x = _images()
    q = _deploy(tiny_vit(), x, w_bits=4)
    fc2 = q.model.blocks[0].mlp.fc2
    h = torch.randn(5, 7, fc2.in_features)
    rows = layer_rows(fc2, h)
    want = fc2.input_quant(h * fc2.input_scale).reshape(-1, h.shape[-1])
    assert torch.allclose(rows.reshape(-1, fc2.in_features), want)
    g = _deploy(tiny_vit(), x, w_bits=4, start="gptq")
    assert g.start_report is not None and g.config.deploy


def test_time_alternating_interleaves_and_takes_per_round_ratios():
    import time as _time

    from evolq.export.bench import cpu_info, time_alternating

    calls = []

    def slow():
        calls.append("slow")
        _time.sleep(0.004)

    def fast():
        calls.append("fast")
        _time.sleep(0.001)

    r = time_alternating({"slow": slow, "fast": fast}, "slow", pairs=3, warmup=2)
    assert calls[:4] == ["slow", "fast", "slow", "fast"]  # warm-up interleaved
    assert calls[4:] == ["slow", "fast", "fast", "slow", "slow", "fast"]  # the order alternates per round
    s = r["speedup"]["fast"]
    assert 2.0 < s["median"] < 6.0 and s["min"] <= s["median"] <= s["max"]
    assert len(r["times"]["slow"]["rounds_s"]) == 3 and "slow" not in r["speedup"]
    with pytest.raises(ValueError):
        time_alternating({"a": fast}, "b")
    assert set(cpu_info()) == {"model", "flags", "cores", "load_1m"}


def test_check_warns_when_the_runtime_leaves_deploy_layers_in_float(tmp_path):
    pytest.importorskip("onnxruntime")
    from evolq.export import export_onnx
    from evolq.export.check import DeployWarning, check_export

    x = _images(8)
    q = _deploy(tiny_vit(), x)
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    with pytest.warns(DeployWarning, match="run in float"):
        res = check_export(q, path, "onnx", "onnxruntime", x, threads=1, batch_size=8)
    n_int = sum(res["integer_kernels"].values())
    assert res["layers_in_float"] == res["quantized_layers"] - n_int > 0  # onnxruntime: the patch Conv, the head Gemm
    assert "top1_runtime" not in res and res["floor"] >= 0


def test_bench_times_the_export_against_the_same_runtimes_fp32(tmp_path):
    pytest.importorskip("onnxruntime")
    from evolq.export import export_onnx
    from evolq.export.check import bench_export

    x = _images(8)
    q = _deploy(tiny_vit(), x)
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    r = bench_export(q, path, "onnx", "onnxruntime", x[0], batches=(4, 1), threads=(1,), pairs=2, warmup=1)
    assert [(b["batch"], b["threads"]) for b in r["runs"]] == [(4, 1), (1, 1)]
    assert r["speedup"] == r["runs"][0]["speedup"]["median"] > 0
    assert all(len(b["rounds_s"]["fp32"]) == 2 and b["fp32_ms"] > 0 for b in r["runs"])
    assert isinstance(r["cpu"]["flags"], list) and r["cpu"]["model"]


def test_openvino_runs_every_deploy_layer_in_int8(tmp_path):
    pytest.importorskip("openvino")  # evolq[openvino]; not in the test extra
    from evolq.export import export_onnx
    from evolq.export.check import check_export

    x = _images(8)
    q = _deploy(tiny_vit(), x)
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    res = check_export(q, path, "onnx", "openvino", x, threads=1, batch_size=8)
    assert res["integer_kernels"] == {"Convolution": 1, "FullyConnected": 9}  # patch embedding; 8 block Linears + head
    assert res["layers_in_float"] == 0 and res["agreement"] >= res["floor"] - 12.5


def test_compiling_another_program_keeps_the_first_compiled():
    """The inductor runner captures its generated code without resetting dynamo: a program compiled
    before another one runs again without being compiled again (the latency table times several
    compiled programs in alternation; each recompile cost a whole-model compile)."""
    from torch._dynamo.utils import counters

    from evolq.export.runtimes.inductor import compile_module

    x = torch.randn(2, 8)
    runners = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nn = torch.nn
        m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
        runners.append(compile_module(torch.export.export(m, (x,), strict=False).module(), 1))
        runners[-1](x)
        assert runners[-1].codes  # its generated code was captured
    graphs = counters["stats"]["unique_graphs"]
    for r in runners * 2:
        r(x)
    assert counters["stats"]["unique_graphs"] == graphs
