"""Rotations (``QuantConfig.rotation``, ``evolq.qnn.rotate``): the matrices are orthogonal, a
rotated float ViT computes the unrotated logits (tiny random ViTs of several timm layouts, and
the real ViT-Tiny), the fused weights are the ones the quantized model runs under every start,
the online MLP transform exports, a rotated model saves and loads, families without rotation
points stay unrotated with a warning, and bad values are one-line errors."""
from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from evolq import EvolQConfig, QuantConfig, load_quantized, prepare_model, quantize_model, save_quantized  # noqa: E402
from evolq.adapters import wrap_model  # noqa: E402
from evolq.cli import main  # noqa: E402
from evolq.errors import ConfigError  # noqa: E402
from evolq.qnn.layers import QLinear  # noqa: E402
from evolq.qnn.rotate import (  # noqa: E402
    OnlineHadamard,
    RotationWarning,
    hadamard_matrix,
    head_rotation,
    random_orthogonal,
    residual_rotation,
)

ARCH = "vit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)


def tiny_vit(seed=0, arch=ARCH, **kw):
    """A small timm ViT with non-trivial LayerNorm affines, biases and embeddings (random init
    leaves LayerNorms at 1/0 and the class token near 0, which would hide a wrong fold)."""
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, **{**KW, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def images(n=24, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def float_logits(qmodel, x):
    qmodel.set_quant_enabled(False)
    try:
        with torch.no_grad():
            return qmodel.model(x)
    finally:
        qmodel.set_quant_enabled(True)


def eye(n):
    return torch.eye(n, dtype=torch.float64)


# --------------------------------------------------------------------------- matrices
@pytest.mark.parametrize("n", [1, 2, 3, 12, 48, 64, 100, 192, 768])
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, eye(n), atol=1e-12)
    assert torch.allclose(h[0], torch.full((n,), n ** -0.5, dtype=torch.float64))  # the mean direction first
    if n & (n - 1) == 0:  # a power of two: a true (Sylvester) Hadamard matrix
        assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    t = OnlineHadamard(n)
    assert max(t.sizes) <= 25 and int(torch.tensor(t.sizes).prod()) == n
    x = torch.randn(2, 5, n, dtype=torch.float64)
    assert torch.allclose(t(x), x @ h, atol=1e-12)  # the online form is the same matrix
    assert t.state_dict() == {}  # rebuilt from n, nothing saved


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal_and_keep_the_mean_direction(kind):
    for d in (48, 192):
        q = residual_rotation(d, kind, torch.Generator().manual_seed(0))
        assert torch.allclose(q @ q.T, eye(d), atol=1e-12)
        assert torch.allclose(q @ torch.ones(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), atol=1e-12)
        assert (q - eye(d)).abs().max() > 0.1  # not the identity
        other = residual_rotation(d, kind, torch.Generator().manual_seed(1))
        assert not torch.allclose(q, other)  # the seed matters
    r = head_rotation(64, kind, torch.Generator().manual_seed(0))
    assert torch.allclose(r @ r.T, eye(64), atol=1e-12)
    if kind == "hadamard":
        assert torch.allclose(r.abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64))
    g = random_orthogonal(7, torch.Generator().manual_seed(3))
    assert torch.allclose(g.T @ g, eye(7), atol=1e-12)


# --------------------------------------------------------------------------- the float function
LAYOUTS = {
    "plain": (ARCH, {}),
    "layer-scale": (ARCH, dict(init_values=0.1)),
    "avg-pool-fc-norm": (ARCH, dict(global_pool="avg", fc_norm=True)),
    "register-tokens": (ARCH, dict(reg_tokens=2, no_embed_class=True)),
    "no-class-token": (ARCH, dict(class_token=False, global_pool="avg")),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind,mlp", [("hadamard", False), ("random", True)])
def test_rotated_tiny_vit_computes_the_unrotated_logits(layout, kind, mlp):
    arch, kw = LAYOUTS[layout]
    model = tiny_vit(arch=arch, **kw)
    x = images(4)
    with torch.no_grad():
        ref = model(x)
    rotated = copy.deepcopy(model)
    q = wrap_model(rotated, QuantConfig(rotation=kind, rotation_mlp=mlp))
    got = float_logits(q, x)
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max().item() + 1e-6), (got - ref).abs().max()
    rep = q.rotation_report
    assert rep["applied"] and rep["rotation"] == kind and rep["dim"] == 48
    assert len(rep["heads"]) == 2 and len(rep["online"]) == (2 if mlp else 0)
    assert "patch_embed.proj" in rep["writers"] and "blocks.1.mlp.fc1" in rep["readers"]
    # the LayerNorms lost their affine (folded into the readers), the weights changed
    norms = [rotated.blocks[i].norm1 for i in range(2)]
    assert all(torch.equal(getattr(n, "norm", n).weight, torch.ones(48)) for n in norms)  # QNorm wraps the norm
    assert not torch.allclose(rotated.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight, atol=1e-3)
    if kw.get("init_values"):
        assert torch.equal(rotated.blocks[0].ls1.gamma, torch.ones(48))


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_the_residual_stream_is_the_rotated_one(kind):
    """The fused weights are Q^T W for the writers (the seeded Q of residual_rotation), so the
    stream entering every block is the float stream times Q, and a planted outlier channel
    spreads over all channels."""
    model = tiny_vit()
    with torch.no_grad():
        model.pos_embed[..., 5] += 50.0  # one huge channel in the residual stream
    rotated = copy.deepcopy(model)
    q = wrap_model(rotated, QuantConfig(rotation=kind, rotation_seed=7))
    rot = residual_rotation(48, kind, torch.Generator().manual_seed(7)).float()
    w0, w1 = model.patch_embed.proj.weight, rotated.patch_embed.proj.weight
    assert torch.allclose(w1.reshape(48, -1), rot.T @ w0.reshape(48, -1), atol=1e-6)
    assert q.model.patch_embed.proj.weight is rotated.patch_embed.proj.weight  # what the QConv2d runs
    x = images(4)
    seen = {}
    for name, m in (("float", model), ("rotated", rotated)):
        m.blocks[0].register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0].detach()))
    q.set_quant_enabled(False)
    with torch.no_grad():
        model(x), rotated(x)
    assert torch.allclose(seen["rotated"], seen["float"] @ rot, atol=1e-4)

    def outlier_ratio(a):
        m = a.abs().reshape(-1, 48).amax(0)
        return (m.max() / m.median()).item()

    assert outlier_ratio(seen["rotated"]) < outlier_ratio(seen["float"]) / 3


def test_real_vit_tiny_rotated_keeps_its_logits():  # about 1 s: not marked slow
    from evolq.data import assets_dir
    from evolq.models import load_model

    root = assets_dir(required=False)
    weights = root / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors" if root else None
    if root is None or not weights.is_file():
        pytest.skip("real assets (ViT-Tiny weights) not found")
    model = load_model(ARCH, weights=weights, hub=False)
    x = images(2, size=224)
    with torch.no_grad():
        ref = model(x)
    q = wrap_model(model, QuantConfig(rotation="hadamard", rotation_mlp=True))
    got = float_logits(q, x)
    assert q.rotation_report["dim"] == 192 and len(q.rotation_report["online"]) == 12
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert torch.equal(got.argmax(1), ref.argmax(1))


# --------------------------------------------------------------------------- starts and regimes
@pytest.mark.parametrize("preset,start", [("fq-vit", "rtn"), ("outlier-aware", "gptq"), ("deploy", "rtn"),
                                          ("deploy", "gptq")])
def test_each_start_runs_on_the_rotated_float_model(preset, start):
    x = images(32)
    base = dict(w_bits=4, start=start)
    plain = prepare_model(tiny_vit(), x, QuantConfig.preset(preset, **base))
    rot_quant = QuantConfig.preset(preset, **base, rotation="hadamard", rotation_mlp=True)
    rot = prepare_model(tiny_vit(), x, rot_quant)
    alone = copy.deepcopy(tiny_vit())
    wrap_model(alone, rot_quant)  # the same rotation, on its own
    qkv = rot.model.blocks[0].attn.qkv
    assert isinstance(qkv, QLinear)
    assert torch.equal(rot.model.patch_embed.proj.weight, alone.patch_embed.proj.weight)
    if preset != "deploy":  # deploy smoothing rescales the Linear inputs again after the rotation
        assert torch.equal(qkv.weight, alone.blocks[0].attn.qkv.weight)
        assert torch.equal(rot.model.blocks[1].mlp.fc2.weight, alone.blocks[1].mlp.fc2.weight)
    with torch.no_grad():
        ref = tiny_vit()(x)
        out_plain, out_rot = plain.model(x), rot.model(x)
    assert torch.allclose(float_logits(rot, x), ref, atol=2e-5)  # the float reference is the user's function
    assert torch.isfinite(out_rot).all() and not torch.allclose(out_rot, out_plain, atol=1e-4)
    assert rot.rotation_report["applied"] and plain.rotation_report is None
    if start == "gptq":
        assert rot.start_report is not None
        wq = rot.model.blocks[0].attn.qkv.weight_quant
        assert wq.weight_delta.abs().sum() > 0  # GPTQ compensated the rotated weights


def test_the_search_runs_on_a_rotated_model_and_reports_it():
    cfg = EvolQConfig.make(w_bits=4, passes=1, cycles=2, infonce_batch=8, eps=0.01, progress=False,
                           rotation="random", rotation_mlp=True)
    qm, rep = quantize_model(tiny_vit(), images(24), cfg, arch=ARCH)
    assert rep["rotation"]["applied"] and rep["rotation"]["online"] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert rep["config"]["quant"]["rotation"] == "random"


def test_the_allocation_builds_its_model_rotated():
    from evolq import AllocationConfig, allocate_bits

    x = images(48)
    cfg = AllocationConfig(budget="avg-bits=3.5", evaluations=24, popsize=8, fitness_images=12, progress=False)
    q, rep = allocate_bits(tiny_vit(), x, QuantConfig(w_bits=3, rotation="hadamard", rotation_mlp=True), cfg, arch="m")
    assert rep["rotation"]["applied"] and rep["config"]["quant"]["rotation"] == "hadamard"
    assert rep["avg_bits"] <= 3.5 + 1e-9
    with torch.no_grad():
        ref = tiny_vit()(x[:4])
    assert torch.allclose(float_logits(q, x[:4]), ref, atol=2e-5)


# --------------------------------------------------------------------------- save / load / export
@pytest.mark.parametrize("preset,kind", [("fq-vit", "random"), ("deploy", "hadamard")])
def test_rotated_model_saves_and_loads(tmp_path, preset, kind):
    x = images(24)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset(preset, w_bits=4, rotation=kind, rotation_mlp=True,
                                                       rotation_seed=3), arch=ARCH)
    folder = save_quantized(q, tmp_path / "model", model_kwargs=KW)
    back = load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(q.model(x), back.model(x))
    assert back.config.rotation == kind and back.rotation_report["online"] == q.rotation_report["online"]
    assert isinstance(back.model.blocks[0].mlp.act, torch.nn.Module) and any(
        isinstance(m, OnlineHadamard) for m in back.model.modules())


def test_the_online_mlp_rotation_exports_to_pt2_and_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from evolq.export import check_onnx, export_onnx, export_pt2, load_pt2

    x = images(24)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset("deploy", w_bits=4, rotation="hadamard", rotation_mlp=True))
    path = export_pt2(q, tmp_path / "m.pt2", example=x[:2])
    with torch.no_grad():
        assert torch.allclose(q.model(x), load_pt2(path).module()(x), atol=1e-5)
    res = check_onnx(q, export_onnx(q, tmp_path / "m.onnx", example=x[:1]), x)
    # float reassociation only: a few activations round to the neighbouring level (as without a rotation)
    assert res["agreement"] == 100.0 and res["mean_abs_diff"] < 5e-3


# --------------------------------------------------------------------------- not applied / bad input
def test_families_without_rotation_points_stay_unrotated_with_a_warning():
    torchvision = pytest.importorskip("torchvision")
    cnn = torchvision.models.resnet18(num_classes=10).eval()
    plain = wrap_model(copy.deepcopy(cnn), QuantConfig()).model.state_dict()  # BatchNorms folded, not rotated
    with pytest.warns(RotationWarning, match="not applied"):
        q = wrap_model(cnn, QuantConfig(rotation="hadamard"))
    assert q.rotation_report["applied"] is False and "resnet" in q.rotation_report["reason"]
    got = q.model.state_dict()
    assert got.keys() == plain.keys() and all(torch.equal(v, plain[k]) for k, v in got.items())
    with pytest.warns(RotationWarning, match="global_pool='max'"):
        q = wrap_model(tiny_vit(global_pool="max"), QuantConfig(rotation="random"))
    assert q.rotation_report["applied"] is False


@pytest.mark.parametrize("kw,match", [
    (dict(rotation="hadamrd"), "unknown rotation 'hadamrd'; choose one of: none, hadamard, random"),
    (dict(rotation=None), "unknown rotation None"),
    (dict(rotation="random", rotation_seed=-1), "rotation_seed must be an integer"),
    (dict(rotation="random", rotation_seed=1.5), "rotation_seed must be an integer"),
    (dict(rotation="random", rotation_mlp="yes"), "rotation_mlp must be true or false"),
    (dict(rotation_mlp=True), "rotation_mlp rotates the MLP hidden on top of a rotation"),
])
def test_bad_rotation_values_are_one_line_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        QuantConfig(**kw)
    assert "\n" not in str(e.value)
    q = QuantConfig()
    for k, v in kw.items():
        setattr(q, k, v)
    with pytest.raises(ConfigError, match=match):
        q.validate()


def test_cli_rotation_flags(capsys):
    from evolq.cli import build_parser, quant_config

    args = build_parser().parse_args(["quantize", "--model", ARCH, "--w-bits", "3", "--a-bits", "8", "--out", "o",
                                      "--rotation", "hadamard", "--rotation-seed", "4", "--rotation-mlp"])
    q = quant_config(args)
    assert (q.rotation, q.rotation_seed, q.rotation_mlp) == ("hadamard", 4, True)
    q = quant_config(build_parser().parse_args(["eval", "--model", ARCH]))
    assert (q.rotation, q.rotation_seed, q.rotation_mlp) == ("none", 0, False)
    rc = main(["eval", "--model", ARCH, "--rotation-mlp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rotation_mlp" in err[0]
