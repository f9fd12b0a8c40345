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

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_digits.py, also when loaded by path

import torch
import torch.nn.functional as F
from _digits import accuracy, parse, parser, print_result, split, train
from torch import nn

from evolq import Block, EvolQConfig, QModel, prepare_model, quantize_model
from evolq.adapters import Adapter, register_adapter
from evolq.data import fitness_part
from evolq.qnn.layers import QConv2d, QLinear, quantizers_of
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
def weight_quantizer(quant):
    """Per-output-channel weights: these scales are what the search changes by default."""
    return UniformQuantizer(quant.w_bits, per_channel=True, ch_axis=0, observer=quant.weight_observer,
                            kind="weight", bias_correction=quant.bias_correction)


def input_quantizer(quant):
    """Per-tensor activations (a population of scales is applied per candidate's sample slice)."""
    return UniformQuantizer(quant.a_bits, signed=False, observer=quant.act_observer, kind="activation")


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

    def wrap(self, model, quant, arch=""):
        model.eval()
        # 1. wrap every layer that multiplies (in place; the wrappers keep the parameters)
        model.conv1 = QConv2d(model.conv1, weight_quantizer(quant), input_quantizer(quant))
        model.conv2 = QConv2d(model.conv2, weight_quantizer(quant), input_quantizer(quant))
        model.fc = QLinear(model.fc, weight_quantizer(quant), input_quantizer(quant))
        # 2. blocks that, run in order, equal model(x); each owns its quantizers by qualified name
        runs = {"conv1": lambda x: F.relu(model.conv1(x)),
                "conv2": lambda x: F.relu(model.conv2(x)),
                "fc": lambda x: model.fc(x.flatten(1))}
        blocks = []
        for name, run in runs.items():
            qs = quantizers_of(getattr(model, name), name)
            blocks.append(Block(name, run, qs, scopes(qs)))
        return QModel(model, blocks, self.name, arch, quant)


# ---------------------------------------------------------------------- use it
def load_digits_images(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    return split(x, torch.tensor(d.target), seed)


def main(argv=None):
    args = parse(parser(__doc__, w_bits=2, a_bits=4, epochs=15, passes=3, cycles=40), argv)
    t0 = time.time()
    (xtr, ytr), xcal, (xte, yte) = load_digits_images(args.seed)
    model = train(TinyConvNet(), xtr, ytr, args.epochs, args.seed, lr=3e-3)
    fp32 = accuracy(model, xte, yte)

    config = EvolQConfig.make(w_bits=args.w_bits, a_bits=args.a_bits, passes=args.passes, cycles=args.cycles,
                           infonce_batch=64, holdout=0.2, seed=args.seed, progress=False)
    # finds TinyConvNetAdapter; calibrates on the fitness part (the hold-out decides the passes)
    qmodel = prepare_model(copy.deepcopy(model), fitness_part(xcal, config.search), config.quant)
    with torch.no_grad():  # the contract every adapter must keep
        assert torch.equal(qmodel.run_blocks(xte[:4]), qmodel.model(xte[:4]))
    start = accuracy(qmodel.model, xte, yte)
    qmodel, report = quantize_model(qmodel, xcal, config)
    searched = accuracy(qmodel.model, xte, yte)
    print(f"adapter {qmodel.family!r}: blocks {[b.name for b in qmodel.blocks]}; {report['evaluations']} "
          f"evaluations, passes kept {[p['kept'] for p in report['passes']]}, {time.time() - t0:.0f}s in all")
    return {**print_result(args, fp32, start, searched), "report": report}


if __name__ == "__main__":
    main()
