"""``evolq demo``: its flags as an ``evolq.demo.DemoSettings``; the demo itself is ``evolq.demo.run``."""
from __future__ import annotations

from ..demo import DEMO, DemoSettings
from .shared import check_positive


def add_parser(sub):
    pd = sub.add_parser("demo", help="ViT-Tiny on the bundled assets in < 5 min: FP32, uniform W3A8, the same size "
                                     "with bits allocated per layer (evopress against the ILP on the hold-out), the "
                                     "W8A8 deploy model exported and timed")
    pd.add_argument("--calib-size", type=int, default=DEMO["calib_size"],
                    help=f"calibration images (default {DEMO['calib_size']}; 20%% of them are the hold-out)")
    pd.add_argument("--limit", type=int, default=DEMO["limit"], help=f"evaluation images (default {DEMO['limit']})")
    pd.add_argument("--menu", default=DEMO["menu"], help=f"widths the allocation may give a layer "
                                                         f"(default {DEMO['menu']})")
    pd.add_argument("--searcher", default=DEMO["searcher"],
                    help=f"allocation searcher (default {DEMO['searcher']}); the sensitivity + ILP answer competes "
                         f"with its point on the calibration hold-out, the winner is the row")
    pd.add_argument("--evaluations", type=int, default=DEMO["evaluations"],
                    help=f"allocation fitness evaluations, the sensitivities included (evopress: full-fitness "
                         f"equivalents by images seen; default {DEMO['evaluations']})")
    pd.add_argument("--fitness-images", type=int, default=DEMO["fitness_images"],
                    help=f"images of the allocation's fitness (default {DEMO['fitness_images']})")
    pd.add_argument("--tables", default=DEMO["tables"], choices=("auto", "gptq", "rtn"),
                    help=f"how the allocation's fitness quantizes each layer at each width (default {DEMO['tables']})")
    pd.add_argument("--pairs", type=int, default=DemoSettings.pairs,
                    help=f"timed pairs of the speed measurement (default {DemoSettings.pairs})")
    pd.add_argument("--no-export", action="store_true", help="skip the pt2 export and its timing")
    pd.add_argument("--out", default=None, help="also write report.json and the models here")
    pd.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_settings(args) -> DemoSettings:
    """The ``DemoSettings`` that parsed ``demo`` arguments describe."""
    check_positive(args, ("calib_size", "limit", "evaluations", "fitness_images", "pairs"))
    return DemoSettings(calib_size=args.calib_size, limit=args.limit, menu=args.menu, searcher=args.searcher,
                        evaluations=args.evaluations, fitness_images=args.fitness_images, tables=args.tables,
                        pairs=args.pairs, export=not args.no_export, out=args.out, progress=not args.quiet)


def run(args) -> int:
    """The library's main path on the bundled assets, sized to finish in < 5 minutes on 2 cores."""
    from ..demo import run as run_demo

    run_demo(demo_settings(args))
    return 0
