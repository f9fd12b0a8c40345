"""Scale-out on Ray (``SearchConfig(actors=...)``, ``evolq.scaleout``): 0, 1 and 2 actors give the
same scales and report; actors import this evolq; the work split; bad clusters give one-line
errors before anything is written; the progress bar's actor figures; two simulated nodes.

One local Ray (2 CPUs) is shared by the module (starting one costs seconds); the two-node test
starts its own ``ray.cluster_utils.Cluster`` and runs last. Actor and driver kills are in
``tests/test_reliability.py`` (the fault harness).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import faultkit as fk  # noqa: E402  (tests/faultkit.py)

import evolq  # noqa: E402
from evolq import EvolQConfig, ScaleOutError, quantize_model  # noqa: E402
from evolq.config import SearchConfig  # noqa: E402
from evolq.errors import ConfigError  # noqa: E402
from evolq.hooks import ProgressBar  # noqa: E402
from evolq.scaleout import ScaleOutWarning, connect, split_work  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# group > 1 (max_batch 64 on 21 fitness images: 3 candidates per forward), so pieces must align to groups
SNES = dict(searcher="snes", popsize=7, cycles=14, max_batch=64)
CMAES_LAYERS = dict(searcher="cmaes", popsize=5, cycles=10, scope="block", unit="layer", order="first-last",
                    noise="relative")


@pytest.fixture(autouse=True, scope="module")  # module scope: also covers the module fixtures below
def _one_thread():
    """One torch thread, as each actor has: bit-identity holds at equal thread counts (docs/reliability.md)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    started = fk.start_local_ray(2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def x24():
    return fk.images(24)


def run(x, **kw):
    qm, rep = quantize_model(fk.tiny_vit(), x, fk.small_config(**kw), arch=fk.ARCH)
    return fk.scales_of(qm), rep


@pytest.fixture(scope="module")
def in_process(x24):
    return {name: run(x24, **kw) for name, kw in (("snes", SNES), ("cmaes_layers", CMAES_LAYERS))}


# ---------------------------------------------------------------------------- no Ray needed
def test_split_work_is_contiguous_even_and_aligned():
    assert split_work(32, 2) == [(0, 16), (16, 32)]
    assert split_work(7, 2, 3) == [(0, 6), (6, 7)]  # groups of 3: [0:3 3:6] [6:7]
    assert split_work(10, 4, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split_work(2, 8) == [(0, 1), (1, 2)]  # fewer solutions than actors: some idle
    for n, a, m in ((33, 4, 1), (100, 3, 7), (5, 5, 2), (1, 3, 4)):
        r = split_work(n, a, m)
        assert r[0][0] == 0 and r[-1][1] == n and all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
        assert all(s % m == 0 for s, _ in r) and len(r) <= a


@pytest.mark.parametrize("kw, needle", [(dict(actors=-1), "actors"), (dict(actors="all"), "actors"),
                                        (dict(actors=2.5), "actors"), (dict(ray_address="auto"), "needs actors"),
                                        (dict(actors=2, ray_address="nohost"), "HOST:PORT")])
def test_bad_scale_out_settings(kw, needle):
    with pytest.raises(ConfigError) as e:
        SearchConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_ray_that_cannot_start_is_one_line_and_writes_nothing(tmp_path):
    """A real failure, in a fresh process: Ray's temporary folder cannot be created."""
    out = tmp_path / "run"
    env = {**os.environ, "RAY_TMPDIR": "/proc/evolq-no-such-dir", "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-m", "evolq", "quantize", "--model", fk.ARCH, "--w-bits", "4", "--a-bits",
                        "8", "--actors", "2", "--searcher", "cmaes", "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evolq: error: could not start a local Ray"), p.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------- local Ray
def test_actors_import_this_evolq(local_ray, x24):
    """Actors run this checkout's evolq, one torch thread each, on CPU."""
    seen = []
    cfg = fk.small_config(actors=2, passes=1, **SNES)
    quantize_model(fk.tiny_vit(), x24, cfg, subscribers=[lambda e: e.block_end_hook.append(
        lambda rec: seen.append(list(e.scale_out.actor_info)))])
    info = seen[0]
    assert len(info) == 2 and len({i["pid"] for i in info}) == 2
    assert all(i["evolq"] == evolq.__file__ and i["threads"] == 1 and i["device"] == "cpu" for i in info)


@pytest.mark.parametrize("name, actors", [("snes", 1), ("snes", 2), ("cmaes_layers", 2)])
def test_same_result_with_0_1_2_actors(local_ray, x24, in_process, name, actors):
    """Bit-identical scales and the same report (timings and scale-out figures aside): the searchers'
    randomness stays on the driver, a candidate's loss does not depend on its sub-batch."""
    kw = SNES if name == "snes" else CMAES_LAYERS
    scales, rep = run(x24, actors=actors, **kw)
    ref_scales, ref_rep = in_process[name]
    assert fk.same_tensors(scales, ref_scales)
    assert fk.comparable(rep) == fk.comparable(ref_rep)
    so = rep["scale_out"]
    assert so["actors"] == actors and so["restarts"] == 0 and so["evaluations"] == rep["evaluations"]
    assert so["bytes_sent"] > 0 and 0 <= so["driver_share"] < 1 and so["shared_bytes"] > so["bytes_sent"]
    # per block the state (unit, installed scales) goes once to each actor, then only candidates
    assert so["state_bytes"] < so["bytes_sent"]


def test_steady_state_searcher_warns_and_still_matches(local_ray, x24):
    ref = run(x24, passes=1)
    with pytest.warns(ScaleOutWarning, match="one candidate per step"):
        got = run(x24, passes=1, actors=2)
    assert fk.same_tensors(got[0], ref[0]) and fk.comparable(got[1]) == fk.comparable(ref[1])


def test_progress_bar_shows_actors_and_evaluations_per_second(local_ray, x24):
    shown = []

    def watch(engine):
        bar = ProgressBar(every=0.0)
        bar.subscribe(engine)
        engine.block_end_hook.append(lambda rec: shown.append(bar.postfix()))

    cfg = fk.small_config(actors=2, passes=1, progress=False, **SNES)
    quantize_model(fk.tiny_vit(), fk.images(24), cfg, subscribers=[watch])
    assert shown and all(p["actors"] == "2/2" and float(p["evals/s"]) > 0 for p in shown)
    assert {"block", "fitness"} <= set(shown[0])


def test_bad_clusters_fail_in_one_line_before_writing(local_ray, x24, tmp_path):
    out = tmp_path / "run"
    cases = [(dict(actors=64), "has 2 CPUs"), (dict(actors="num_gpus"), "no GPU"),
             (dict(actors=2, ray_address="127.0.0.1:1"), "cannot join")]
    for kw, needle in cases[:2]:
        with pytest.raises(ScaleOutError) as e:
            quantize_model(fk.tiny_vit(), x24, fk.small_config(**kw, searcher="cmaes"), checkpoint_dir=out)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()
    # an address this process is not connected to: it cannot join a second cluster
    with pytest.raises(ScaleOutError, match="already connected"):
        connect(2, "127.0.0.1:1")


def test_unreachable_address_in_a_fresh_process(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "evolq", "quantize", "--model", fk.ARCH, "--w-bits", "4", "--a-bits",
                        "8", "--actors", "2", "--ray-address", "127.0.0.1:1", "--searcher", "cmaes", "--out",
                        str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip() == ("evolq: error: cannot reach a Ray cluster at 127.0.0.1:1 (connection refused): start "
                                "one there with 'ray start --head' or check the address")
    assert not out.exists()


# ---------------------------------------------------------------------------- two simulated nodes (last)
@pytest.mark.slow
def test_two_node_cluster_gives_the_same_result(x24, in_process):
    """``ray.cluster_utils.Cluster``: a head and a worker node of one CPU each, so the two actors sit
    on different nodes; the driver joins by address, as ``--ray-address HOST:PORT`` does."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's local Ray (tests after this one start their own)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = []
        cfg = fk.small_config(actors=2, ray_address=cluster.address, **SNES)
        qm, rep = quantize_model(fk.tiny_vit(), x24, cfg, arch=fk.ARCH, subscribers=[
            lambda e: e.block_end_hook.append(lambda rec: nodes.append({i["node"] for i in e.scale_out.actor_info}))])
        assert rep["scale_out"]["nodes"] == 2 and all(len(n) == 2 for n in nodes)
        assert fk.same_tensors(fk.scales_of(qm), in_process["snes"][0])
        assert fk.comparable(rep) == fk.comparable(in_process["snes"][1])
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_config_round_trip_keeps_actors():
    cfg = EvolQConfig.make(actors=3, ray_address="auto", searcher="cmaes")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["search"]["actors"] == 3 and d["search"]["ray_address"] == "auto"
    assert torch.get_num_threads() == 1  # (conftest) the driver's threads: actors use one each, too
