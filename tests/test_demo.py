"""``evolq demo`` prints the commands behind its rows, and builds its rows from those very commands'
parsed arguments: every printed command must parse, and the demo's sizes must reach them."""
import shlex

from evolq.cli import DEMO, build_parser, demo_commands, quant_config


def test_every_printed_command_parses_and_carries_the_demo_sizes():
    args = build_parser().parse_args(["demo"])
    assert (args.calib_size, args.limit, args.menu, args.searcher) == (DEMO["calib_size"], DEMO["limit"],
                                                                         DEMO["menu"], DEMO["searcher"])
    cmds = demo_commands(args, "size-mb=2.717928")
    for key, cmd in cmds.items():
        parsed = build_parser().parse_args(shlex.split(cmd)[1:])
        assert parsed.command in ("eval", "allocate", "quantize", "export"), key
    uni = build_parser().parse_args(shlex.split(cmds["uniform"])[1:])
    assert (uni.calib_size, uni.limit) == (DEMO["calib_size"], DEMO["limit"])
    q = quant_config(uni)
    assert (q.w_bits, q.a_bits, q.start, q.edge_bits) == (DEMO["w_bits"], 8, DEMO["start"], DEMO["edge_bits"])
    al = build_parser().parse_args(shlex.split(cmds["allocated"])[1:])
    assert (al.budget, al.menu, al.evaluations, al.fitness_images) == ("size-mb=2.717928", DEMO["menu"],
                                                                       DEMO["evaluations"], DEMO["fitness_images"])
    assert quant_config(al) == q  # the allocated row starts from the uniform row's regime
    full = build_parser().parse_args(shlex.split(cmds["allocated_full"])[1:])
    assert full.budget == "size-mb=2.717" and full.menu == "2,3,4,8"  # rounded down: never above the uniform size
    assert quant_config(build_parser().parse_args(shlex.split(cmds["deploy"])[1:])).deploy
