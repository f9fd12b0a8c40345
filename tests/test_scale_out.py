"""Scale-out on Ray (``SearchConfig(actors=...)``, ``AllocationConfig(actors=...)``,
``evolq.scaleout``): 0, 1 and 2 actors give the same scales, allocations and reports; an actor
killed mid-generation (``ray.kill`` or SIGKILL of its process) leaves the result unchanged; a
driver killed mid-run and resumed gives the uninterrupted result, on two simulated nodes; bad
clusters (an unreachable address, too few CPUs or GPUs, a Ray that cannot start) are one-line
errors before anything is written; the progress bar's actor figures; the work split.

One local Ray (``ray.init(num_cpus=2)``) is shared by the module: starting one costs seconds,
and each run's actors (fresh processes importing torch) a few more, so each test is one run
with actors that asserts all it can of it (0 vs 2 actors with the actors' figures and the
progress bar; 1 actor killed; the allocation on 2 actors, one killed). The slow test, last
(it ends the module's Ray), starts a two-node ``ray.cluster_utils.Cluster`` and two drivers:
about 40 s. The file: about 90 s on 2 cores (AMD EPYC Zen 4, 88 s measured).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import faultkit as fk  # noqa: E402  (tests/faultkit.py)

import evolq  # noqa: E402
from evolq import EvolQConfig, QuantConfig, ScaleOutError, allocate_bits, quantize_model  # noqa: E402
from evolq.api import connect_ray  # noqa: E402
from evolq.config import AllocationConfig, SearchConfig  # noqa: E402
from evolq.errors import ConfigError  # noqa: E402
from evolq.hooks import ProgressBar  # noqa: E402
from evolq.scaleout import ScaleOutWarning, connect, split_weighted, split_work  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# group > 1 (max_batch 64 on 21 fitness images: 3 candidates per forward), so pieces must align to groups
SNES = dict(searcher="snes", popsize=7, cycles=14, max_batch=64)
CMAES_LAYERS = dict(searcher="cmaes", popsize=5, cycles=10, scope="block", unit="layer", order="first-last",
                    noise="relative")
ALLOC = dict(budget="avg-bits=3.5", evaluations=40, popsize=8, fitness_images=12, progress=False)


@pytest.fixture(autouse=True, scope="module")  # module scope: also covers the module fixtures below
def _one_thread():
    """One torch thread, as each actor has: bit-identity holds at equal thread counts (docs/reliability.md)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """The module's local Ray (2 CPUs); its GCS address, which other drivers can join."""
    started = fk.start_local_ray(2)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def x24():
    return fk.images(24)


def run(x, subscribers=(), **kw):
    qm, rep = quantize_model(fk.tiny_vit(), x, fk.small_config(**kw), arch=fk.ARCH, subscribers=subscribers)
    return fk.scales_of(qm), rep


def allocate(subscribers=(), **kw):
    q, rep = allocate_bits(fk.tiny_vit(), fk.images(48), QuantConfig(w_bits=3), AllocationConfig(**ALLOC, **kw),
                           arch="m", subscribers=subscribers)
    return fk.scales_of(q), rep


@pytest.fixture(scope="module")
def in_process(x24):
    """The reference results, in this process (actors=0)."""
    return {"snes": run(x24, **SNES), "cmaes_layers": run(x24, **CMAES_LAYERS), "allocation": allocate()}


def assert_same(got, ref):
    assert fk.same_tensors(got[0], ref[0])
    assert fk.comparable(got[1]) == fk.comparable(ref[1])


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


def test_split_weighted_balances_the_estimated_work():
    assert split_weighted([1] * 8, 2) == [(0, 4), (4, 8)]
    assert split_weighted([12, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 10)]  # 12 | 9, not 16 | 5 by rows
    assert split_weighted([9, 1, 1, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_weighted([5, 5], 4) == [(0, 1), (1, 2)]  # fewer rows than actors
    assert split_weighted([0, 0, 0], 2) == split_work(3, 2)
    for w in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 151, list(range(50))):
        for k in (1, 2, 3, 7):
            r = split_weighted(w, k)
            assert r[0][0] == 0 and r[-1][1] == len(w) and all(a < b for a, b in r) and len(r) <= k
            assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
            if len(w) >= 4 * k:  # no piece holds much more than its share (plus one row)
                assert max(sum(w[a:b]) for a, b in r) <= sum(w) / k + max(w)


@pytest.mark.parametrize("kw, needle", [(dict(actors=-1), "actors"), (dict(actors="all"), "actors"),
                                        (dict(actors=2.5), "actors"), (dict(ray_address="auto"), "needs actors"),
                                        (dict(actors=2, ray_address="nohost"), "HOST:PORT")])
@pytest.mark.parametrize("config", [SearchConfig, AllocationConfig])
def test_bad_scale_out_settings(config, kw, needle):
    with pytest.raises(ConfigError) as e:
        config(**kw)
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


@pytest.mark.parametrize("command", [["quantize", "--a-bits", "8", "--searcher", "cmaes"],
                                     ["allocate", "--budget", "avg-bits=3"]])
def test_unreachable_address_in_a_fresh_process(tmp_path, command):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "evolq", command[0], "--model", fk.ARCH, "--w-bits", "4", "--actors",
                        "2", "--ray-address", "127.0.0.1:1", *command[1:], "--out", str(out)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("evolq: error: cannot reach a Ray cluster at 127.0.0.1:1 (connection refused): start "
                                "one there with 'ray start --head' or check the address")
    assert not out.exists()


def test_config_round_trip_keeps_actors():
    cfg = EvolQConfig.make(actors=3, ray_address="auto", searcher="cmaes")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["search"]["actors"] == 3 and d["search"]["ray_address"] == "auto"


# ---------------------------------------------------------------------------- local Ray
def test_two_actors_same_result_this_evolq_and_progress(local_ray, x24, in_process):
    """2 actors: bit-identical scales and the same report (timings and scale-out figures aside): the
    searchers' randomness stays on the driver, a candidate's loss does not depend on its sub-batch.
    The actors run this checkout's evolq with one torch thread each on CPU; the progress bar shows
    the actors alive and the evaluations per second."""
    seen, shown = [], []

    def watch(engine):
        bar = ProgressBar(every=0.0)
        bar.subscribe(engine)
        engine.block_end_hook.append(lambda rec: (shown.append(bar.postfix()),
                                                  seen.append(list(engine.scale_out.actor_info))))

    got = run(x24, actors=2, subscribers=[watch], **SNES)
    assert_same(got, in_process["snes"])
    rep = got[1]
    so = rep["scale_out"]
    assert so["actors"] == 2 and so["restarts"] == 0 and so["evaluations"] == rep["evaluations"]
    assert so["bytes_sent"] > 0 and 0 <= so["driver_share"] < 1 and so["shared_bytes"] > so["bytes_sent"]
    # per block the state (unit, installed scales) goes once to each actor, then only candidates
    assert 0 < so["state_bytes"] < so["bytes_sent"]
    info = seen[0]
    assert len(info) == 2 and len({i["pid"] for i in info}) == 2 and all(i == info for i in seen)
    assert all(i["evolq"] == evolq.__file__ and i["threads"] == 1 and i["device"] == "cpu" for i in info)
    assert shown and all(p["actors"] == "2/2" and float(p["evals/s"]) > 0 for p in shown)
    assert {"block", "fitness"} <= set(shown[0])


def test_one_actor_killed_mid_generation_gives_the_same_result(local_ray, x24, in_process):
    """1 actor (EvoTorch would drop a single actor; evolq keeps it), ``ray.kill``ed while it computes
    the 3rd generation: that generation is evaluated again on a restarted actor (which gets the
    unit's state), and the scales and report are the in-process ones."""
    kill = fk.kill_actor_at(3, "ray.kill", actor=0)
    got = run(x24, actors=1, subscribers=[kill], **CMAES_LAYERS)
    assert kill.killed == 1
    assert_same(got, in_process["cmaes_layers"])
    so = got[1]["scale_out"]
    assert so["actors"] == 1 and so["restarts"] == 1 and so["evaluations"] == got[1]["evaluations"]


def test_allocation_on_two_actors_one_sigkilled_gives_the_same_result(local_ray, in_process):
    """The bit-allocation search on 2 actors, one actor's process SIGKILLed mid-generation: the same
    front, allocation, model and report (the actors' block-cache counters aside)."""
    kill = fk.kill_actor_at(2, "sigkill", actor=0)
    got = allocate(subscribers=[kill], actors=2)
    assert kill.killed == 1
    assert_same(got, in_process["allocation"])
    so, search = got[1]["scale_out"], got[1]["search"]
    assert so["actors"] == 2 and so["restarts"] == 1
    # the driver's memo sends the actors only allocations it has not seen
    assert so["evaluations"] == search["fitness"]["evaluations"] == search["evaluations"] > 0


def test_steady_state_searcher_warns():
    with pytest.warns(ScaleOutWarning, match="one candidate per step"):
        connect_ray(SearchConfig(searcher="tournament", actors=1))


def test_bad_clusters_fail_in_one_line_before_writing(local_ray, x24, tmp_path):
    out = tmp_path / "run"
    for kw, needle in [(dict(actors=64), "has 2 CPUs"), (dict(actors="num_gpus"), "no GPU")]:
        with pytest.raises(ScaleOutError) as e:
            quantize_model(fk.tiny_vit(), x24, fk.small_config(**kw, searcher="cmaes"), checkpoint_dir=out)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()
        with pytest.raises(ScaleOutError) as e:
            allocate_bits(fk.tiny_vit(), fk.images(48), QuantConfig(w_bits=3), AllocationConfig(**ALLOC, **kw),
                          checkpoint_dir=out)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()
    # an address this process is not connected to: it cannot join a second cluster
    with pytest.raises(ScaleOutError, match="already connected"):
        connect(2, "127.0.0.1:1")


# ---------------------------------------------------------------------------- two simulated nodes (last)
@pytest.mark.slow
def test_two_node_cluster_driver_killed_and_resumed_gives_the_same_result(tmp_path, in_process):
    """``ray.cluster_utils.Cluster``: a head and a worker node of one CPU each, so the two actors sit
    on different nodes. A driver in a fresh process joins it by address (as ``--ray-address
    HOST:PORT`` does), is SIGKILLed at the start of its 3rd block search (its actors die with it);
    a new driver resumes from the checkpoint on new actors, on both nodes, and ends with the
    in-process scales and report. About 40 s (starting the nodes and two drivers: 39 s measured)."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's local Ray (tests after this one start their own)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        stats = fk.kill_driver_then_resume(out, dict(actors=2, ray_address=cluster.address, **SNES), at_block=3)
        assert stats["driver_exit"] == -signal.SIGKILL and stats["driver_killed_at_block"] == 3
        assert stats["blocks_in_checkpoint"] == 2 and stats["resumed_blocks"] == 2  # 4 block searches in all
        got = fk.load_result(out)
        assert_same(got, in_process["snes"])
        so = got[1]["scale_out"]
        assert so["nodes"] == 2 and so["actor_nodes"] == 2 and so["actors"] == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
