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
from evolq.demo import DEMO, DemoSettings, demo_commands, quiet_third_party
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
