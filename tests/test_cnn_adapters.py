"""CNN adapters (timm EfficientNet, torchvision ResNet): BatchNorm folding, layer
coverage, block ownership, population mode through CNN blocks (depthwise and
"same"-padded convs included), an end-to-end search, and save/load. Random
weights only: mechanics, not accuracy (benchmarks/suites/efficientnet.py has the real model)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from tiny_models import randomize_bn as _randomize_bn  # noqa: E402  (tests/tiny_models.py)

from evolq import EvolQConfig, QuantConfig, UnsupportedModelError, load_quantized, quantize_model, save_quantized  # noqa: E402
from evolq.adapters import wrap_model  # noqa: E402
from evolq.data import fitness_part  # noqa: E402
from evolq.fitness import BlockFitness, reference_outputs  # noqa: E402
from evolq.losses import mse  # noqa: E402
from evolq.qnn.calibrate import calibrate  # noqa: E402
from evolq.qnn.fold import FoldedBNAct, fold_bn  # noqa: E402
from evolq.qnn.layers import QConv2d, QConv2dSame, QLinear, quantizers_of  # noqa: E402
from evolq.qnn.scales import ScaleSpace  # noqa: E402

FAMILIES = {
    # tf_ variant: TF "SAME" padding (Conv2dSame) in the stem and stride-2 depthwise convs
    "efficientnet": lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10),
    "efficientnet_se": lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10),
    "resnet": lambda: torchvision.models.resnet18(num_classes=10),
}


def make(family, seed=0):
    torch.manual_seed(seed)
    return _randomize_bn(FAMILIES[family]().eval(), seed)


def images(n, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_conv_and_linear_is_wrapped_and_bn_folded(family):
    model = make(family)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    weights = {n: m.weight for n, m in targets.items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    qm = wrap_model(model, QuantConfig(w_bits=4), family)
    assert qm.family == family.split("_")[0]
    n_same = 0
    for name, orig in targets.items():
        wrapped = qm.model.get_submodule(name)
        if isinstance(orig, nn.Conv2d):
            assert isinstance(wrapped, QConv2d), name
            same = type(orig).__name__ == "Conv2dSame"
            n_same += same
            assert isinstance(wrapped, QConv2dSame) == same, name
            assert wrapped.bias is not None, name  # BatchNorm folded in (or the conv's own bias)
        else:
            assert isinstance(wrapped, QLinear), name
        assert wrapped.weight is weights[name]  # the original parameter, not a copy
        assert wrapped.weight_quant.kind == "weight" and wrapped.weight_quant.bits == 4
        assert wrapped.weight_quant.per_channel and wrapped.weight_quant.ch_axis == 0
        assert not isinstance(wrapped.input_quant, nn.Identity), name  # every input quantized
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qm.model.modules())
    assert n_bn > 0
    if family == "efficientnet":
        assert n_same >= 5  # stem + the stride-2 depthwise convs
        assert any(isinstance(m, FoldedBNAct) for m in qm.model.modules())
    # every quantizer belongs to exactly one block, under its qualified name
    in_model = quantizers_of(qm.model)
    owned = {}
    for b in qm.blocks:
        for n, q in b.quantizers.items():
            assert in_model[n] is q and n not in owned
            owned[n] = b.name
    assert set(owned) == set(in_model)
    assert qm.blocks[0].name == "stem" and qm.blocks[-1].name == "head"
    # default scope: the weight scales of every conv/linear, in every block
    n_w = 0
    for b in qm.blocks:
        ws = b.searched("attn-weights")
        assert ws and all(q.kind == "weight" for q in ws.values())
        assert set(ws) < set(b.searched("block"))
        assert list(b.searched("weights")) == list(ws)  # a CNN has no attention: the two scopes agree
        n_w += len(ws)
    assert n_w == len(targets)
    with pytest.raises(Exception, match="already quantized"):
        wrap_model(qm.model, QuantConfig(), family)


@pytest.mark.parametrize("family", ["efficientnet", "resnet"])
def test_folded_float_model_equals_original_and_blocks_compose(family):
    model = make(family)
    float_model = copy.deepcopy(model)
    qm = wrap_model(model, QuantConfig(w_bits=4, a_bits=8), family)
    calibrate(qm, images(8, seed=2))
    x = images(3, seed=5)
    with torch.no_grad():
        ref = float_model(x)
        out_q = qm.model(x)
        torch.testing.assert_close(qm.run_blocks(x), out_q, rtol=0, atol=0)
        half = len(qm.blocks) // 2
        torch.testing.assert_close(qm.run_blocks(qm.run_blocks(x, 0, half), half), out_q, rtol=0, atol=0)
        qm.set_quant_enabled(False)
        torch.testing.assert_close(qm.model(x), ref, rtol=1e-4, atol=1e-4)  # folding keeps the function
        qm.set_quant_enabled(True)
    assert not torch.allclose(out_q, ref, atol=1e-3)  # quantization is on


def test_fold_bn_matches_conv_then_bn():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), _randomize_bn(nn.BatchNorm2d(6).eval(), 3)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = bn(conv(x))
        assert isinstance(fold_bn(conv, bn), nn.Identity)
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedModelError):
        fold_bn(nn.Conv2d(4, 6, 1), nn.LayerNorm(6))


def test_custom_conv_forward_is_refused():
    class WeirdConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torchvision.models.resnet18(num_classes=10).eval()
    model.layer1[0].conv2 = WeirdConv(64, 64, 3, padding=1, bias=False)
    with pytest.raises(UnsupportedModelError, match="layer1.0.conv2"):
        wrap_model(model, QuantConfig(), "resnet")


@pytest.mark.parametrize("family,block", [("efficientnet", "blocks.1.0"), ("efficientnet", "blocks.1.1"),
                                          ("efficientnet", "stem"), ("resnet", "layer2.0")])
def test_population_fitness_equals_per_candidate(family, block):
    """Batched fitness of P candidates == each candidate installed and evaluated alone
    (efficientnet blocks.1.0: stride-2 "same"-padded depthwise conv; blocks.1.1: plain
    depthwise QConv2d, groups > 1, with a residual add; stem: "same"-padded conv on the
    image; resnet layer2.0: downsampling shortcut conv)."""
    qm = wrap_model(make(family), QuantConfig(w_bits=4, a_bits=8), family)
    calibrate(qm, images(8, seed=2))
    idx = [b.name for b in qm.blocks].index(block)
    if block.startswith("blocks."):  # a depthwise conv runs as a grouped conv of P x channels groups
        assert any(m.conv.groups > 1 for m in qm.model.get_submodule(block).modules() if isinstance(m, QConv2d))
    space = ScaleSpace(qm.blocks[idx].searched("block"))  # weight and activation scales
    x = images(6, seed=3)
    fit = BlockFitness(qm, x, reference_outputs(qm, x), mse, max_batch=10)  # forces chunking
    base = space.vector()
    g = torch.Generator().manual_seed(4)
    cands = base * (1 + 0.2 * (torch.rand(4, base.numel(), generator=g) - 0.5))
    batched = fit(idx, space, cands)
    alone = []
    for c in cands:
        space.write(c)
        alone.append(fit(idx, space, space.vector().unsqueeze(0))[0])
    space.write(base)
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-8)
    assert len(set(batched.tolist())) == 4  # the candidates really differ


@pytest.mark.parametrize("family", ["efficientnet", "resnet"])
def test_quantize_model_end_to_end(family):
    qmodel = wrap_model(make(family), QuantConfig(w_bits=4, a_bits=8), family)
    calib = images(20, seed=6)
    cfg = EvolQConfig.make(w_bits=4, passes=1, cycles=2, infonce_batch=8, holdout=0.2, progress=False)
    calibrate(qmodel, fitness_part(calib, cfg.search))  # the hold-out never calibrates
    before = ScaleSpace(qmodel.quantizers()).vector()
    qmodel, rep = quantize_model(qmodel, calib, cfg)
    assert [b["block"] for b in rep["blocks"]] == [b.name for b in reversed(qmodel.blocks)]  # last first
    assert rep["calibration"] == {"fitness_samples": 16, "holdout_samples": 4, "holdout_metric": "kl"}
    assert rep["evaluations"] >= 2 * len(qmodel.blocks)
    for b in rep["blocks"]:
        assert b["final_fitness"] <= b["start_fitness"]
    assert len(rep["passes"]) == 1
    after = ScaleSpace(qmodel.quantizers()).vector()
    if rep["passes"][0]["kept"] and any(b["final_fitness"] < b["start_fitness"] for b in rep["blocks"]):
        assert not torch.equal(before, after)
    else:
        assert torch.equal(before, after)
    x = images(2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(qmodel.run_blocks(x), qmodel.model(x), rtol=0, atol=0)


def test_resnet_save_load_round_trip(tmp_path):
    """Loading re-folds a fresh random model, then loads the folded, searched tensors."""
    model = _randomize_bn(torchvision.models.resnet18().eval(), 1)
    qm = wrap_model(model, QuantConfig(w_bits=4), "torchvision:resnet18")
    calibrate(qm, images(4, seed=2))
    save_quantized(qm, tmp_path / "r18")
    loaded = load_quantized(tmp_path / "r18")
    assert loaded.family == "resnet" and [b.name for b in loaded.blocks] == [b.name for b in qm.blocks]
    x = images(2, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), qm.model(x), rtol=0, atol=0)
