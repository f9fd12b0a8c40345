"""Smoke tests of the examples that reuse the search beyond vision models (LSTM,
GNN, a custom adapter): each trains a tiny float model, quantizes it and runs a
tiny search (``--quick``) in-process."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _clean_registry():
    from evolq.adapters import ADAPTERS

    with ADAPTERS.scoped():  # examples register their own adapters on import
        yield


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["lstm_digits", "gnn_digits_knn", "custom_adapter"])
def test_example_runs_quick(name, capsys):
    out = _load(name).main(["--quick"])
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "Evol-Q" in printed
    for key in ("fp32", "start", "searched"):
        assert 0.0 <= out[key] <= 100.0 and math.isfinite(out[key])
    assert out["fp32"] > 30.0  # trained at least a little (10 classes: chance is 10%)
    passes = out["passes"] if "passes" in out else out["report"]["passes"]
    assert len(passes) == 1
    if name == "lstm_digits":  # the bit allocation on the same adapter
        assert 0.0 <= out["allocated"] <= 100.0 and "bit allocation" in printed
        assert set(out["allocation"]) == {"layers.0.ih", "layers.0.hh", "layers.1.ih", "layers.1.hh", "fc"}


def test_custom_adapter_is_found_and_blocks_compose():
    mod = _load("custom_adapter")
    from evolq import QuantConfig
    from evolq.adapters import adapter_for, wrap_model
    from evolq.qnn.calibrate import calibrate

    torch.manual_seed(0)
    model = mod.TinyConvNet().eval()
    assert adapter_for(model).name == "tiny-convnet"
    qm = wrap_model(model, QuantConfig(w_bits=4), "")
    x = torch.rand(6, 1, 8, 8)
    calibrate(qm, x)
    with torch.no_grad():
        torch.testing.assert_close(qm.run_blocks(x), qm.model(x), rtol=0, atol=0)
    assert [b.name for b in qm.blocks] == ["conv1", "conv2", "fc"]
    assert all(b.scopes["attn-weights"] == [f"{b.name}.weight_quant"] for b in qm.blocks)


def test_gnn_tree_samples_equal_full_graph_sage():
    """The 2-hop computation tree of a node gives the node's full-graph GraphSAGE output."""
    mod = _load("gnn_digits_knn")
    k = 3
    x, y, tr, ca, te = mod.knn_graph_trees(k, 0)
    torch.manual_seed(0)
    model = mod.GraphSAGE(k, hidden=8).eval()
    feats = x[:, 0]  # the root of each tree is the node itself
    nbr = x[:, 1:k + 1]  # (N, k, F) neighbour features; recover neighbour ids by matching rows
    ids = torch.cdist(nbr.reshape(-1, 64), feats).argmin(1).reshape(-1, k)
    with torch.no_grad():
        h1 = model.sage1.lin(torch.cat([feats, feats[ids].mean(1)], -1)).relu()
        full = model.sage2.lin(torch.cat([h1, h1[ids].mean(1)], -1))
        torch.testing.assert_close(model(x[:50]), full[:50], rtol=1e-5, atol=1e-5)
