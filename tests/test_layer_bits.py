"""Per-layer bit widths (``QuantConfig.layer_bits``): the named layers get their widths, "float"
layers lose their quantizers, every start (rtn, gptq, brecq, ofq) and both regimes honour them,
saved models come back with them, exports hold them, and bad names or values are one-line
errors. Tiny random ViTs: mechanics only."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from evolq import ConfigError, QuantConfig, load_quantized, prepare_model, save_quantized  # noqa: E402
from evolq.qnn.layer_bits import layer_bits_summary, quantized_layers  # noqa: E402
from evolq.quant import Quantizer, UniformQuantizer  # noqa: E402


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                          depth=2, num_heads=3, num_classes=10).eval()
    torch.nn.init.normal_(m.head.weight, std=0.2)  # timm starts the head at zero
    return m


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


SPEC = {"blocks.*.mlp.fc2": 2, "blocks.1.attn.qkv": {"w_bits": 3, "a_bits": 6}, "head": "float"}


def levels_per_row(layer) -> int:
    """The most distinct weight values in one output row of what the layer computes with."""
    from evolq.qnn.reconstruct.common import folded_weight

    with torch.no_grad():
        w = layer.weight_quant(folded_weight(layer)[0])
    w = w.reshape(w.shape[0], -1)
    return max(len(torch.unique(r)) for r in w)


def test_named_layers_get_their_widths_and_float_layers_lose_their_quantizers():
    q = prepare_model(tiny_vit(), images(16), QuantConfig(w_bits=4, edge_bits=8, layer_bits=SPEC))
    layers = quantized_layers(q.model)
    assert layers["blocks.0.mlp.fc2"].weight_quant.bits == layers["blocks.1.mlp.fc2"].weight_quant.bits == 2
    qkv = layers["blocks.1.attn.qkv"]
    assert qkv.weight_quant.bits == 3 and qkv.input_quant.bits == 6
    assert layers["blocks.0.attn.qkv"].weight_quant.bits == 4  # not named: w_bits
    assert layers["patch_embed.proj"].weight_quant.bits == 8  # edge_bits, not overridden
    head = layers["head"]
    assert not isinstance(head.weight_quant, Quantizer) and not isinstance(head.input_quant, Quantizer)
    owned = {id(qq) for b in q.blocks for qq in b.quantizers.values()}
    assert all(id(qq) in owned for qq in q.model.modules() if isinstance(qq, Quantizer))  # views match the model
    assert not any(n.startswith("head.") for b in q.blocks for n in b.quantizers)
    x = images(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(q.model.head(torch.ones(2, 48)), torch.ones(2, 48) @ head.weight.T + head.bias)
        assert torch.isfinite(q.model(x)).all()
    # 2-bit rows hold at most 4 levels; the float head every weight as it was
    assert levels_per_row(layers["blocks.0.mlp.fc2"]) <= 4
    summary = layer_bits_summary(q.model)
    assert summary["layers"]["head"]["w_bits"] == "float"


def test_later_entries_win_and_explicit_entries_override_edge_bits():
    spec = {"blocks.*": 3, "blocks.0.attn.proj": 5, "patch_embed.proj": 4}
    q = prepare_model(tiny_vit(), images(16), QuantConfig(w_bits=4, edge_bits=8, layer_bits=spec))
    layers = quantized_layers(q.model)
    assert layers["blocks.0.attn.proj"].weight_quant.bits == 5
    assert layers["blocks.1.mlp.fc1"].weight_quant.bits == 3
    assert layers["patch_embed.proj"].weight_quant.bits == 4  # named: beats edge_bits
    assert layers["patch_embed.proj"].input_quant.bits == 8  # its input keeps edge_bits' width
    assert layers["head"].weight_quant.bits == 8


@pytest.mark.parametrize("start,opts", [("rtn", {}), ("gptq", {}), ("brecq", {"iters": 2, "batch_size": 4}),
                                        ("ofq", {"epochs": 1, "batch_size": 8, "qkr": False})])
def test_every_start_honours_layer_bits(start, opts):
    x = images(24)
    q = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4, start=start, start_options=opts, layer_bits=SPEC))
    layers = quantized_layers(q.model)
    for name in ("blocks.0.mlp.fc2", "blocks.1.mlp.fc2"):
        assert layers[name].weight_quant.bits == 2 and levels_per_row(layers[name]) <= 4, (start, name)
    assert levels_per_row(layers["blocks.1.attn.qkv"]) <= 8
    assert not isinstance(layers["head"].weight_quant, Quantizer)
    with torch.no_grad():
        assert torch.isfinite(q.model(images(2, seed=5))).all()


@pytest.mark.parametrize("preset", ["outlier-aware", "deploy"])
def test_saved_models_come_back_with_their_widths(tmp_path, preset):
    x = images(16)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset(preset, w_bits=4, start="gptq", layer_bits=SPEC),
                      arch="vit_tiny_patch16_224")
    save_quantized(q, tmp_path / "m", model_kwargs={})
    back = load_quantized(tmp_path / "m", model=tiny_vit(seed=7))  # other float weights: the saved ones win
    assert layer_bits_summary(back.model) == layer_bits_summary(q.model)
    xe = images(6, seed=9)
    with torch.no_grad():
        assert torch.equal(back.model(xe), q.model(xe))


def test_unknown_names_and_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="closest: blocks.1.attn.qkv"):
        prepare_model(tiny_vit(), images(8), QuantConfig(layer_bits={"blocks.1.atn.qkv": 3}))
    for bad, needle in [({"head": 9}, "2..8"), ({"head": "half"}, "2..8"), ({"head": {"bits": 3}}, "w_bits and a_bits"),
                        ({"head": {"w_bits": "float", "a_bits": 8}}, "float layer"), (["head"], "mapping"),
                        ({"head": {"a_bits": 3}}, "4..8")]:
        with pytest.raises(ConfigError, match=needle) as e:
            QuantConfig(layer_bits=bad)
        assert "\n" not in str(e.value)


def test_deploy_exports_hold_each_layers_integers(tmp_path):
    """pt2: the program's int8 constants are each layer's codes at its own width, a float layer
    stays a float Linear; ONNX: 2-4 bit layers as 4-bit integers, 8-bit ones as 8-bit, the float
    layer as a float initializer; both compute the PyTorch model's logits."""
    pytest.importorskip("torchao")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from evolq.export import export_onnx, export_pt2
    from evolq.export.pt2 import deploy_module, load_pt2

    x = images(24)
    spec = {"blocks.0.mlp.fc2": 2, "blocks.1.attn.qkv": 3, "blocks.1.mlp.fc1": 8, "blocks.0.attn.proj": "float"}
    q = prepare_model(tiny_vit(), x, QuantConfig.preset("deploy", w_bits=4, layer_bits=spec))
    ep = load_pt2(export_pt2(q, tmp_path / "m.pt2", example=x[:2]))
    with torch.no_grad():
        ref = q.model(x)
        assert torch.allclose(ep.module()(x), ref, atol=1e-4)
    lowered = dict(deploy_module(q).named_modules())
    for name, m in quantized_layers(q.model).items():
        d = lowered[name]
        if not isinstance(m.weight_quant, UniformQuantizer):
            assert isinstance(d, torch.nn.Linear), name
            continue
        wq = m.weight_quant
        with torch.no_grad():
            shape = [-1] + [1] * (m.weight.ndim - 1)
            codes = torch.round(wq(m.weight) / wq.scale.reshape(shape))
        assert torch.equal(d.weight.qweight.to(torch.float32), codes), name
        assert int(codes.abs().max()) <= 2 ** wq.bits - 1
    path = export_onnx(q, tmp_path / "m.onnx", example=x[:1])
    g = onnx.load(str(path)).graph
    inits = {t.name: t for t in g.initializer}
    TP = onnx.TensorProto
    fc2 = quantized_layers(q.model)["blocks.0.mlp.fc2"]
    packed = inits["blocks.0.mlp.fc2.weight.packed2"]  # 2 bits per weight, bit-packed
    assert packed.data_type == TP.UINT8 and len(packed.raw_data) == -(-fc2.weight.numel() * 2 // 8)
    assert "blocks.1.attn.qkv.weight.packed3" in inits
    assert inits["blocks.1.mlp.fc1.weight.quantized"].data_type in (TP.INT8, TP.UINT8)
    assert not any(n.startswith("blocks.0.attn.proj.weight.") for n in inits)  # the float layer
    plain = export_onnx(q, tmp_path / "plain.onnx", example=x[:1], pack="none")
    assert inits["blocks.0.mlp.fc2.weight.packed2"] is not None
    assert onnx.load(str(plain)).graph.initializer  # every width in its container
    runs = []
    for p in (path, plain):
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        runs.append(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]))
    assert torch.equal(runs[0], runs[1])  # unpacking gives the same integers
    assert (runs[0].argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_pack_bits_round_trip():
    import numpy as np

    from evolq.export.onnx.weights import pack_bits

    rng = np.random.default_rng(0)
    for bits in (2, 3, 5, 6, 7):
        codes = rng.integers(0, 2**bits, size=37)
        packed = pack_bits(codes, bits)
        assert packed.size == -(-37 // 8) * bits
        words = (packed.astype(np.int64) * 256 ** np.arange(bits)).sum(1, keepdims=True)
        back = (words // (2**bits) ** np.arange(8) % 2**bits).reshape(-1)[:37]  # what the graph's nodes compute
        assert np.array_equal(back, codes)


def test_cli_layer_bits_file(tmp_path, capsys):
    from evolq.cli import build_parser, main, quant_config

    spec = tmp_path / "bits.json"
    spec.write_text('{"blocks.*.mlp.fc2": 4, "head": "float"}')
    args = build_parser().parse_args(["eval", "--model", "vit_tiny_patch16_224", "--layer-bits", str(spec)])
    assert quant_config(args).layer_bits == {"blocks.*.mlp.fc2": 4, "head": "float"}
    report = tmp_path / "report.json"  # an evolq allocate report: its "allocation" is the mapping
    report.write_text('{"allocation": {"head": 8}, "avg_bits": 3.3}')
    args = build_parser().parse_args(["eval", "--model", "vit_tiny_patch16_224", "--layer-bits", str(report)])
    assert quant_config(args).layer_bits == {"head": 8}
    for text, needle in [(None, "cannot read"), ("{not json", "is not JSON"), ("[3]", "JSON object"),
                         ('{"head": 11}', "2..8")]:
        p = tmp_path / "bad.json"
        if text is None:
            p = tmp_path / "missing.json"
        else:
            p.write_text(text)
        assert main(["eval", "--model", "vit_tiny_patch16_224", "--layer-bits", str(p)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
