"""The worked example of docs/adapters.md: an adapter for a new architecture.

A tiny ConvNet (two convolutions and a classifier) is trained on scikit-learn's
8x8 handwritten digits, then quantized with ``quantize_model`` through the adapter
below. The adapter is all it takes: wrap the layers with quantizers, split the
model into blocks that run one after another, name each block's searchable scales
per scope, and register it.

    .venv/bin/python examples/custom_adapter.py            # ~30 s on 2 cores
    .venv/bin/python examples/custom_adapter.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from evolq import Block, EvolQConfig, QModel, prepare_model, quantize_model
from evolq.adapters import Adapter, register_adapter
from evolq.layers import QConv2d, QLinear, quantizers_of
from evolq.quant import UniformQuantizer


class TinyConvNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x):  # (N, 1, 8, 8) -> (N, classes)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


# ---------------------------------------------------------------------- the adapter
def weight_quantizer(cfg):
    """Per-output-channel weights: these scales are what the search changes by default."""
    return UniformQuantizer(cfg.w_bits, per_channel=True, ch_axis=0, observer=cfg.weight_observer,
                            kind="weight", bias_correction=cfg.bias_correction)


def input_quantizer(cfg):
    """Per-tensor activations (a population of scales is applied per candidate's sample slice)."""
    return UniformQuantizer(cfg.a_bits, signed=False, observer=cfg.act_observer, kind="activation")


def scopes(quantizers: dict) -> dict:
    """Scope name -> quantizers searched under it. "attn-weights" is the default scope
    (SearchConfig.scope): here, as for the built-in CNN adapters, the weight scales."""
    return {"attn-weights": [n for n, q in quantizers.items() if q.kind == "weight"],
            "block": [n for n, q in quantizers.items() if q.searchable]}


@register_adapter
class TinyConvNetAdapter(Adapter):
    name = "tiny-convnet"
    description = "the TinyConvNet of examples/custom_adapter.py"

    def matches(self, model):
        return isinstance(model, TinyConvNet)

    def quantize(self, model, cfg, arch=""):
        model.eval()
        # 1. wrap every layer that multiplies (in place; the wrappers keep the parameters)
        model.conv1 = QConv2d(model.conv1, weight_quantizer(cfg), input_quantizer(cfg))
        model.conv2 = QConv2d(model.conv2, weight_quantizer(cfg), input_quantizer(cfg))
        model.fc = QLinear(model.fc, weight_quantizer(cfg), input_quantizer(cfg))
        # 2. blocks that, run in order, equal model(x); each owns its quantizers by qualified name
        runs = {"conv1": lambda x: F.relu(model.conv1(x)),
                "conv2": lambda x: F.relu(model.conv2(x)),
                "fc": lambda x: model.fc(x.flatten(1))}
        blocks = []
        for name, run in runs.items():
            qs = quantizers_of(getattr(model, name), name)
            blocks.append(Block(name, run, qs, scopes(qs)))
        return QModel(model, blocks, self.name, arch, cfg)


# ---------------------------------------------------------------------- use it
def load_digits_images(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(d.target)
    idx = torch.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=y)
    tr, ca = train_test_split(tr, test_size=1 / 7, random_state=seed, stratify=y[tr])
    return (x[tr], y[tr]), x[ca], (x[te], y[te])


def train(model, x, y, epochs, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item() * 100


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--w-bits", type=int, default=2)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 1 pass x 3 cycles")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.passes, args.cycles = 1, 1, 3
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    (xtr, ytr), xcal, (xte, yte) = load_digits_images(args.seed)
    model = train(TinyConvNet(), xtr, ytr, args.epochs, args.seed)
    fp32 = accuracy(model, xte, yte)

    cfg = EvolQConfig.make(w_bits=args.w_bits, a_bits=args.a_bits, passes=args.passes, cycles=args.cycles,
                           infonce_batch=64, holdout=0.2, seed=args.seed, progress=False)
    qmodel = prepare_model(copy.deepcopy(model), xcal, cfg.quant)  # finds TinyConvNetAdapter, calibrates
    with torch.no_grad():  # the contract every adapter must keep
        assert torch.equal(qmodel.run_blocks(xte[:4]), qmodel.model(xte[:4]))
    start = accuracy(qmodel.model, xte, yte)
    qmodel, report = quantize_model(qmodel, xcal, cfg)
    searched = accuracy(qmodel.model, xte, yte)
    print(f"adapter {qmodel.family!r}: blocks {[b.name for b in qmodel.blocks]}; {report['evaluations']} "
          f"evaluations, passes kept {[p['kept'] for p in report['passes']]}, {time.time() - t0:.0f}s in all")
    print(f"test accuracy  FP32 {fp32:.2f}%   W{args.w_bits}A{args.a_bits} start {start:.2f}%   "
          f"W{args.w_bits}A{args.a_bits} Evol-Q {searched:.2f}%")
    return {"fp32": fp32, "start": start, "searched": searched, "report": report}


if __name__ == "__main__":
    main()
