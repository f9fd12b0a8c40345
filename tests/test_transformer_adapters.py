"""Adapters for transformer families beyond timm ViT: timm Swin (shifted windows,
patch merging), timm LeViT (linear and conv mode, BatchNorms folded, distilled head)
and torchvision's VisionTransformer (nn.MultiheadAttention with a packed in_proj).

Each family runs on a tiny randomly initialised config: layer coverage, block
ownership and scopes, the block view running like the model (quantizers off and
on), population-mode fitness equal to evaluating each candidate alone, a state-dict
round trip into a freshly quantized model, and a tiny end-to-end search."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# --------------------------------------------------------------------------- tiny models
from tiny_models import tiny_levit as _levit  # noqa: E402  (tests/tiny_models.py)
from tiny_models import tiny_swin as _swin  # noqa: E402
from tiny_models import tiny_torchvision_vit as _tv_vit  # noqa: E402

from evolq.adapters import adapter_for, wrap_model  # noqa: E402
from evolq.api import quantize_model  # noqa: E402
from evolq.config import EvolQConfig, QuantConfig  # noqa: E402
from evolq.errors import UnsupportedModelError  # noqa: E402
from evolq.fitness import BlockFitness  # noqa: E402
from evolq.qnn.calibrate import calibrate  # noqa: E402
from evolq.qnn.layers import QAct, QConv2d, QLinear, QNorm, quantizers_of  # noqa: E402
from evolq.qnn.scales import ScaleSpace  # noqa: E402
from evolq.quant import PTFQuantizer, UniformQuantizer  # noqa: E402

FAMILIES = {  # id -> (builder, image size, adapter name, block names)
    "swin": (_swin, 32, "swin", ["stem", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
                                 "layers.1.blocks.0", "layers.1.blocks.1", "head"]),
    "levit": (_levit, 64, "levit", ["stem", "stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "head"]),
    "levit_conv": (lambda s: _levit(s, use_conv=True), 64, "levit",
                   ["stem", "stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "head"]),
    "torchvision_vit": (_tv_vit, 32, "torchvision_vit",
                        ["stem", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "head"]),
}
ALL = list(FAMILIES)


def build(family, seed=0):
    return FAMILIES[family][0](seed).eval()


def images(family, n, seed=1):
    s = FAMILIES[family][1]
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def quantized(family, cfg=None, calib=True, seed=0):
    model = build(family, seed)
    float_model = copy.deepcopy(model)
    qm = wrap_model(model, cfg or QuantConfig(), family)
    if calib:
        calibrate(qm, images(family, 8, seed=2))
    return qm, float_model


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("family", ALL)
def test_every_layer_wrapped_and_owned_once(family):
    model = build(family)
    assert adapter_for(model).name == FAMILIES[family][2]
    params = dict(model.named_parameters())
    lin_conv = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    mhas = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    n_norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    n_acts = sum(isinstance(m, (nn.GELU, nn.Hardswish)) for m in model.modules())
    n_attn = sum(type(m).__name__ in ("WindowAttention", "Attention", "AttentionDownsample", "MultiheadAttention")
                 for m in model.modules())

    qm = wrap_model(model, QuantConfig(), family)
    assert [b.name for b in qm.blocks] == FAMILIES[family][3]
    wrapped = [(n, m) for n, m in qm.model.named_modules() if isinstance(m, (QLinear, QConv2d))]
    # one quantized layer per Linear/Conv (plus the packed in_proj of each MultiheadAttention)
    assert len(wrapped) == len(lin_conv) + len(mhas)
    for name, m in wrapped:
        assert isinstance(m.weight_quant, UniformQuantizer) and m.weight_quant.kind == "weight", name
    # no bare Linear/Conv2d runs outside a wrapper, no BatchNorm is left (LeViT folds them)
    for name, m in qm.model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert isinstance(qm.model.get_submodule(name.rpartition(".")[0]), QConv2d), name
        assert not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.MultiheadAttention)), name
    if family.startswith("levit"):  # folded: same paths, new (folded) weights with a bias
        folded = {n.rpartition(".")[0] for n in lin_conv}  # ...qkv.linear -> ...qkv
        assert {n for n, _ in wrapped} == folded
        assert all(m.bias is not None for _, m in wrapped)
        # the distilled model's two classifiers both sit in the head block (averaged in eval)
        assert {"head.weight_quant", "head_dist.weight_quant"} <= set(qm.blocks[-1].quantizers)
    else:  # the original parameters, not copies
        for name in lin_conv:
            assert qm.model.get_submodule(name).weight is params[f"{name}.weight"], name
        for name in mhas:
            assert qm.model.get_submodule(f"{name}.in_proj").weight is params[f"{name}.in_proj_weight"]
    qs = quantizers_of(qm.model)
    # every LayerNorm input is quantized (PTF), every GELU/Hardswish output is quantized
    assert sum(isinstance(q, PTFQuantizer) for q in qs.values()) == n_norms
    assert sum(isinstance(m, QNorm) for m in qm.model.modules()) == n_norms
    assert sum(isinstance(m, QAct) for m in qm.model.modules()) == n_acts
    for suffix in ("q_quant", "k_quant", "v_quant", "probs_quant"):
        assert sum(n.endswith(suffix) for n in qs) == n_attn > 0, suffix

    # every quantizer belongs to exactly one block, under its qualified name
    owners: dict[int, str] = {}
    for b in qm.blocks:
        for name, q in b.quantizers.items():
            assert qs[name] is q
            assert id(q) not in owners, (name, b.name, owners.get(id(q)))
            owners[id(q)] = b.name
            if b.name not in ("stem", "head"):
                assert name.startswith(b.name + "."), name
    assert set(owners) == {id(q) for q in qs.values()}
    # scopes: every block between stem and head is searched; attn-weights are weight quantizers
    searched = [b for b in qm.blocks if b.scopes.get("block")]
    assert [b.name for b in searched] == FAMILIES[family][3][1:-1]
    n_attn_scoped = 0
    for b in searched:
        aw, blk = b.searched("attn-weights"), b.searched("block")
        assert set(aw) <= set(blk) and all(q.searchable for q in blk.values())
        assert all(isinstance(q, UniformQuantizer) and q.kind == "weight" for q in aw.values())
        n_attn_scoped += bool(aw)
    assert n_attn_scoped == n_attn
    for b in (qm.blocks[0], qm.blocks[-1]):
        assert not b.scopes.get("attn-weights") and not b.scopes.get("block")
    with pytest.raises(Exception, match="already quantized"):
        wrap_model(qm.model, QuantConfig(), family)


def test_unsupported_model_error_lists_families():
    with pytest.raises(UnsupportedModelError) as e:
        adapter_for(nn.Sequential(nn.Linear(2, 2)))
    msg = str(e.value)
    for part in ("swin (timm Swin Transformer v1)", "levit (timm LeViT and LeViT-conv)",
                 "torchvision_vit (torchvision VisionTransformer, e.g. torchvision:vit_b_16)"):
        assert part in msg, msg
    assert "object at 0x" not in msg and "\n" not in msg


def test_swin_config_exercises_shifted_windows_and_merging():
    """The tiny Swin must really contain a masked (shifted) block and a patch merging,
    otherwise the equality tests below would not cover them."""
    m = build("swin")
    assert any(b.attn_mask is not None and any(b.shift_size) for s in m.layers for b in s.blocks)
    assert type(m.layers[1].downsample).__name__ == "PatchMerging"


# --------------------------------------------------------------------------- block view
@pytest.mark.parametrize("preset", ["fq-vit", "outlier-aware"])
@pytest.mark.parametrize("family", ALL)
def test_run_blocks_equals_model(family, preset):
    qm, float_model = quantized(family, QuantConfig.preset(preset))
    x = images(family, 3, seed=5)
    with torch.no_grad():
        ref = float_model(x)
        out_q = qm.model(x)
        torch.testing.assert_close(qm.run_blocks(x), out_q, rtol=0, atol=0)
        k = len(qm.blocks) // 2
        torch.testing.assert_close(qm.run_blocks(qm.run_blocks(x, 0, k), k), out_q, rtol=0, atol=0)
        qm.set_quant_enabled(False)
        torch.testing.assert_close(qm.run_blocks(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(qm.model(x), ref, rtol=1e-4, atol=1e-5)
        qm.set_quant_enabled(True)
    # quantization is really on, yet W8A8 stays close to float. Measured for seeds 0..2:
    # max error / max |logit| 0.016-0.021 (swin), 0.008-0.011 (levit, both modes),
    # 0.015-0.024 (torchvision); logit cosine >= 0.9997
    err = (out_q - ref).abs().max() / ref.abs().max()
    assert 1e-3 < err < 0.1, err
    assert nn.functional.cosine_similarity(out_q, ref, dim=1).mean() > 0.99


@pytest.mark.parametrize("family", ALL)
def test_state_dict_round_trip_into_fresh_structure(family):
    """What load_quantized does: quantize a fresh model of the same architecture and
    load the saved tensors (LeViT: the folded weights) strictly."""
    qm, _ = quantized(family)
    fresh = wrap_model(build(family, seed=9), QuantConfig(), family)
    fresh.model.load_state_dict(qm.model.state_dict(), strict=True)
    x = images(family, 2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x), qm.model(x), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["fq-vit", "outlier-aware"])
@pytest.mark.parametrize("family", ALL)
def test_population_fitness_matches_per_candidate(family, preset):
    """Candidates evaluated together (P*B batch through the searched block and every
    block after it: window partitions, patch merging, subsampling, heads) give the
    outputs of installing each candidate alone."""
    qm, _ = quantized(family, QuantConfig.preset(preset))
    idx = 1  # first searched block: everything downstream runs in population mode
    space = ScaleSpace(qm.blocks[idx].searched("block"))  # weights, activations and PTF scales
    x = images(family, 4, seed=7)
    with torch.no_grad():
        fit = BlockFitness(qm, x, qm.run_blocks(x), loss=None, max_batch=8)  # 2 candidates per chunk
        base = space.vector()
        g = torch.Generator().manual_seed(3)
        cands = base * (1 + 0.2 * (torch.rand(3, base.numel(), generator=g) - 0.5))
        out = fit.outputs(idx, space, cands)
        assert out.shape == (3, 4, 10)
        for p in range(3):
            space.write(cands[p])
            torch.testing.assert_close(out[p], qm.run_blocks(x), rtol=1e-4, atol=1e-5)
        space.write(base)
    assert all(q.pop_scale is None for q in qm.quantizers().values())
    assert not torch.allclose(out[0], out[1], atol=1e-6)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family", ["swin", "levit", "torchvision_vit"])
def test_quantize_model_tiny_search(family):
    model = build(family)
    x = images(family, 20, seed=11)
    cfg = EvolQConfig.make(passes=1, cycles=2, infonce_batch=8, holdout=0.2, progress=False)
    qm, report = quantize_model(model, x, cfg, arch=family)
    assert qm.family == FAMILIES[family][2]
    searched = [b.name for b in qm.blocks if b.scopes.get("attn-weights")]
    assert [r["block"] for r in report["blocks"]] == searched[::-1]  # last block first
    assert report["calibration"] == {"fitness_samples": 16, "holdout_samples": 4, "holdout_metric": "kl"}
    assert report["evaluations"] > 0 and len(report["passes"]) == 1
    for r in report["blocks"]:
        assert r["final_fitness"] <= r["start_fitness"] + 1e-9
    with torch.no_grad():
        y = qm.model(x[:4])
        torch.testing.assert_close(qm.run_blocks(x[:4]), y, rtol=0, atol=0)
    assert y.shape == (4, 10) and torch.isfinite(y).all()


def test_edge_bits_cover_both_levit_heads():
    """A distilled LeViT's classifier is two heads: ``edge_bits`` raises both (and the first conv)."""
    from evolq.qnn.builder import edge_layers

    qm = wrap_model(_levit(0).eval(), QuantConfig(w_bits=4, a_bits=8, edge_bits=8))
    edges = edge_layers(qm.model)
    assert [n for n, _ in edges] == ["stem.conv1", "head", "head_dist"]
    assert all(m.weight_quant.bits == 8 for _, m in edges)
    rest = [m for m in qm.model.modules() if isinstance(m, (QLinear, QConv2d)) and all(m is not e for _, e in edges)]
    assert rest and {m.weight_quant.bits for m in rest} == {4}
