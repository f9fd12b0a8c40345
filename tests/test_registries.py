"""Registries and hooks: every registered adapter and searcher is exercised; a new
searcher or loss is one function plus its registration; an EvoTorch algorithm that
evolq does not register runs end to end; user subscribers see the engine's hooks."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import faultkit as fk  # noqa: E402
import test_cnn_adapters as cnn  # noqa: E402
import test_transformer_adapters as tf  # noqa: E402

from evolq import (  # noqa: E402
    ConfigError,
    EvolQConfig,
    SearchConfig,
    list_adapters,
    list_losses,
    list_searchers,
    quantize_model,
    register_loss,
    register_searcher,
)
from evolq.adapters import ADAPTERS, adapter_for, wrap_model  # noqa: E402
from evolq.config import QuantConfig  # noqa: E402
from evolq.losses import LOSSES  # noqa: E402
from evolq.search import SEARCHERS  # noqa: E402

# one tiny model per registered family: (builder, image size)
TINY = {"vit": (lambda: fk.tiny_vit(), 32),
        **{tf.FAMILIES[k][2]: ((lambda k=k: tf.build(k)), tf.FAMILIES[k][1]) for k in ("swin", "levit",
                                                                                      "torchvision_vit")},
        "efficientnet": (lambda: cnn.make("efficientnet"), 32), "resnet": (lambda: cnn.make("resnet"), 32)}


def test_every_registered_adapter_has_a_tiny_model():
    assert set(list_adapters()) <= set(TINY), "a new adapter needs a tiny model here"


@pytest.mark.parametrize("family", list(list_adapters()))
def test_each_registered_adapter_wraps_and_runs(family):
    build, size = TINY[family]
    model = build()
    assert adapter_for(model).name == family
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    qm = wrap_model(model, QuantConfig(w_bits=4), "")
    assert qm.family == family and ADAPTERS.get(family).input_spec.ndim == 4
    with torch.no_grad():
        assert torch.equal(qm.run_blocks(x), qm.model(x))  # the block view equals the model


@pytest.mark.parametrize("searcher", list_searchers())
def test_each_registered_searcher_runs_through_quantize_model(searcher):
    x = fk.images(24)
    qm, rep = quantize_model(fk.tiny_vit(), x, fk.small_config(searcher=searcher, popsize=4, passes=1))
    assert rep["evaluations"] >= 2 * 4 // 4 and all(b["final_fitness"] <= b["start_fitness"] for b in rep["blocks"])


def test_unregistered_evotorch_class_runs_end_to_end():
    from evotorch.algorithms import XNES

    assert "XNES" not in list_searchers()
    x = fk.images(24)
    config = fk.small_config(searcher=XNES, popsize=4, cycles=8, passes=1)
    qm, rep = quantize_model(fk.tiny_vit(), x, config)
    assert rep["config"]["search"]["searcher"] == "XNES"
    assert rep["evaluations"] == 1 + 2 * 8  # the start, then per block two generations of 4
    assert all(b["final_fitness"] <= b["start_fitness"] for b in rep["blocks"])


def test_a_class_that_is_not_a_searcher_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="not an EvoTorch SearchAlgorithm"):
        SearchConfig(searcher=torch.nn.Linear)
    with pytest.raises(ConfigError, match="unknown searcher"):
        SearchConfig(searcher="genetic")
    with pytest.raises(ConfigError, match="searcher_kwargs"):
        SearchConfig(searcher_kwargs=["abs_child"])


def test_a_new_searcher_and_loss_are_one_function_plus_registration():
    from evolq.search import SearchPlan
    from evolq.search.tournament import Tournament

    calls = {"searcher": 0, "loss": 0}
    with SEARCHERS.scoped(), LOSSES.scoped():
        @register_searcher("greedy")
        def greedy(problem, *, budget, sigma, start_fitness=None, seed=0):
            """A tournament whose every sample is the whole population (pure greedy)."""
            calls["searcher"] += 1
            return SearchPlan(Tournament(problem, popsize=4, samples=64, eps=sigma, center_init=problem.center,
                                         start_fitness=start_fitness, seed=seed), budget)

        @register_loss("l1")
        def l1(out, ref, **_):
            calls["loss"] += 1
            return (out.double() - ref.double()).abs().mean(dim=(1, 2))

        assert "greedy" in list_searchers() and "l1" in list_losses()
        from evolq.cli import build_parser

        args = build_parser().parse_args(["quantize", "--model", "m", "--w-bits", "4", "--a-bits", "8", "--out", "o",
                                          "--searcher", "greedy", "--loss", "l1"])  # the CLI lists them too
        assert (args.searcher, args.loss) == ("greedy", "l1")
        qm, rep = quantize_model(fk.tiny_vit(), fk.images(24), fk.small_config(searcher="greedy", loss="l1",
                                                                               passes=1))
        assert calls["searcher"] == 2 and calls["loss"] > 2 * 4
        assert all(b["final_fitness"] <= b["start_fitness"] for b in rep["blocks"])
    assert "greedy" not in list_searchers() and "l1" not in list_losses()


def test_tournament_abs_child_is_reachable_from_the_config_and_cli():
    from evolq.cli import build_parser
    from evolq.problems import BlockScaleProblem
    from evolq.search import make_searcher

    args = build_parser().parse_args(["quantize", "--model", "m", "--w-bits", "4", "--a-bits", "8", "--out", "o",
                                      "--searcher-arg", "abs_child=false", "--searcher-arg", "samples=3"])
    assert dict(args.searcher_arg) == {"abs_child": False, "samples": 3}
    problem = BlockScaleProblem(torch.ones(4), lambda s: s.sum(1), start_fitness=4.0, seed=0)
    for kwargs, expected in (({}, True), ({"abs_child": False}, False)):
        t = make_searcher("tournament", problem, budget=2, sigma=0.1, searcher_kwargs=kwargs).searcher
        assert t.abs_child is expected


def test_user_subscribers_see_every_hook_in_order():
    events = []

    class Recorder:
        def subscribe(self, engine):
            engine.run_start_hook.append(lambda state: events.append(("run", state["pass"])))
            engine.block_start_hook.append(lambda info: events.append(("start", info["block"])))
            engine.block_end_hook.append(lambda rec: events.append(("end", rec["block"])))
            engine.pass_end_hook.append(lambda rec: events.append(("pass", rec["pass"])))
            engine.run_end_hook.append(lambda state: events.append(("done", state["pass"])))

    quantize_model(fk.tiny_vit(), fk.images(24), fk.small_config(passes=2, cycles=2), subscribers=[Recorder()])
    per_pass = [("start", "blocks.1"), ("end", "blocks.1"), ("start", "blocks.0"), ("end", "blocks.0")]
    assert events == [("run", 0), *per_pass, ("pass", 0), *per_pass, ("pass", 1), ("done", 2)]


def test_config_make_reaches_searcher_kwargs():
    c = EvolQConfig.make(searcher="tournament", searcher_kwargs={"abs_child": False})
    assert c.search.searcher_kwargs == {"abs_child": False} and c.to_dict()["search"]["searcher"] == "tournament"
