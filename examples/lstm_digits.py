"""Evol-Q beyond vision transformers: a two-layer LSTM reading scikit-learn's
handwritten digits (8x8 images, shipped with scikit-learn) row by row, as a
sequence of 8 steps of 8 pixels.

The example trains the float LSTM (seeded), then quantizes it with the *unchanged*
library: a 30-line adapter (below) wraps the LSTM's input-to-hidden and
hidden-to-hidden matrices and the classifier in ``QLinear`` (weights per output
channel, inputs -- including the recurrent hidden state -- per tensor) and declares
three blocks (LSTM layer 1, LSTM layer 2, classifier); ``quantize_model`` then runs
the same block-wise search (``BlockScaleProblem`` + tournament searcher) as for
ViTs. It prints FP32, start-point and searched test accuracy. Then the library's second problem
family on the same adapter: ``allocate_bits`` (``BitAllocationProblem`` + NSGA-II) chooses 2, 3,
4 or 8 bits per matrix at the uniform model's mean weight bits, and the allocated model's test
accuracy is printed beside the uniform one.

    .venv/bin/python examples/lstm_digits.py                 # ~1 min on 2 cores
    .venv/bin/python examples/lstm_digits.py --quick         # smoke test, a few seconds
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_digits.py, also when loaded by path

import torch
from _digits import accuracy, parse, parser, print_result, split, train
from torch import nn

from evolq import AllocationConfig, Block, EvolQConfig, QModel, allocate_bits, prepare_model, quantize_model
from evolq.adapters import Adapter, register_adapter
from evolq.data import fitness_part
from evolq.qnn.layers import QLinear, quantizers_of
from evolq.quant import UniformQuantizer


# --------------------------------------------------------------------------- the float model
class LSTMLayer(nn.Module):
    """One LSTM layer over (N, T, F) -> (N, T, H), written with two ``nn.Linear`` so its
    matrix products can be quantized (``nn.LSTM`` hides them in one fused kernel)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(in_features, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)

    def forward(self, x):
        n, steps, _ = x.shape
        gx = self.ih(x)  # all steps at once: (N, T, 4H)
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        outs = []
        for t in range(steps):
            i, f, g, o = (gx[:, t] + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1)


class LSTMClassifier(nn.Module):
    def __init__(self, in_features=8, hidden=32, classes=10):
        super().__init__()
        self.layers = nn.ModuleList([LSTMLayer(in_features, hidden), LSTMLayer(hidden, hidden)])
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.fc(x[:, -1])


# --------------------------------------------------------------------------- the adapter
def _wrap(linear: nn.Linear, quant) -> QLinear:
    """QLinear: weights per output channel (the searched scales), input per tensor."""
    wq = UniformQuantizer(quant.w_bits, per_channel=True, ch_axis=0, observer=quant.weight_observer, kind="weight",
                          bias_correction=quant.bias_correction)
    aq = UniformQuantizer(quant.a_bits, signed=False, observer=quant.act_observer, kind="activation")
    return QLinear(linear, wq, aq)


@register_adapter
class LSTMDigitsAdapter(Adapter):
    name = "lstm-digits-example"
    description = "the LSTMClassifier of examples/lstm_digits.py"

    def matches(self, model):
        return isinstance(model, LSTMClassifier)

    def wrap(self, model, quant, arch=""):
        blocks = []
        for i, layer in enumerate(model.layers):
            layer.ih, layer.hh = _wrap(layer.ih, quant), _wrap(layer.hh, quant)
            qs = quantizers_of(layer, f"layers.{i}")
            blocks.append(Block(f"layers.{i}", layer, qs, scopes={
                "attn-weights": [n for n, q in qs.items() if q.kind == "weight"],  # default scope: weight scales
                "block": list(qs)}))
        model.fc = _wrap(model.fc, quant)
        qs = quantizers_of(model.fc, "fc")
        blocks.append(Block("head", lambda h: model.fc(h[:, -1]), qs, scopes={
            "attn-weights": ["fc.weight_quant"], "block": list(qs)}))
        return QModel(model, blocks, self.name, arch, quant)


# --------------------------------------------------------------------------- data, training
def load_digits_sequences(seed: int):
    """Digits as (N, 8 steps, 8 pixels) in [0, 1]; 60% train, 10% calibration pool
    (labels unused), 30% test, stratified."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)  # (1797, 8, 8): rows are time steps
    return split(x, torch.tensor(d.target), seed)


def main(argv=None):
    ap = parser(__doc__, w_bits=3, a_bits=4, epochs=25, passes=4, cycles=60)
    ap.add_argument("--scope", default="block", help="attn-weights (weight scales) or block (all scales)")
    ap.add_argument("--evaluations", type=int, default=200, help="fitness evaluations of the bit allocation")
    args = parse(ap, argv)
    t0 = time.time()
    (xtr, ytr), xcal, (xte, yte) = load_digits_sequences(args.seed)
    model = train(LSTMClassifier(), xtr, ytr, args.epochs, args.seed, lr=1e-2)
    fp32 = accuracy(model, xte, yte)
    print(f"digits as sequences: {len(ytr)} train, {len(xcal)} calibration, {len(yte)} test; "
          f"trained in {time.time() - t0:.0f}s")

    config = EvolQConfig.make(w_bits=args.w_bits, a_bits=args.a_bits, passes=args.passes, cycles=args.cycles,
                           scope=args.scope, infonce_batch=64, holdout=0.2, seed=args.seed, progress=False)
    # the start point, via the adapter, calibrated on the fitness part (the hold-out decides the passes)
    qmodel = prepare_model(copy.deepcopy(model), fitness_part(xcal, config.search), config.quant)
    start = accuracy(qmodel.model, xte, yte)
    t = time.time()
    qmodel, report = quantize_model(qmodel, xcal, config)
    searched = accuracy(qmodel.model, xte, yte)
    kept = [p["kept"] for p in report["passes"]]
    print(f"search: {args.passes} pass(es) x {args.cycles} cycles over {len(qmodel.blocks)} blocks, scope "
          f"{args.scope!r}: {report['evaluations']} evaluations in {time.time() - t:.0f}s, passes kept {kept}")
    out = {**print_result(args, fp32, start, searched), "report": report}
    # per-matrix bit widths at the uniform model's mean weight bits: the same adapter, the second problem family
    t = time.time()
    evals = 20 if args.quick else args.evaluations
    alloc_cfg = AllocationConfig(menu="2,3,4,8", budget=f"avg-bits={args.w_bits}", evaluations=evals, popsize=8,
                                 fitness_images=64, holdout=0.2, seed=args.seed, progress=False)
    amodel, arep = allocate_bits(copy.deepcopy(model), xcal, config.quant, alloc_cfg)
    out["allocated"] = accuracy(amodel.model, xte, yte)
    out["allocation"] = arep["allocation"]
    mix = ", ".join(f"{n}: {b}" for n, b in arep["allocation"].items())
    print(f"bit allocation at {args.w_bits} mean weight bits ({arep['search']['evaluations']} evaluations, "
          f"{time.time() - t:.0f}s): {mix} ({arep['avg_bits']:.2f} bits); test accuracy {out['allocated']:.2f}% "
          f"against uniform W{args.w_bits}A{args.a_bits} {start:.2f}%")
    return out


if __name__ == "__main__":
    main()
