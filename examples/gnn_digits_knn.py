"""Evol-Q beyond vision transformers: a two-layer GraphSAGE (mean aggregation)
classifying the nodes of a k-nearest-neighbour graph built from scikit-learn's
handwritten digits (1797 nodes, one per image; each node's features are its 64
pixels, its neighbours the k most similar images).

The graph is turned into independent samples, batch dimension first, as the block
view needs: node v's sample is its exact 2-hop computation tree -- v, its k
neighbours, and their k neighbours each, (1 + k + k^2, 64) features. Two SAGE layers
on that tree give exactly the full-graph output of v (the kNN graph has out-degree
exactly k, so no sampling is involved).

Unlike ``lstm_digits.py`` (which registers an adapter and calls ``quantize_model``),
this example uses the library one level lower, with no adapter: it builds the
``QModel`` block view itself (``QLinear`` wrappers + ``evolq.quant`` quantizers) and
drives the search with the unchanged ``BlockScaleProblem``, ``make_searcher``,
``BlockFitness`` and ``ScaleSpace``: passes over the blocks, last block first, a
pass kept only if the hold-out loss did not get worse.

    .venv/bin/python examples/gnn_digits_knn.py                 # ~1 min on 2 cores
    .venv/bin/python examples/gnn_digits_knn.py --quick         # smoke test, a few seconds
"""
from __future__ import annotations

import copy
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_digits.py, also when loaded by path

import torch
import torch.nn.functional as F
from _digits import accuracy, parse, parser, print_result, train
from torch import nn

from evolq import Block, QModel, QuantConfig, ScaleSpace, calibrate
from evolq.fitness import BlockFitness, reference_outputs
from evolq.holdout import HoldOut
from evolq.losses import infonce
from evolq.problems import BlockScaleProblem
from evolq.qnn.layers import QLinear, quantizers_of
from evolq.quant import UniformQuantizer
from evolq.search import make_searcher


# --------------------------------------------------------------------------- the graph
def knn_graph_trees(k: int, seed: int):
    """Digits kNN graph -> per-node 2-hop computation trees (N, 1 + k + k^2, 64), labels,
    and a stratified split: 20% labelled (train), 20% calibration pool, 60% test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import NearestNeighbors

    d = load_digits()
    feats = torch.tensor(d.data / 16.0, dtype=torch.float32)  # (1797, 64)
    nbrs = NearestNeighbors(n_neighbors=k + 1).fit(d.data).kneighbors(d.data, return_distance=False)
    nbr = torch.tensor(nbrs[:, 1:])  # drop the node itself: (N, k)
    hop2 = nbr[nbr].reshape(len(nbr), k * k)  # neighbours of the neighbours, in order
    tree = torch.cat([torch.arange(len(nbr))[:, None], nbr, hop2], dim=1)  # (N, 1 + k + k^2) node ids
    x = feats[tree]
    y = torch.tensor(d.target)
    idx = torch.arange(len(y))
    train, rest = train_test_split(idx, train_size=0.2, random_state=seed, stratify=y)
    calib, test = train_test_split(rest, train_size=0.25, random_state=seed, stratify=y[rest])
    return x, y, train, calib, test


# --------------------------------------------------------------------------- the model
class SAGELayer(nn.Module):
    """h_v' = act(W [h_v, mean_{u in N(v)} h_u]) on trees: (B, 1 + k + k^2*..., F) -> (B, 1 + k..., H)."""

    def __init__(self, in_features, out_features, k, act=True):
        super().__init__()
        self.k, self.act = k, act
        self.lin = nn.Linear(2 * in_features, out_features)

    def forward(self, x):
        b, n, f = x.shape
        m = (n - 1) // self.k  # nodes that get an update: the first m of the tree
        agg = x[:, 1:].reshape(b, m, self.k, f).mean(dim=2)  # node j's children are the next k*j.. rows
        out = self.lin(torch.cat([x[:, :m], agg], dim=-1))
        return F.relu(out) if self.act else out


class GraphSAGE(nn.Module):
    def __init__(self, k, features=64, hidden=64, classes=10):
        super().__init__()
        self.sage1 = SAGELayer(features, hidden, k)
        self.sage2 = SAGELayer(hidden, classes, k, act=False)

    def forward(self, x):  # (B, 1 + k + k^2, F) -> (B, classes): the tree root's logits
        return self.sage2(self.sage1(x))[:, 0]


# --------------------------------------------------------------------------- the block view
def quantize_graphsage(model: GraphSAGE, quant: QuantConfig) -> QModel:
    """Wrap both layers' linear maps (weights per output channel, inputs per tensor)
    and describe the model as two blocks: what an adapter would do."""
    for name in ("sage1", "sage2"):
        layer = getattr(model, name)
        wq = UniformQuantizer(quant.w_bits, per_channel=True, kind="weight", observer=quant.weight_observer,
                              bias_correction=quant.bias_correction)
        aq = UniformQuantizer(quant.a_bits, observer=quant.act_observer, kind="activation")
        layer.lin = QLinear(layer.lin, wq, aq)
    blocks = []
    for name, run in (("sage1", model.sage1), ("sage2", lambda h: model.sage2(h)[:, 0])):
        qs = quantizers_of(getattr(model, name), name)
        blocks.append(Block(name, run, qs, scopes={"block": list(qs)}))
    return QModel(model, blocks, "graphsage-example", "", quant)


def search(qmodel: QModel, x_fit, x_hold, passes: int, cycles: int, eps: float, seed: int) -> list[dict]:
    """Evol-Q's schedule written out with the library's building blocks."""
    loss = functools.partial(infonce, batch_size=64, temperature=3.0)
    fitness = BlockFitness(qmodel, x_fit, reference_outputs(qmodel, x_fit), loss)
    holdout = HoldOut(qmodel, x_hold, loss, max_batch=512, metric="kl")  # KL to the float outputs

    spaces = [ScaleSpace(b.searched("block")) for b in qmodel.blocks]
    everything = ScaleSpace({n: q for s in spaces for n, q in s.quantizers.items()})
    log = []
    for p in range(passes):
        before, snapshot = holdout.score(), everything.vector()
        fitness.invalidate()
        for idx in reversed(range(len(qmodel.blocks))):  # last block first
            space = spaces[idx]
            problem = BlockScaleProblem(space.vector(), lambda c, i=idx, s=space: fitness(i, s, c),
                                        seed=seed + 100 * p + idx)
            plan = make_searcher("tournament", problem, budget=cycles, sigma=eps, seed=seed + 100 * p + idx)
            for _ in range(plan.steps):
                plan.searcher.step()
            space.write(problem.best_scales)
            fitness.invalidate(after=idx)  # later blocks' cached inputs are stale
        after = holdout.score()
        kept = holdout.keep(before, after)
        if not kept:
            everything.write(snapshot)
        log.append({"pass": p, "holdout_before": before, "holdout_after": after, "kept": kept})
    return log


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = parser(__doc__, w_bits=2, a_bits=4, epochs=40, passes=4, cycles=60)
    ap.add_argument("--k", type=int, default=6, help="neighbours per node")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--eps", type=float, default=1e-3, help="tournament mutation range (absolute)")
    args = parse(ap, argv, quick_epochs=2)
    t0 = time.time()
    x, y, tr, ca, te = knn_graph_trees(args.k, args.seed)
    model = train(GraphSAGE(args.k, hidden=args.hidden), x[tr], y[tr], args.epochs, args.seed, lr=5e-3,
                  weight_decay=5e-4)
    fp32 = accuracy(model, x[te], y[te])
    print(f"digits {args.k}-NN graph: {len(y)} nodes, {len(tr)} labelled, {len(ca)} calibration, {len(te)} test "
          f"(2-hop trees of {x.shape[1]} nodes); trained in {time.time() - t0:.0f}s")

    qmodel = quantize_graphsage(copy.deepcopy(model), QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits))
    n_hold = len(ca) // 5
    calibrate(qmodel, x[ca][n_hold:])  # the hold-out never reaches the calibration statistics
    start = accuracy(qmodel.model, x[te], y[te])
    t = time.time()
    log = search(qmodel, x[ca][n_hold:], x[ca][:n_hold], args.passes, args.cycles, args.eps, args.seed)
    searched = accuracy(qmodel.model, x[te], y[te])
    print(f"search: {args.passes} pass(es) x {args.cycles} cycles over {len(qmodel.blocks)} blocks in "
          f"{time.time() - t:.0f}s, passes kept {[p['kept'] for p in log]}")
    return {**print_result(args, fp32, start, searched), "passes": log}


if __name__ == "__main__":
    main()
