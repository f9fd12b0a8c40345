"""Search mechanics: the cached batched fitness, losses, the tournament, the searchers,
and reuse of the problem on a non-ViT block view."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from evolq import Block, EvolQConfig, QModel, calibrate, prepare_model, quantize_model
from evolq.config import QuantConfig
from evolq.fitness import BlockFitness, reference_outputs
from evolq.losses import LOSSES, infonce
from evolq.problems import BlockScaleProblem
from evolq.qnn.builder import wrap_linear
from evolq.qnn.layers import quantizers_of
from evolq.qnn.scales import ScaleSpace
from evolq.search import list_searchers, make_searcher


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=32, patch_size=8,
                             embed_dim=48, num_heads=3, num_classes=10).eval()


def test_cached_batched_fitness_equals_full_model_evaluation():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 32, 32)
    qm = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4), arch="tiny")
    ref = reference_outputs(qm, x)
    fit = BlockFitness(qm, x, ref, lambda o, r: infonce(o, r, batch_size=6), max_batch=7)  # forces chunking
    for idx in (1, 2, 3):
        space = ScaleSpace(qm.blocks[idx].searched("block"))
        start = space.vector()
        cands = start * (1 + 0.05 * torch.randn(5, start.numel()).clamp(-2, 2))
        batched = fit(idx, space, cands)
        plain = []
        for c in cands:
            space.write(c)
            with torch.no_grad():
                out = qm.model(x)
            plain.append(infonce(out.unsqueeze(0), ref, batch_size=6)[0])
        space.write(start)
        assert torch.allclose(batched, torch.stack(plain), rtol=1e-5, atol=1e-6)
        assert batched.std() > 0  # candidates really differ


def test_population_weights_are_quantized_once_per_population():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    qm = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4), arch="tiny")
    blk = qm.model.blocks[1]
    space = ScaleSpace(qm.blocks[2].searched("attn-weights"))
    q, w = blk.attn.qkv.weight_quant, blk.attn.qkv.weight
    start = space.vector()
    cands = start * (1 + 0.05 * torch.randn(3, len(space)).clamp(-2, 2))
    singles = []
    for c in cands:  # the plain path: one candidate's scales installed, one quantized weight
        space.write(c)
        singles.append(q(w).clone())
    space.write(start)
    with space.population(cands):
        a = q(w)
        assert q(w) is a  # the second chunk of the same population reuses the quantized weights
        for p in range(3):
            assert torch.equal(a[p], singles[p])
        cands.mul_(1.01)  # the installed scales change in place: quantized again
        b = q(w)
        assert b is not a and not torch.equal(a, b)
    with space.population(cands):  # a new population: quantized again, to the same values
        c = q(w)
        assert c is not b and torch.equal(c, b)
    assert q.pop_scale is None


def test_block_input_cache_is_invalidated_downstream():
    x = torch.randn(4, 3, 32, 32)
    qm = prepare_model(tiny_vit(), x, QuantConfig(w_bits=4), arch="tiny")
    fit = BlockFitness(qm, x, reference_outputs(qm, x), infonce)
    a3 = fit.block_input(3).clone()
    space = ScaleSpace(qm.blocks[1].searched("attn-weights"))
    space.write(space.vector() * 1.3)
    assert torch.equal(fit.block_input(3), a3)  # stale until told
    fit.invalidate(after=1)
    assert not torch.equal(fit.block_input(3), a3)


def test_infonce_matches_the_authors_form():
    torch.manual_seed(1)
    out, ref = torch.randn(2, 8, 10), torch.randn(8, 10)
    t = 3.0
    got = infonce(out, ref, batch_size=4, temperature=t)
    for p in range(2):
        vals = []
        for i in (0, 4):
            o, r = F.normalize(out[p, i:i + 4].double(), dim=1), F.normalize(ref[i:i + 4].double(), dim=1)
            vals.append(F.cross_entropy(o @ r.T / t, torch.arange(4)) * 2 * t)
        assert math.isclose(got[p].item(), torch.stack(vals).mean().item(), rel_tol=1e-9)
    # perfect outputs score lower than noisy ones, for every loss
    for name, fn in LOSSES.items():
        good, bad = fn(ref.unsqueeze(0), ref), fn((ref + torch.randn_like(ref)).unsqueeze(0), ref)
        assert good.item() < bad.item(), name


def _quadratic_problem(dim=6, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(dim, generator=g) + 0.5
    start = target * (1 + 0.3 * (torch.rand(dim, generator=g) - 0.5))
    return BlockScaleProblem(start, lambda s: ((s - target) ** 2).sum(dim=1), seed=seed, **kw), start, target


def test_tournament_semantics():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(6, generator=g) + 0.5
    start = target * 1.1
    seen = []

    def fit(s):
        seen.append(s.clone())
        return ((s - target) ** 2).sum(dim=1)

    problem = BlockScaleProblem(start, fit, seed=0)
    k, samples, eps = 7, 3, 0.05
    t = make_searcher("tournament", problem, budget=30, sigma=eps, population=k, samples=samples, seed=4).searcher
    shadow = torch.Generator().manual_seed(4)  # replays the searcher's draws
    for step in range(25):
        if step == 0:
            vals, ev = start.unsqueeze(0).expand(k, -1), torch.full((k,), fit(start.unsqueeze(0))[0].item())
            seen.clear()
        else:
            vals, ev = t.population.values.clone(), t.population.evals[:, 0].clone()
        pick = torch.randint(0, k, (samples,), generator=shadow)
        parent = vals[pick[torch.argmin(ev[pick])]]  # best of S sampled with replacement
        noise = (torch.rand(parent.shape, generator=shadow, dtype=torch.float64) * 2 - 1) * eps
        expected_child = (parent.double() + noise).abs().float()
        t.step()
        assert torch.equal(seen[-1][0], expected_child)
        assert len(t.population) == k  # K stays K
    assert problem.evaluations == 26  # the start once, then one child per cycle
    assert problem.best_fitness == t.population.evals[:, 0].min().item()


def test_tournament_drops_the_worst():
    evals = iter([5.0, 1.0, 9.0, 0.5])
    problem = BlockScaleProblem(torch.ones(3), lambda s: torch.tensor([next(evals) for _ in range(s.shape[0])]),
                                seed=0)
    t = make_searcher("tournament", problem, budget=3, sigma=0.01, population=3, samples=2, seed=0).searcher
    t.step()  # start = 5.0 (x3), child 1.0 replaces one copy
    assert sorted(t.population.evals[:, 0].tolist()) == [1.0, 5.0, 5.0]
    t.step()  # child 9.0 is the worst: dropped at once
    assert sorted(t.population.evals[:, 0].tolist()) == [1.0, 5.0, 5.0]
    t.step()  # child 0.5 drops one 5.0
    assert sorted(t.population.evals[:, 0].tolist()) == [0.5, 1.0, 5.0]
    assert problem.best_fitness == 0.5


@pytest.mark.parametrize("name", list_searchers())
def test_each_searcher_improves_a_toy_problem(name):
    problem, start, target = _quadratic_problem(dim=8, seed=2)
    f0 = ((start - target) ** 2).sum().item()
    problem.best_fitness = f0
    plan = make_searcher(name, problem, budget=400, sigma=0.05, population=10, samples=5, popsize=10,
                         start_fitness=f0, seed=3)
    for _ in range(plan.steps):
        plan.searcher.step()
    assert problem.best_fitness < 0.5 * f0
    assert (problem.best_scales > 0).all()


def test_nan_fitness_is_mapped_and_never_wins():
    calls = {"n": 0}

    def fit(s):
        calls["n"] += 1
        out = (s - 1).pow(2).sum(1)
        out[0] = float("nan")
        return out

    problem = BlockScaleProblem(torch.full((4,), 1.2), fit, seed=0)
    plan = make_searcher("cmaes", problem, budget=40, sigma=0.05, popsize=8, start_fitness=0.16, seed=0)
    for _ in range(plan.steps):
        plan.searcher.step()
    assert math.isfinite(problem.best_fitness) and problem.best_fitness <= 0.16


class TinyMLPModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_problem_and_engine_reused_on_a_non_vit_block_view():
    torch.manual_seed(0)
    m = TinyMLPModel()
    cfg = QuantConfig(w_bits=3, a_bits=8)
    for n in ("fc1", "fc2", "fc3"):
        setattr(m, n, wrap_linear(getattr(m, n), cfg))
    blocks = []
    for n, act in (("fc1", True), ("fc2", True), ("fc3", False)):
        layer = getattr(m, n)
        qs = quantizers_of(layer, n)
        blocks.append(Block(n, (lambda f, a: (lambda x: torch.relu(f(x)) if a else f(x)))(layer, act), qs,
                            {"attn-weights": [f"{n}.weight_quant"]}))
    qm = QModel(m, blocks, "toy-mlp", "toy")
    x = torch.randn(64, 8)
    calibrate(qm, x)
    assert torch.allclose(qm.run_blocks(x), m(x))
    before = ScaleSpace({f"{b.name}.weight_quant": b.quantizers[f"{b.name}.weight_quant"] for b in blocks}).vector()
    qm, rep = quantize_model(qm, x, EvolQConfig.make(w_bits=3, passes=2, cycles=6, loss="mse", holdout=0.0,
                                                     eps=0.01, progress=False))
    assert [b["block"] for b in rep["blocks"][:3]] == ["fc3", "fc2", "fc1"]  # last block first
    assert all(b["final_fitness"] <= b["start_fitness"] for b in rep["blocks"])
    assert rep["blocks"][-1]["final_fitness"] < rep["blocks"][0]["start_fitness"]
    after = ScaleSpace({f"{b.name}.weight_quant": b.quantizers[f"{b.name}.weight_quant"] for b in blocks}).vector()
    assert not torch.equal(before, after) and (after > 0).all()


def test_reused_fitness_matches_a_fresh_evaluation():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    qm = prepare_model(tiny_vit(1), x, QuantConfig(w_bits=4), arch="tiny")
    # one infoNCE batch over all 16 samples, so the fitness set's order does not matter
    cfg = EvolQConfig.make(w_bits=4, passes=1, cycles=3, infonce_batch=16, holdout=0.0, eps=0.01, progress=False)
    qm, rep = quantize_model(qm, x, cfg)
    # each block starts from the previous block's final fitness, and that value is right
    for prev, nxt in zip(rep["blocks"], rep["blocks"][1:]):
        assert nxt["start_fitness"] == prev["final_fitness"]
    fit = BlockFitness(qm, x, reference_outputs(qm, x), lambda o, r: infonce(o, r, batch_size=16))
    sp = ScaleSpace(qm.blocks[1].searched("attn-weights"))
    fresh = fit(1, sp, sp.vector().unsqueeze(0))[0].item()
    assert math.isclose(fresh, rep["blocks"][-1]["final_fitness"], rel_tol=1e-5)


def test_batched_tournament_with_one_child_is_the_tournament():
    from evolq.search.tournament import BatchedTournament, Tournament

    runs = []
    for cls, kw in ((Tournament, {}), (BatchedTournament, {"children": 1})):
        problem, start, target = _quadratic_problem(dim=6, seed=5)
        t = cls(problem, popsize=5, samples=3, eps=0.05, center_init=start, seed=7, **kw)
        for _ in range(25):
            t.step()
        runs.append((problem.best_fitness, problem.best_scales.clone(), t.population.values.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


def test_batched_tournament_evaluates_its_children_in_one_call():
    problem, start, target = _quadratic_problem(dim=6, seed=5)
    calls = []
    inner = problem.fitness
    problem.fitness = lambda s: calls.append(s.shape[0]) or inner(s)
    plan = make_searcher("batched-tournament", problem, budget=12, sigma=0.05, popsize=4, start_fitness=1.0, seed=0)
    assert plan.steps == 3
    for _ in range(plan.steps):
        plan.searcher.step()
    assert calls == [4, 4, 4]
