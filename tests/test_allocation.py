"""The bit-allocation problem family: ``BitAllocationProblem`` never evaluates an allocation over
its budget, a seed gives the same front, a killed run resumes to the identical front, the
searchers (nsga2, ilp, greedy, random) all run through one harness, the fitness's caches do not
change a loss, the problem serves a tiny CNN as it serves a ViT, and bad menus and budgets are
one-line errors. Random tiny models: mechanics, not accuracy (benchmarks: bit_allocation)."""
from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from tiny_models import randomize_bn  # noqa: E402  (tests/tiny_models.py)

from evolq import ConfigError, QuantConfig, allocate_bits, prepare_model  # noqa: E402
from evolq.allocation.engine import AllocationEngine  # noqa: E402
from evolq.allocation.fitness import AllocationFitness  # noqa: E402
from evolq.allocation.tables import WeightTables  # noqa: E402
from evolq.config import AllocationConfig  # noqa: E402
from evolq.problems.bit_allocation import BitAllocationProblem, Cost  # noqa: E402
from evolq.problems.menu import SizeModel, parse_menu  # noqa: E402
from evolq.qnn.layer_bits import layer_bits_summary, quantized_layers  # noqa: E402
from evolq.search.allocators import ilp_allocation  # noqa: E402


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                          depth=2, num_heads=3, num_classes=10).eval()
    torch.nn.init.normal_(m.head.weight, std=0.2)
    return m


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval(), seed)


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- a synthetic, non-additive quality: fast, so the searchers' mechanics can be tested at length
L, M = 10, 4
BITS = torch.tensor([2.0, 3.0, 4.0, 8.0])
PARAMS = torch.arange(1, L + 1, dtype=torch.float64) * 100


def synthetic(calls=None):
    w = torch.linspace(0.2, 1.0, L, dtype=torch.float64)

    def quality(genes):
        if calls is not None:
            calls.append(genes.shape[0])
        err = (w[None] * 4.0 ** (-BITS[genes].double())).sum(1)
        return err + 3 * err**2  # interactions: the real loss is not the sum of single-layer losses

    return quality


def problem(seed=0, budget_bits=3.0, calls=None, **kw):
    table = PARAMS[:, None] * BITS[None].double() / 8
    budget = float((PARAMS * budget_bits / 8).sum())
    return BitAllocationProblem(synthetic(calls), [Cost("size", table, 0.0, floor=0.8 * budget)], budget, seed=seed,
                                **kw)


def run_searcher(name, seed=0, steps=40, popsize=8):
    from evolq.search.allocators import make_allocator

    p = problem(seed)
    sens = p.sensitivity(torch.full((L,), M - 1))
    s = make_allocator(name, p, popsize=popsize, sensitivity=sens, seed=seed)
    for _ in range(steps):
        s.step()
        if getattr(s, "done", False):
            break
    return p


@pytest.mark.parametrize("name", ["nsga2", "ilp", "greedy", "random"])
def test_no_allocation_over_the_budget_is_ever_evaluated_under_constraint(name):
    p = run_searcher(name)
    table = p.costs[0].table
    front = p.front()
    assert front and all(v[1] <= p.budget for _, v in front)
    # every allocation the searcher proposed went through the repair: the population fits
    pop = p  # the archive also holds the sensitivity's unconstrained points; the front never does
    assert all(float(table.gather(1, torch.tensor(k)[:, None]).sum()) == v[1] for k, v in pop.archive.items())


def test_repair_steps_down_until_the_budget_fits_and_keeps_fitting_allocations():
    p = problem()
    widest = torch.full((3, L), M - 1)
    fixed = p.repair(widest)
    assert bool((p.costs[0](fixed) <= p.budget).all())
    ok = torch.full((1, L), 1)  # all 3 bits: exactly the budget
    assert torch.equal(p.repair(ok), ok)


def test_a_seed_gives_the_same_front_and_another_seed_searches_elsewhere():
    a, b, c = (run_searcher("nsga2", seed=s) for s in (0, 0, 1))
    assert a.front() == b.front() and a.archive == b.archive
    assert a.archive != c.archive


def test_nsga2_beats_random_search_at_equal_evaluations_on_a_non_additive_loss():
    best = {}
    for name in ("nsga2", "random"):
        p = run_searcher(name, steps=10)
        best[name] = min(v[0] for _, v in p.front())
    assert best["nsga2"] <= best["random"]


def test_ilp_solves_the_additive_model_exactly():
    g = torch.Generator().manual_seed(0)
    sens = torch.rand(6, 3, generator=g, dtype=torch.float64)
    cost = torch.tensor([[1.0, 2.0, 4.0]]).repeat(6, 1)
    got = ilp_allocation(sens, cost, 13.0)
    import itertools

    best = min((sum(sens[i, k] for i, k in enumerate(ks)), ks) for ks in itertools.product(range(3), repeat=6)
               if sum(cost[i, k] for i, k in enumerate(ks)) <= 13.0)
    assert tuple(got.tolist()) == best[1]


def test_integer_mutation_changes_every_child_and_stays_in_bounds():
    from evolq.search.operators import IntegerMutation

    p = problem()
    batch = p.generate_batch(32)
    batch.set_values(torch.full((32, L), 1))
    out = IntegerMutation(p, rate=0.01)(batch).values.as_subclass(torch.Tensor)
    assert bool((out != 1).any(1).all()) and int(out.min()) >= 0 and int(out.max()) <= M - 1


# -- the real fitness on a tiny model ---------------------------------------------------
@pytest.fixture(scope="module")
def vit_setup():
    x = images(40)
    q = prepare_model(tiny_vit(), x[:32], QuantConfig.preset("outlier-aware", w_bits=3))
    tables = WeightTables.build(q, x[:32], parse_menu("2,3,4,8"), "gptq")
    return q, tables, x


def test_tables_compute_what_the_quantized_layers_compute(vit_setup):
    """A uniform allocation through the tables equals the model built with those widths."""
    q, tables, x = vit_setup
    f = AllocationFitness(tables, x[32:], loss="kl", chunk=4)
    idx = tables.menu.index(4)
    with tables.installed():
        tables.set([idx] * len(tables.layers))
        with torch.no_grad():
            via_tables = q.model(x[32:])
    for name, layer in quantized_layers(q.model).items():  # the tables are gone again
        assert type(layer.weight_quant).__name__ == "UniformQuantizer", name
    q4 = prepare_model(tiny_vit(), x[:32], QuantConfig.preset("outlier-aware", w_bits=3, start="gptq",
                                                              layer_bits={"*": 4}))
    with torch.no_grad():
        built = q4.model(x[32:])
    # the tables' GPTQ sees float-weight inputs, the start sequential quantized ones: close, not equal
    assert (via_tables.argmax(1) == built.argmax(1)).float().mean() >= 0.75
    assert float(f(torch.tensor([[idx] * len(tables.layers)]))[0]) < float(f(torch.zeros(1, len(tables.layers),
                                                                                         dtype=torch.long))[0])


def test_a_loss_is_the_same_alone_in_a_batch_and_from_the_cache(vit_setup):
    q, tables, x = vit_setup
    g = torch.Generator().manual_seed(3)
    cands = torch.randint(0, 4, (6, len(tables.layers)), generator=g)
    cands[1] = cands[0]
    cands[2, : len(tables.layers) // 2] = cands[0, : len(tables.layers) // 2]  # a shared prefix
    together = AllocationFitness(tables, x[32:], chunk=4)(cands)
    alone = torch.cat([AllocationFitness(tables, x[32:], chunk=4, cache_mb=0)(c[None]) for c in cands])
    assert torch.equal(together, alone)
    f = AllocationFitness(tables, x[32:], chunk=4)
    f(cands[:3])
    assert f.evaluations == 2 and f.blocks_run < f.blocks_full  # a memo hit and a cached prefix


def test_work_estimate_counts_the_blocks_each_allocation_runs(vit_setup):
    """``AllocationFitness.work`` (how a batch is cut into pieces of equal work for Ray actors) is the
    number of blocks ``_compute`` runs for each allocation computed in that order."""
    q, tables, x = vit_setup
    f = AllocationFitness(tables, x[32:], chunk=4)
    nb, last = len(q.blocks), f.order[-1]
    g = torch.zeros(4, len(tables.layers), dtype=torch.long)
    g[1, last] = 1  # differs only in the last block's layer: the blocks before it come from the cache
    g[2] = g[1]
    g[2, f.order[0]] = 2  # differs from the start: everything runs again
    g[3] = g[2]
    g[3, last] = 3
    work = f.work(g)
    runs = []
    for row in g:
        before = f.blocks_run
        f(row[None])  # one at a time, in this order (its cache holds the one before)
        runs.append(float(f.blocks_run - before))
    assert work == runs and work[0] == work[2] == nb and work[1] == work[3] < nb


def test_size_model_counts_bits_scales_and_float_parameters(vit_setup):
    q, tables, _ = vit_setup
    sizes = SizeModel(q.model, tables.menu)
    layers = quantized_layers(q.model)
    n = sum(m.weight.numel() for m in layers.values())
    rows = sum(m.weight.shape[0] for m in layers.values())
    total = sum(t.numel() for t in q.model.state_dict().values() if t.is_floating_point())
    g3 = sizes.uniform(3)
    assert float(sizes.avg_bits(g3)[0]) == pytest.approx(3.0)
    packed = float(sizes.bytes(g3)[0])
    assert packed == pytest.approx(sum(-(-m.weight.numel() * 3 // 8) for m in layers.values()) + rows * 5
                                   + sizes.fixed)
    assert sizes.fixed < 4 * (total - n)  # biases, norms, embeddings; no quantizer state
    assert float(sizes.bytes(sizes.uniform(8))[0]) > packed


@pytest.mark.parametrize("build", [tiny_vit, tiny_cnn], ids=["vit", "efficientnet"])
def test_allocate_bits_builds_a_model_under_the_budget(build, tmp_path):
    x = images(48)
    cfg = AllocationConfig(budget="avg-bits=3.5", evaluations=40, popsize=8, fitness_images=12, progress=False)
    q, rep = allocate_bits(build(), x, QuantConfig(w_bits=3, start="gptq"), cfg, arch="m")
    assert rep["avg_bits"] <= 3.5 + 1e-9
    summary = layer_bits_summary(q.model)
    assert summary["avg_w_bits"] == pytest.approx(rep["avg_bits"])
    assert {n: v["w_bits"] for n, v in summary["layers"].items()} == rep["allocation"]
    assert rep["front"] and all(p["avg_bits"] <= 3.5 + 1e-9 for p in rep["front"])
    assert "holdout_loss" in rep["chosen"]
    with torch.no_grad():
        assert torch.isfinite(q.model(images(2, seed=4))).all()


def test_killed_allocation_resumes_to_the_identical_front(tmp_path):
    x = images(48)
    cfg = AllocationConfig(budget="avg-bits=3.5", evaluations=60, popsize=8, fitness_images=12, progress=False)
    quant = QuantConfig(w_bits=3)
    _, ref = allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "ref")

    class Kill:
        def subscribe(self, engine):
            def stop(info):
                if info["generation"] == 3:
                    raise KeyboardInterrupt
            engine.generation_hook.append(stop)

    with pytest.raises(KeyboardInterrupt):
        allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run", subscribers=[Kill()])
    with pytest.raises(Exception, match="already holds an allocation run"):
        allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run")
    _, back = allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run", resume=True)
    assert back["front"] == ref["front"] and back["allocation"] == ref["allocation"]
    assert back["search"]["evaluations"] == ref["search"]["evaluations"]
    other = copy.deepcopy(cfg)
    other.popsize = 6
    with pytest.raises(Exception, match="another allocation run"):
        allocate_bits(tiny_vit(), x, quant, other, arch="m", checkpoint_dir=tmp_path / "run", resume=True)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("menu,needle", [("", "empty"), ("2,3,3", "repeats 3"), ("1,4", "2..8"), ("4,9", "2..8"),
                                         ("4,half", "2..8")])
def test_bad_menus_are_one_line_errors(menu, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        AllocationConfig(menu=menu)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("budget,needle", [("avg-bits=1.5", "below the smallest.*2..8"),
                                           ("avg-bits=9", "above the largest.*2..8"),
                                           ("size-mb=0.0001", "below the smallest")])
def test_budgets_out_of_reach_state_the_achievable_range(budget, needle):
    cfg = AllocationConfig(budget=budget, evaluations=4, popsize=2, fitness_images=4, progress=False)
    with pytest.raises(ConfigError, match=needle) as e:
        allocate_bits(tiny_vit(), images(16), QuantConfig(), cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("budget", ["avg-bits", "bits=3", "avg-bits=-2", "avg-bits=x"])
def test_malformed_budgets_are_one_line_errors(budget):
    with pytest.raises(ConfigError) as e:
        AllocationConfig(budget=budget)
    assert "\n" not in str(e.value)


def test_engine_reports_evaluations_and_block_reuse(vit_setup):
    q, tables, x = vit_setup
    f = AllocationFitness(tables, x[32:], chunk=4)
    sizes = SizeModel(q.model, tables.menu)
    budget = float(sizes.bytes(sizes.uniform(3))[0])
    p = BitAllocationProblem(f, [Cost("size_bytes", sizes.cost, sizes.fixed)], budget, seed=0)
    eng = AllocationEngine(p, f, popsize=6, evaluations=30, reference=torch.full((len(tables.layers),), 3))
    res = eng.run()
    assert res["evaluations"] >= 30 and res["sensitivity_evaluations"] == 1 + 3 * len(tables.layers)
    assert res["fitness"]["block_reuse"] > 0
    assert all(pt["size_bytes"] <= budget for pt in res["front"])


# -- the latency objective (issue 29): a per-layer table timed in the deploy runtime ------
def _deploy_vit(x):
    return prepare_model(tiny_vit(), x, QuantConfig.preset("deploy", w_bits=4))


def synthetic_latency(qmodel, menu, example, **kw):
    """A stand-in for ``measure_latency_table``: int8 at 1 ms per 10k weights, float at 2.5 (the
    real table is measured by the slow test below)."""
    from evolq.allocation.latency import LatencyTable

    mods = quantized_layers(qmodel.model)
    t8 = torch.tensor([m.weight.numel() / 1e4 for m in mods.values()], dtype=torch.float64)
    table = torch.stack([2.5 * t8 if o == "float" else t8 for o in menu.options], 1)
    return LatencyTable(list(mods), menu, table, 0.5, {"threads": kw["threads"], "batch": kw["batch"],
                                                       "synthetic": True})


@pytest.mark.slow
def test_latency_table_times_every_layer_in_int8_and_float_and_validates_the_sum():
    """Real inductor compiles of a tiny deploy ViT (~20 s warm, ~1 min with a cold inductor cache)."""
    import json

    from evolq.allocation.latency import LatencyTable, measure_latency_table

    x = images(16)
    q = _deploy_vit(x)
    menu = parse_menu("4,8,float")
    t = measure_latency_table(q, menu, x, threads=1, batch=1, pairs=2, warmup=1, round_ms=1.0, mixed=1)
    names = list(quantized_layers(q.model))
    assert t.layers == names and t.table.shape == (len(names), 3)
    assert torch.equal(t.table[:, 0], t.table[:, 1]) and bool((t.table >= 0).all())  # one int8 time per layer
    rec = t.record
    sigs = rec["signatures"]
    assert len(sigs) < len(names) and sum(s["layers"] for s in sigs) == len(names)  # identical layers timed once
    assert all(s["kernels"]["int8"]["integer"] and not s["kernels"]["float"]["integer"] for s in sigs)
    rows = {r["allocation"]: r for r in rec["validation"]}
    assert set(rows) == {"all-int8", "all-float", "mixed-50%-float"}
    assert rows["all-int8"]["integer_kernels"] == len(names) and rows["all-float"]["integer_kernels"] == 0
    mixed = rows["mixed-50%-float"]
    assert mixed["integer_kernels"] == len(names) - mixed["float_layers"] and not mixed["fitted"]
    for a, r in rows.items():
        assert r["measured_ms"] > 0 and r["error"] == pytest.approx((r["predicted_ms"] - r["measured_ms"])
                                                                   / r["measured_ms"])
        flt = [n in (r["float_layer_names"] or (names if a == "all-float" else [])) for n in names]
        genes = torch.tensor([[2 if f else 0 for f in flt]])
        assert float(t.predict(genes)[0]) == pytest.approx(r["predicted_ms"])  # the table is what was validated
    ends = [rows[a]["predicted_raw_ms"] - rows[a]["measured_ms"] for a in ("all-int8", "all-float")]
    assert sum(ends) == pytest.approx(0, abs=1e-9)  # the raw constant: their mean residual
    assert rec["model"] == ("scaled" if "scaled" in rec["max_abs_error_mixed_by_model"] else "raw")  # the default
    if "scaled" in rec["max_abs_error_mixed_by_model"]:  # exact at both uniform allocations by construction
        assert abs(rows["all-int8"]["error_scaled"]) < 1e-9 and abs(rows["all-float"]["error_scaled"]) < 1e-9
    assert rec["threads"] == 1 and rec["batch"] == 1 and rec["cpu"]["model"] and rec["seconds"]["total"] > 0
    back = LatencyTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert torch.equal(back.table, t.table) and back.constant == t.constant and back.layers == names


def test_allocate_bits_under_a_latency_budget_never_exceeds_it_and_resumes_with_its_table(tmp_path, monkeypatch):
    import evolq.allocation.latency as latency

    calls = []
    monkeypatch.setattr(latency, "measure_latency_table", lambda *a, **k: calls.append(k) or synthetic_latency(*a, **k))
    x = images(48)
    lo, hi = synthetic_latency(_deploy_vit(x[:16]), parse_menu("4,8,float"), x, threads=1, batch=1).range()
    budget = lo + 0.4 * (hi - lo)
    cfg = AllocationConfig(menu="4,8,float", budget=f"latency-ms={budget}", evaluations=40, popsize=8,
                           fitness_images=12, latency_threads=1, progress=False)
    quant = QuantConfig.preset("deploy", w_bits=4)
    q, rep = allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run")
    assert len(calls) == 1 and calls[0]["threads"] == 1 and calls[0]["batch"] == 1
    assert rep["latency_ms"] <= budget and all(p["latency_ms"] <= budget for p in rep["front"])
    assert set(rep["chosen"]) >= {"loss", "size_bytes", "latency_ms"}  # three objectives
    table = torch.tensor(rep["latency"]["table_ms"])
    genes = torch.tensor(rep["chosen"]["genes"])
    assert float(table.gather(1, genes[:, None]).sum()) + rep["latency"]["constant_ms"] == \
        pytest.approx(rep["latency_ms"])
    assert {n: v["w_bits"] for n, v in layer_bits_summary(q.model)["layers"].items()} == rep["allocation"]
    assert "float" in rep["allocation"].values() and rep["latency"]["synthetic"]
    assert [u["latency_ms"] for u in rep["uniform"]] == sorted(u["latency_ms"] for u in rep["uniform"])
    assert (tmp_path / "run" / "latency.json").exists()
    monkeypatch.setattr(latency, "measure_latency_table", lambda *a, **k: pytest.fail("re-measured on resume"))
    _, back = allocate_bits(tiny_vit(), x, quant, cfg, arch="m", checkpoint_dir=tmp_path / "run", resume=True)
    assert back["allocation"] == rep["allocation"] and back["latency"]["cached"]
    monkeypatch.setattr(latency, "measure_latency_table", synthetic_latency)
    low = AllocationConfig(menu="4,8,float", budget=f"latency-ms={0.9 * lo}", latency_threads=1, progress=False)
    with pytest.raises(ConfigError, match=r"below the smallest .* latency-ms in \d") as e:
        allocate_bits(tiny_vit(), x, quant, low)
    assert "\n" not in str(e.value)


def test_latency_budget_outside_the_deploy_regime_is_a_one_line_error(tmp_path, capsys):
    from evolq.cli import main

    cfg = AllocationConfig(menu="4,8,float", budget="latency-ms=5", progress=False)
    with pytest.raises(ConfigError, match="deploy regime.*--preset deploy") as e:
        allocate_bits(tiny_vit(), images(16), QuantConfig(), cfg)
    assert "\n" not in str(e.value)
    rc = main(["allocate", "--model", "vit_tiny_patch16_224", "--menu", "4,8,float", "--budget", "latency-ms=5",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--preset deploy" in err[0] and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match='needs "float" on the menu') as e:
        AllocationConfig(menu="4,8", budget="latency-ms=5")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="latency_threads"):
        AllocationConfig(menu="4,8,float", budget="latency-ms=5", latency_threads=0)


def test_latency_budget_without_the_runtime_names_the_extra(monkeypatch):
    from evolq.export.runtimes.inductor import InductorRuntime

    monkeypatch.setattr(InductorRuntime, "package", "evolq_no_such_package")
    cfg = AllocationConfig(menu="4,8,float", budget="latency-ms=5", progress=False)
    with pytest.raises(ConfigError, match=r"pip install 'evolq\[deploy\]'") as e:
        allocate_bits(tiny_vit(), images(16), QuantConfig.preset("deploy"), cfg)
    assert "\n" not in str(e.value)
