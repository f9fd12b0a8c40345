"""What the digits examples share: the stratified split, the training loop, test
accuracy, the common command-line options and the result line. The examples differ
in the model, the adapter and the search; those stay in each example."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def split(x, y, seed: int):
    """Stratified 60% train / 10% calibration pool (labels unused) / 30% test."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=y)
    tr, ca = train_test_split(tr, test_size=1 / 7, random_state=seed, stratify=y[tr])
    return (x[tr], y[tr]), x[ca], (x[te], y[te])


def train(model, x, y, epochs: int, seed: int, lr: float, weight_decay: float = 0.0):
    """Adam, batches of 64 in a seeded order; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
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
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item() * 100


def parser(doc: str, *, w_bits: int, a_bits: int, epochs: int, passes: int, cycles: int):
    """The options every example takes; an example adds its own before ``parse``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--w-bits", type=int, default=w_bits)
    ap.add_argument("--a-bits", type=int, default=a_bits)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--passes", type=int, default=passes)
    ap.add_argument("--cycles", type=int, default=cycles)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse(ap, argv, quick_epochs: int = 1):
    """Parse; ``--quick`` (a smoke test) shrinks training and search; one thread, seeded."""
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {quick_epochs} epoch(s), 1 pass x 3 cycles")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.passes, args.cycles = quick_epochs, 1, 3
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    return args


def print_result(args, fp32: float, start: float, searched: float) -> dict:
    w, a = args.w_bits, args.a_bits
    print(f"test accuracy  FP32 {fp32:.2f}%   W{w}A{a} start {start:.2f}%   W{w}A{a} Evol-Q {searched:.2f}%")
    return {"fp32": fp32, "start": start, "searched": searched}
