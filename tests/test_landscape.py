"""Loss landscapes: directions, roughness, grid evaluation agrees with single evaluations."""
import json

import pytest
import timm
import torch

from evolq import prepare_model
from evolq.config import QuantConfig
from evolq.errors import ConfigError
from evolq.landscape import block_landscape, directions, landscape_space, resolve_block, roughness, save_landscape
from evolq.losses import mse


def _qvit():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=32, patch_size=8,
                          embed_dim=48, num_heads=3, num_classes=10).eval()
    x = torch.randn(12, 3, 32, 32)
    return prepare_model(m, x, QuantConfig(w_bits=4)), x


def test_directions_orthogonal_unit_rms_and_seeded():
    u, v = directions(500, seed=3)
    assert abs(float(u @ v)) < 1e-3 * 500
    assert torch.allclose(u.pow(2).mean(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(v.pow(2).mean(), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(directions(500, seed=3)[0], u) and not torch.equal(directions(500, seed=4)[0], u)


def test_roughness_separates_smooth_from_jagged():
    a = torch.linspace(-1, 1, 9)
    smooth = a[:, None] ** 2 + a[None, :] ** 2
    jagged = smooth + 0.5 * torch.tensor([[(-1) ** (i + j) for j in range(9)] for i in range(9)])
    assert roughness(a[:, None] + a[None, :]) == pytest.approx(0.0, abs=1e-12)  # a plane
    assert 0 < roughness(smooth) < roughness(jagged)
    assert roughness(3 * smooth + 7) == pytest.approx(roughness(smooth))  # scale free
    assert roughness(torch.zeros(5, 5)) == 0.0


def test_grid_matches_single_evaluations_and_leaves_scales(tmp_path):
    qm, x = _qvit()
    idx = resolve_block(qm, 1)
    assert qm.blocks[idx].name == "blocks.1" and resolve_block(qm, -1) == resolve_block(qm, "blocks.2")
    space = landscape_space(qm, idx, "fc1")
    assert space.names == ["blocks.1.mlp.fc1.weight_quant"]
    s0 = space.vector()
    xe, ye = x[:6], torch.arange(6) % 10
    res = block_landscape(qm, x, xe, ye, block=1, layer="fc1", grid=3, radius=0.2, losses=("mse",),
                          infonce_batch=6)
    assert torch.equal(space.vector(), s0)  # the model is unchanged
    assert set(res["surfaces"]) == {"calib_mse", "eval_infonce", "eval_ce", "eval_top1"}
    # the centre of the grid is the unperturbed model; a corner equals installing its scales
    qm.set_quant_enabled(False)
    ref = qm.run_blocks(x)
    qm.set_quant_enabled(True)
    assert res["surfaces"]["calib_mse"][1][1] == pytest.approx(mse(qm.run_blocks(x)[None], ref).item(), rel=1e-5)
    u, v = directions(len(space), 0)
    space.write(s0 * (1 + 0.2 * u - 0.2 * v))
    corner = mse(qm.run_blocks(x)[None], ref).item()
    space.write(s0)
    assert res["surfaces"]["calib_mse"][2][0] == pytest.approx(corner, rel=1e-5)
    assert len({round(z, 9) for row in res["surfaces"]["calib_mse"] for z in row}) > 1
    js, png = save_landscape(res, tmp_path / "ls")
    assert json.loads(js.read_text())["grid"] == 3 and png.stat().st_size > 1000


def test_bad_landscape_arguments():
    qm, x = _qvit()
    with pytest.raises(ConfigError, match="no scales for 'nope'"):
        landscape_space(qm, resolve_block(qm, 0), "nope")
    with pytest.raises(ConfigError, match="no block named"):
        resolve_block(qm, "blocks.9")
    with pytest.raises(ConfigError, match="grid"):
        block_landscape(qm, x, block=0, grid=2)
