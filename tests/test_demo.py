"""``evolq demo`` prints the commands behind its rows, and builds its rows from the configs those very
commands parse to: every printed command must parse, and the demo's sizes must reach them."""
import logging
import shlex
import warnings
from dataclasses import replace

import pytest

from evolq.cli import build_parser, quant_config
from evolq.cli.allocate_cmd import alloc_config
from evolq.cli.demo_cmd import demo_settings
from evolq.demo import DEMO, DemoSettings, allocation_verdict, demo_commands, quiet_third_party, verdict_line
from evolq.demo import allocation_config as demo_allocation
from evolq.demo import deploy_config as demo_deploy
from evolq.demo import uniform_config as demo_uniform
from evolq.errors import ConfigError


def test_every_printed_command_parses_and_carries_the_demo_sizes():
    args = build_parser().parse_args(["demo"])
    assert (args.calib_size, args.limit, args.menu, args.searcher) == (DEMO["calib_size"], DEMO["limit"],
                                                                         DEMO["menu"], DEMO["searcher"])
    settings = demo_settings(args)
    assert settings == DemoSettings()  # the flags' defaults are the library's
    cmds = demo_commands(settings, "size-mb=2.717928")
    for key, cmd in cmds.items():
        parsed = build_parser().parse_args(shlex.split(cmd)[1:])
        assert parsed.command in ("eval", "allocate", "quantize", "export"), key
    uni = build_parser().parse_args(shlex.split(cmds["uniform"])[1:])
    assert (uni.calib_size, uni.limit) == (DEMO["calib_size"], DEMO["limit"])
    q = quant_config(uni)
    assert (q.w_bits, q.a_bits, q.start, q.edge_bits) == (DEMO["w_bits"], 8, DEMO["start"], DEMO["edge_bits"])
    assert q == demo_uniform()  # the uniform row is built from what its command parses to
    al = build_parser().parse_args(shlex.split(cmds["allocated"])[1:])
    assert (al.budget, al.menu, al.evaluations, al.fitness_images) == ("size-mb=2.717928", DEMO["menu"],
                                                                       DEMO["evaluations"], DEMO["fitness_images"])
    assert quant_config(al) == q  # the allocated row starts from the uniform row's regime
    assert alloc_config(al) == demo_allocation(settings, "size-mb=2.717928")
    assert al.searcher == "evopress" and al.compare_additive  # evolution, the ILP point competing on the hold-out
    full = build_parser().parse_args(shlex.split(cmds["allocated_full"])[1:])
    assert full.budget == "size-mb=2.717" and full.menu == "2,3,4,8"  # rounded down: never above the uniform size
    dep = quant_config(build_parser().parse_args(shlex.split(cmds["deploy"])[1:]))
    assert dep.deploy and dep == demo_deploy()


def test_the_demo_flags_reach_its_settings_and_its_commands():
    args = build_parser().parse_args(["demo", "--calib-size", "12", "--limit", "7", "--menu", "2,8", "--evaluations",
                                      "9", "--fitness-images", "5", "--tables", "gptq", "--pairs", "2", "--no-export",
                                      "--quiet", "--out", "runs/d"])
    s = demo_settings(args)
    assert s == DemoSettings(calib_size=12, limit=7, menu="2,8", evaluations=9, fitness_images=5, tables="gptq",
                             pairs=2, export=False, out="runs/d", progress=False)
    al = build_parser().parse_args(shlex.split(demo_commands(s, "size-mb=3")["allocated"])[1:])
    assert (al.calib_size, al.limit, al.tables) == (12, 7, "gptq")
    assert replace(alloc_config(al), progress=False) == demo_allocation(s, "size-mb=3")  # the demo's --quiet
    with pytest.raises(ConfigError, match="limit"):
        DemoSettings(limit=0)


def test_the_demo_allocation_is_evopress_with_the_ilp_competing():
    cfg = demo_allocation(DemoSettings(), "size-mb=2.717928")
    assert (cfg.searcher, cfg.compare_additive, cfg.tables) == ("evopress", True, "rtn")
    assert cfg.evaluations == DEMO["evaluations"] and cfg.fitness_images == DEMO["fitness_images"]
    ilp = demo_allocation(DemoSettings(searcher="ilp"), "size-mb=3")  # another searcher keeps the comparison
    assert ilp.searcher == "ilp" and ilp.compare_additive


ADD = [0, 0, 1]  # the additive answer (the ILP point at the budget) of the fake reports


def fake_report(front, chosen, add_hold=0.88, add_loss=1.0, searcher_add=True):
    """An allocate_bits report made with compare_additive, cut to what the verdict reads: the front
    (genes, fitness loss, hold-out loss where scored), the chosen point, the additive answer."""
    front = [dict(p) for p in front]
    add = {"genes": ADD, "loss": add_loss, "holdout_loss": add_hold}
    if searcher_add and not any(p["genes"] == ADD for p in front):
        front.append({**add, "additive": True})
    at = next(i for i, p in enumerate(front) if p["genes"] == chosen)
    add["chosen"] = chosen == ADD
    return {"front": front, "chosen": front[at], "search": {"additive": add},
            "calibration": {"holdout_images": 19}}


def test_the_verdict_picks_the_lower_hold_out_kl_and_says_which_won():
    evo = [{"genes": [1, 0, 0], "loss": 0.90, "holdout_loss": 0.70}, {"genes": [0, 1, 0], "loss": 0.85,
                                                                     "holdout_loss": 0.75},
           {"genes": [1, 1, 0], "loss": 2.0}]  # not among the hold-out's candidates: no hold-out loss
    v = allocation_verdict(fake_report(evo, [1, 0, 0]), "evopress")
    assert v["winner"] == "evopress" and v["holdout_kl"] == {"evopress": 0.70, "ilp": 0.88}
    assert v["holdout_images"] == 19
    line = verdict_line(v)
    assert "evopress 0.7000" in line and "ILP" in line and "0.8800" in line
    assert "evopress won (20% lower)" in line and "the row is the evopress allocation" in line
    assert "never the evaluation split" in line

    worse = [{"genes": [1, 0, 0], "loss": 0.90, "holdout_loss": 0.95}]  # lower fitness loss, higher hold-out KL
    v = allocation_verdict(fake_report(worse, ADD), "evopress")
    assert v["winner"] == "ilp" and v["holdout_kl"] == {"evopress": 0.95, "ilp": 0.88}
    line = verdict_line(v)
    assert "the ILP won" in line and "the row is the ILP allocation" in line and "evopress 0.9500" in line

    tie = [{"genes": [1, 0, 0], "loss": 1.0, "holdout_loss": 0.88}]  # a tie on both keys: the ILP's
    assert allocation_verdict(fake_report(tie, ADD), "evopress")["winner"] == "ilp"
    by_loss = [{"genes": [1, 0, 0], "loss": 0.9, "holdout_loss": 0.88}]  # a hold-out tie: the fitness loss decides
    assert allocation_verdict(fake_report(by_loss, [1, 0, 0]), "evopress")["winner"] == "evopress"


def test_the_verdict_when_evolution_never_left_the_ilp_point_and_for_other_searchers():
    stayed = [{"genes": ADD, "loss": 1.0, "holdout_loss": 0.88}]  # the front holds the ILP point only
    v = allocation_verdict(fake_report(stayed, ADD), "evopress")
    assert v["winner"] == "ilp" and v["holdout_kl"] == {"evopress": None, "ilp": 0.88}
    assert "found no point but the ILP's" in verdict_line(v) and "the row is the ILP allocation" in verdict_line(v)
    ilp = fake_report([{"genes": [0, 1, 1], "loss": 0.9, "holdout_loss": 0.8}], [0, 1, 1])
    v = allocation_verdict(ilp, "ilp")  # the ILP searcher's own choice (another budget on its front) is the row
    assert v["winner"] == "ilp" and v["holdout_kl"] == {"ilp": 0.8}
    assert "the ILP (sensitivity + ILP) alone, 0.8000" in verdict_line(v)
    rnd = {"front": [{"genes": [1, 0, 0], "loss": 1.0, "holdout_loss": 0.9}], "search": {"additive": None},
           "calibration": {"holdout_images": 19}}
    rnd["chosen"] = rnd["front"][0]
    v = allocation_verdict(rnd, "random")  # no sensitivities, no additive answer to compare
    assert v["winner"] == "random" and "no ILP answer to compare" in verdict_line(v)


def test_the_verdict_refuses_a_built_model_that_is_not_the_hold_out_choice():
    evo = [{"genes": [1, 0, 0], "loss": 0.90, "holdout_loss": 0.70}]
    with pytest.raises(RuntimeError, match="not the hold-out's choice"):
        allocation_verdict(fake_report(evo, ADD), "evopress")  # the ILP built where evopress won the hold-out


def test_the_verdict_on_a_real_evopress_run_matches_the_engine_choice():
    timm = pytest.importorskip("timm")  # noqa: F841
    from test_allocation import images, tiny_vit

    from evolq import QuantConfig, allocate_bits

    cfg = replace(demo_allocation(DemoSettings(evaluations=60, fitness_images=12, progress=False), "avg-bits=3.5"),
                  menu="2,3,4,8", searcher_kwargs={"offspring": 8, "survivors": [2, 1], "images": [2, 4, 1.0]})
    _, rep = allocate_bits(tiny_vit(), images(48), QuantConfig(w_bits=3), cfg, arch="m")
    v = allocation_verdict(rep, "evopress")  # raises if the model built is not the winner's
    add = rep["search"]["additive"]
    assert v["holdout_kl"]["ilp"] == add["holdout_loss"] and (v["winner"] == "ilp") == add["chosen"]
    won = min(x for x in v["holdout_kl"].values() if x is not None)
    assert rep["chosen"]["holdout_loss"] == won
    assert ("the row is the ILP allocation" in verdict_line(v)) == (v["winner"] == "ilp")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_quiet_third_party_drops_exactly_the_known_notes():
    loggers = {name: logging.getLogger(name) for name in ("torch.utils._pytree", "torch.utils.cpp_extension")}
    seen = _Lines()
    for logger in loggers.values():
        logger.addHandler(seen)

    def emit():
        loggers["torch.utils._pytree"].warning("%s is an Enum subclass and is now natively supported by torch.compile "
                                               "as an opaque value type.", "<enum 'KernelPreference'>")
        loggers["torch.utils.cpp_extension"].warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        loggers["torch.utils.cpp_extension"].warning("something else")
        g = {"__name__": "torch._inductor.mkldnn_lowerings"}
        exec("import warnings\nwarnings.warn('To copy construct from a tensor, it is recommended to use "
             "sourceTensor.detach().clone() or ...', UserWarning)", g)
        warnings.warn("To copy construct from a tensor, it is recommended to use sourceTensor.detach().clone()",
                      UserWarning, stacklevel=1)  # the same words from another module pass
        warnings.warn("another warning", UserWarning, stacklevel=1)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_third_party():
                emit()
            assert seen.lines == ["something else"]
            assert [str(w.message)[:16] for w in caught] == ["To copy construc", "another warning"]
            emit()  # outside the block everything passes again
            assert len(seen.lines) == 4 and len(caught) == 5
    finally:
        for logger in loggers.values():
            logger.removeHandler(seen)
