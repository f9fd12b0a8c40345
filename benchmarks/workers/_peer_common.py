"""What the peer scripts (``peers_brevitas.py``, ``peers_modelopt.py``) share. They run in the
peer tool's own environment, without evolq: this module needs only torch and timm."""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

T_START = time.time()  # imported first by each peer script: its seconds include imports and model load


def parse_args(doc: str, config_help: str, batch_size: int, batch_help: str):
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", required=True, help="tensor file written by the peers suite (benchmarks/suites/peers.py)")
    p.add_argument("--arch", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--out", required=True)
    p.add_argument("--logits", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def load_data(args):
    """(calibration images, evaluation images) from the tensor file of the peers suite."""
    data = torch.load(args.data, weights_only=True)
    return data["calib"], data["eval"]


def load_model(arch, weights):
    import timm

    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=weights)).eval()


@torch.no_grad()
def eval_logits(model, xe, batch_size: int = 50):
    return torch.cat([model(xe[i:i + batch_size]).float() for i in range(0, len(xe), batch_size)])


def finish(args, res: dict, logits, **versions) -> None:
    """Save the evaluation logits and the result JSON (with the script's seconds and versions); print it."""
    import timm

    torch.save(logits, args.logits)
    res["env"] = {"torch": torch.__version__, "timm": timm.__version__, **versions,
                  "python": platform.python_version()}
    res["script_seconds"] = time.time() - T_START  # imports, model load, PTQ, evaluation
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1))
