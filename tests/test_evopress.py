"""The staged fitness and the staged searchers (issue 37): ``AllocationFitness(sample=...)`` is as
bit-identical as the full fitness and keyed by its sample; ``evopress``'s level switches keep every
candidate within the budget on layers of unequal size and menus whose options are not just bits;
the search is seed-deterministic, re-scores the parent on each generation's last-stage sample,
counts its stages and images seen exactly and spends its budget in full-fitness equivalents;
``nsga2(screen=k)`` pre-screens its children; both run through ``allocate_bits`` and resume a killed
run to the identical result. Synthetic qualities for the mechanics, tiny random ViTs for the rest."""
from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

from test_allocation import images, tiny_vit  # noqa: E402  (tests/test_allocation.py)

from evolq import ConfigError, QuantConfig, allocate_bits, prepare_model  # noqa: E402
from evolq.allocation.engine import AllocationEngine  # noqa: E402
from evolq.allocation.fitness import AllocationFitness  # noqa: E402
from evolq.allocation.tables import WeightTables  # noqa: E402
from evolq.config import AllocationConfig  # noqa: E402
from evolq.problems.bit_allocation import BitAllocationProblem, Cost  # noqa: E402
from evolq.problems.menu import parse_menu  # noqa: E402
from evolq.search.allocators import make_allocator  # noqa: E402

L = 12
BITS = torch.tensor([2.0, 3.0, 4.0, 8.0, 32.0])  # the last option: "float"
PARAMS = torch.tensor([100, 300, 100, 700, 200, 100, 500, 300, 100, 900, 200, 400], dtype=torch.float64)
N_IMAGES = 16


class Quality:
    """A non-additive loss that scores samples: each image weighs the layers differently, so a
    sample's loss is not the full loss. Records every allocation it is asked for, with its sample."""

    n_images = N_IMAGES

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.w = torch.rand(N_IMAGES, L, generator=g, dtype=torch.float64) + 0.2
        self.calls: list[tuple[torch.Tensor, tuple | None]] = []
        self.last_computed = 0
        self.memo, self.evaluations, self.requests = {}, 0, 0  # what the engine reads of a fitness

    def stats(self, actors=None):
        return {}

    def __call__(self, genes, compute=None, sample=None):
        genes = torch.as_tensor(genes).long().reshape(-1, L)
        idx = torch.arange(N_IMAGES) if sample is None else torch.as_tensor(sample).long()
        self.calls.append((genes.clone(), None if sample is None else tuple(idx.tolist())))
        self.last_computed = genes.shape[0]
        err = (self.w[idx][None] * 4.0 ** (-BITS[genes].double())[:, None, :]).sum(2)  # (P, images)
        return (err + 3 * err**2).mean(1)


def cost_table():
    table = PARAMS[:, None] * BITS[None].double() / 8
    table[2, 2] = table[2, 1] - 1.0  # layer 2's option 2 costs less than its option 1: levels follow cost
    return table


def problem(seed=0, budget_bits=3.2, quality=None, allowed=None):
    q = quality or Quality()
    table = cost_table()
    budget = float((PARAMS * budget_bits / 8).sum())
    return BitAllocationProblem(q, [Cost("size", table, 0.0, floor=0.8 * budget)], budget, seed=seed,
                                allowed=allowed), q


def searcher(p, name="evopress", seed=0, sensitivity=True, **kw):
    sens = p.sensitivity(torch.full((L,), 3)) if sensitivity else None
    return make_allocator(name, p, popsize=8, sensitivity=sens, seed=seed, searcher_kwargs=kw)


EVO = dict(offspring=12, survivors=[4, 2], images=[2, 4, 8])  # a sampled last stage: the parent is re-scored


def test_level_switches_keep_every_child_within_the_budget_on_layers_of_unequal_size():
    from evolq.search.evopress import LevelSwitch

    allowed = torch.ones(L, 5, dtype=torch.bool)
    allowed[0, 0] = allowed[5, 4] = False
    p, _ = problem(allowed=allowed)
    mut = LevelSwitch(p)
    assert mut.levels[2][:3] == [0, 2, 1] and mut.levels[0][0] == 1  # by cost, allowed only
    g = torch.Generator().manual_seed(0)
    parent = torch.tensor([1, 1, 1, 1, 1, 1, 2, 1, 0, 1, 1, 1])
    assert mut.cost(parent) <= p.budget
    moved = 0
    for _ in range(300):
        child = mut(parent, g)
        assert child is not None and mut.cost(child) <= p.budget
        assert bool(allowed[torch.arange(L), child].all())
        steps = mut.pos[torch.arange(L), child] - mut.pos[torch.arange(L), parent]
        assert int(steps.sum()) == 0 and int((steps < 0).sum()) <= 3  # one down, one up per switch (k <= 3)
        assert int(steps.abs().max()) <= 3
        moved += bool((steps != 0).any())  # a second switch may undo the first: evopress draws such a child again
        parent = child
    assert moved > 250


def test_every_candidate_scored_by_the_staged_searchers_is_within_the_budget():
    for name, kw in (("evopress", EVO), ("nsga2", {"screen": 4})):
        p, q = problem()
        s = searcher(p, name, **kw)
        q.calls.clear()  # the sensitivity pass is over the budget by design; the search never is
        for _ in range(12):
            s.step()
        table = p.costs[0]
        assert q.calls and all(bool((table(g) <= p.budget).all()) for g, _ in q.calls), name
        assert any(sample is not None for _, sample in q.calls)  # the sampled stages ran
        assert all(v[1] <= p.budget for k, v in p.archive.items() if k in {tuple(x) for g, _ in q.calls for x in
                                                                          g.tolist()})


def test_the_staged_fitness_refuses_an_allocation_over_the_budget():
    p, _ = problem()
    with pytest.raises(ValueError, match="over the budget"):
        p.sample_losses(torch.full((1, L), 3), torch.tensor([0, 1]))


def test_evopress_is_seed_deterministic():
    runs = []
    for seed in (0, 0, 1):
        p, q = problem(seed=seed)
        s = searcher(p, seed=seed, sensitivity=False, **EVO)
        for _ in range(10):
            s.step()
        runs.append((p.archive, s.history, [c[1] for c in q.calls]))
    assert runs[0] == runs[1]
    assert runs[0][2] != runs[2][2]  # another seed draws other samples


def test_the_parent_is_re_scored_on_each_generations_last_stage_sample():
    p, q = problem()
    s = searcher(p, sensitivity=False, **EVO)
    s.step()  # the warm start
    changes = 0
    for _ in range(8):
        parent = s.parent.clone()
        q.calls.clear()
        s.step()
        sampled = [(g, smp) for g, smp in q.calls if smp is not None]
        assert [len(smp) for _, smp in sampled] == [2, 4, 8]  # a fresh sample per stage
        last_genes, last_sample = sampled[-1]
        assert last_genes.shape[0] == 2 + 1 and torch.equal(last_genes[-1], parent)  # the survivors and the parent
        h = s.history[-1]
        assert h["parent_rescored"] == pytest.approx(float(Quality()(parent[None], sample=last_sample)[0]), abs=0)
        assert h["winner"] <= h["parent_rescored"]
        changes += h["changed"]
        if h["changed"]:  # a sampled last stage: the new parent is scored on the full fitness, for the front
            assert tuple(s.parent.tolist()) in p.archive and q.calls[-1][1] is None
    assert changes >= 1
    assert len({h["parent_rescored"] for h in s.history[1:]}) > 1  # re-scored, not remembered


def test_stage_counts_images_seen_and_the_budget_in_full_fitness_equivalents():
    p, q = problem()
    s = searcher(p, offspring=12, survivors=[4, 1], images=[2, 4, 1.0])  # the last stage: all 16 images
    s.step()
    start = p.evaluations
    gens = 6
    for _ in range(gens):
        s.step()
    rep = s.report()["stages"]
    assert [r["images"] for r in rep] == [2, 4, N_IMAGES]
    assert [r["requested"] for r in rep] == [12 * gens, 4 * gens, 2 * gens]  # the last stage: 1 + the parent
    for r in rep:
        assert r["images_seen"] == r["computed"] * r["images"] and r["computed"] <= r["requested"]
    assert rep[2]["computed"] == p.evaluations - start  # the full stage is the archive's growth
    assert s.spent == pytest.approx(p.evaluations + (rep[0]["images_seen"] + rep[1]["images_seen"]) / N_IMAGES)
    assert all(r["evaluations_per_s"] > 0 for r in rep)


def test_the_engine_stops_when_the_images_seen_reach_the_budget():
    p, _ = problem()
    eng = AllocationEngine(p, p.quality, searcher="evopress", searcher_kwargs=EVO, evaluations=120,
                           reference=torch.full((L,), 3))
    res = eng.run()
    per_gen = (12 * 2 + 4 * 4 + 3 * 8) / N_IMAGES + 1  # an upper bound on one generation's cost
    assert 120 <= res["spent"] < 120 + per_gen and res["spent"] > res["evaluations"]
    assert res["staged"]["generations"] == res["generations"] - 1  # the first step is the warm start
    assert res["staged"]["start"] in ("ilp", "uniform") and res["front"]


def test_evopress_warm_starts_from_the_better_of_ilp_and_uniform_on_the_hold_out():
    p, _ = problem()
    calls = []

    def holdout(genes):  # prefers the most 2-bit layers: a uniform point, not the ILP's
        calls.append(genes.clone())
        return -(torch.as_tensor(genes) == 0).sum(1).double()

    sens = p.sensitivity(torch.full((L,), 3))
    s = make_allocator("evopress", p, popsize=8, sensitivity=sens, seed=0, searcher_kwargs=EVO, holdout=holdout)
    s.step()
    assert len(calls) == 1 and calls[0].shape[0] >= 2  # the ILP point and the uniform widths, once
    assert s.history[0]["start"] == "uniform" and int((s.parent == 0).sum()) == int((calls[0] == 0).sum(1).max())


def test_nsga2_is_unchanged_by_default_and_screens_with_screen():
    from evotorch.algorithms import GeneticAlgorithm

    from evolq.search.screened import ScreenedGeneticAlgorithm

    p, _ = problem()
    assert type(searcher(p, "nsga2")) is GeneticAlgorithm
    p, q = problem()
    s = searcher(p, "nsga2", screen=4, screen_factor=3)
    assert isinstance(s, ScreenedGeneticAlgorithm)
    for _ in range(4):
        s.step()
    rep = s.report()["stages"]
    assert [r["images"] for r in rep] == [4, N_IMAGES]
    assert [r["requested"] for r in rep] == [3 * 8 * 4, 8 * 4]  # 3 x popsize drawn, popsize kept, per generation
    assert s.spent == pytest.approx(p.evaluations + rep[0]["images_seen"] / N_IMAGES)


@pytest.mark.parametrize("kw,needle", [({"survivors": [4, 2], "images": [2, 4]}, "one images entry per stage"),
                                       ({"offspring": 4, "survivors": [8, 1]}, "survivors must be counts"),
                                       ({"images": [0, 4, 8]}, "positive counts")])
def test_bad_evopress_arguments_are_one_line_errors(kw, needle):
    p, _ = problem()
    with pytest.raises(ConfigError, match=needle) as e:
        searcher(p, sensitivity=False, **kw)
    assert "\n" not in str(e.value)


def test_a_staged_searcher_needs_a_fitness_that_scores_samples():
    p = BitAllocationProblem(lambda g: torch.zeros(g.shape[0], dtype=torch.float64),
                             [Cost("size", cost_table(), 0.0)], float(cost_table()[:, 2].sum()), seed=0)
    with pytest.raises(ConfigError, match="scores samples"):
        make_allocator("evopress", p, popsize=4, seed=0)


# -- the real fitness on a tiny model ---------------------------------------------------
@pytest.fixture(scope="module")
def tables():
    x = images(40)
    q = prepare_model(tiny_vit(), x[:32], QuantConfig.preset("outlier-aware", w_bits=3))
    return WeightTables.build(q, x[:32], parse_menu("2,3,4,8"), "rtn"), x


def test_a_sampled_loss_is_bit_identical_alone_in_a_batch_and_from_the_cache_and_keyed_by_its_sample(tables):
    t, x = tables
    n = len(t.layers)
    g = torch.Generator().manual_seed(3)
    cands = torch.randint(0, 4, (5, n), generator=g)
    cands[2, : n // 2] = cands[0, : n // 2]  # a shared prefix
    s1, s2 = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 7])
    f = AllocationFitness(t, x[32:], chunk=2)
    together = f(cands, sample=s1)
    alone = torch.cat([AllocationFitness(t, x[32:], chunk=2, cache_mb=0)(c[None], sample=s1) for c in cands])
    assert torch.equal(together, alone)
    assert f.sample_evaluations == 5 and f.sample_images == 15 and f.evaluations == 0  # the full fitness untouched
    assert torch.equal(f(cands[:2], sample=s1), together[:2]) and f.last_computed == 0  # the sample's memo
    other = f(cands[:2], sample=s2)
    assert f.last_computed == 2 and not torch.equal(other, together[:2])  # keyed by the sample
    full = AllocationFitness(t, x[32:][s1], ref=f.ref[s1], chunk=2)(cands)
    assert torch.equal(full, together)  # a sample is the fitness on those images
    assert torch.equal(f(cands[:1], sample=torch.arange(8)), f(cands[:1])) and f.evaluations == 1  # all: the full
    f.clear_samples()
    f(cands[:1], sample=s1)
    assert f.last_computed == 1  # recomputed after the clear


ALLOC = dict(budget="avg-bits=3.5", evaluations=60, popsize=8, fitness_images=12, progress=False)


def _comparable(rep):
    from faultkit import strip_timings

    rep = json.loads(json.dumps(strip_timings(rep)))
    for st in (rep["search"].get("staged") or {}).get("stages", []):
        st.pop("evaluations_per_s")
    rep["search"]["fitness"].pop("evaluations_per_s")
    return rep


@pytest.mark.parametrize("kwargs", [{"searcher": "evopress", "searcher_kwargs": {"offspring": 8, "survivors": [2, 1],
                                                                                 "images": [2, 4, 1.0]}},
                                    {"searcher": "nsga2", "searcher_kwargs": {"screen": 3}, "evaluations": 110}],
                         ids=["evopress", "nsga2-staged"])
def test_staged_searchers_allocate_under_the_budget_and_resume_a_killed_run_identically(kwargs, tmp_path):
    x = images(48)
    cfg = AllocationConfig(**{**ALLOC, **kwargs})
    quant = QuantConfig(w_bits=3)
    _, ref = allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "ref")
    assert ref["avg_bits"] <= 3.5 + 1e-9 and all(pt["avg_bits"] <= 3.5 + 1e-9 for pt in ref["front"])
    search = ref["search"]
    assert search["spent"] >= cfg.evaluations and search["generations"] > 3
    assert search["staged"]["stages"][0]["computed"] > 0
    assert search["fitness"]["sample_images"] == sum(st["images_seen"] for st in search["staged"]["stages"]
                                                     if st["images"] < 12)

    class Kill:
        def subscribe(self, engine):
            def stop(info):
                if info["generation"] == 3:
                    raise KeyboardInterrupt
            engine.generation_hook.append(stop)

    with pytest.raises(KeyboardInterrupt):
        allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run", subscribers=[Kill()])
    _, back = allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run", resume=True)
    a, b = _comparable(ref), _comparable(back)
    assert a["front"] == b["front"] and a["allocation"] == b["allocation"]
    assert a["search"]["staged"] == b["search"]["staged"] and a["search"]["spent"] == b["search"]["spent"]
    assert a["search"]["fitness"]["sample_images"] == b["search"]["fitness"]["sample_images"]


def test_the_cli_takes_the_staged_searchers_and_their_arguments():
    from evolq.cli import build_parser

    args = build_parser().parse_args(["allocate", "--model", "m", "--searcher", "evopress", "--searcher-arg",
                                      "survivors=[4,1]", "--searcher-arg", "images=[1,8,64]", "--out", "o"])
    assert args.searcher == "evopress" and dict(args.searcher_arg) == {"survivors": [4, 1], "images": [1, 8, 64]}
    args = build_parser().parse_args(["allocate", "--model", "m", "--searcher", "nsga2", "--searcher-arg", "screen=8",
                                      "--out", "o"])
    assert dict(args.searcher_arg) == {"screen": 8}


def test_evopress_on_two_ray_actors_gives_the_in_process_result():
    """The samples are drawn on the driver and travel to the actors as indices beside the genes: the
    same front, allocation and stage counts as in one process (at one torch thread, as each actor has)."""
    pytest.importorskip("ray")
    import ray
    from faultkit import WORK_KEYS, start_local_ray

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = start_local_ray(2)
    try:
        kw = dict(ALLOC, searcher="evopress", searcher_kwargs={"offspring": 8, "survivors": [2, 1],
                                                               "images": [2, 4, 1.0]})
        runs = [allocate_bits(tiny_vit(), images(48), QuantConfig(w_bits=3), AllocationConfig(**kw, actors=a),
                              arch="m")[1] for a in (0, 2)]
    finally:
        torch.set_num_threads(threads)
        if started:
            ray.shutdown()
    so = runs[1]["scale_out"]
    assert so["actors"] == 2 and so["evaluations"] > runs[1]["search"]["evaluations"]  # the sampled stages too
    a, b = (_comparable(r) for r in runs)
    for r in (a, b):
        r.pop("scale_out", None)
        r["config"]["allocation"].pop("actors")
        for k in WORK_KEYS:
            r["search"]["fitness"].pop(k, None)
    assert a == b and a["search"]["staged"]["stages"][0]["computed"] > 0


def test_the_benchmark_runs_the_staged_searchers_and_records_their_rate_and_stage_agreement():
    """``benchmarks/suites/bit_allocation.py``'s search step on a tiny setup: ``evopress`` and the
    ``nsga2-staged`` label, the candidates scored per minute and the first-vs-last-stage Spearman."""
    from benchmarks.suites import bit_allocation as ba
    from evolq.allocation.setup import budget_cost, prepare_allocation, reference_genes

    x = images(48)
    cfg = AllocationConfig(**{**ALLOC, "budget": "avg-bits=3.5", "evaluations": 60})
    s = prepare_allocation(tiny_vit(), x[:38], x[38:], QuantConfig(w_bits=3), cfg, arch="m")
    costs, cname, limit = budget_cost(*cfg.budget_kind, s.sizes, cfg.front)
    p0 = BitAllocationProblem(s.fitness, costs, limit, budget_cost=cname, seed=0)
    sens = p0.sensitivity(reference_genes(p0, cfg.sensitivity))
    shared = {"sensitivity": sens, "memo": dict(s.fitness.memo), "archive": dict(p0.archive), "seconds": 1.0}
    assert ba.searcher_kwargs("nsga2-staged", {"rate": 0.1, "offspring": 8}) == {"screen": 8, "rate": 0.1}
    assert ba.searcher_kwargs("evopress", {"rate": 0.1, "offspring": 8}) == {"offspring": 8}
    for label in ("evopress", "nsga2-staged"):
        kw = ba.searcher_kwargs(label, {"offspring": 8, "screen_factor": 2})
        res = ba._search(ba._base(label), s, cfg, costs, cname, limit, shared, 0, kw, rank_check=6)
        fit = res["fitness"]
        assert res["candidates_scored"] == fit["evaluations"] + fit["sample_evaluations"] + len(shared["archive"])
        assert res["candidates_per_min"] > 0 and res["spent"] >= 60
        rc = res["rank_check"]
        assert rc["candidates"] == 6 and rc["last_images"] == 12 and -1 <= rc["spearman"] <= 1, label
