"""Reliability: bad input at the API and CLI, degenerate candidates, crash safety
(SIGKILL at random moments and mid-checkpoint, Ctrl-C), determinism, safe
save/load, and memory chunking. Small random timm ViTs (2 blocks, 32x32) keep it fast.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import faultkit as fk  # noqa: E402  (tests/faultkit.py)

from evolq import EvolQConfig, QuantConfig, load_quantized, prepare_model, quantize_model, save_quantized  # noqa: E402
from evolq.checkpoint import CKPT_NAME, load_checkpoint, read_checkpoint_meta, save_checkpoint  # noqa: E402
from evolq.data import fitness_part, split_calibration  # noqa: E402
from evolq.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    EvolQError,
    UnknownModelError,
    UnsupportedModelError,
)
from evolq.fitness import BlockFitness, reference_outputs  # noqa: E402
from evolq.losses import infonce  # noqa: E402
from evolq.qnn.scales import ScaleSpace  # noqa: E402
from evolq.search import list_searchers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")  # module scope: also covers the module fixtures below
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line(excinfo, cls=EvolQError):
    assert isinstance(excinfo.value, cls), type(excinfo.value)
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def x24():
    return fk.images(24)


@pytest.fixture(scope="module")
def reference_run(x24):
    """An uninterrupted run: scales and report (timings stripped)."""
    qm, rep = quantize_model(fk.tiny_vit(), x24, fk.small_config(), arch=fk.ARCH)
    return fk.scales_of(qm), json.loads(json.dumps(fk.strip_timings(rep)))


# =============================================================== bad input (API)
@pytest.mark.parametrize("kw", [dict(searcher="genetic"), dict(loss="l1"), dict(scope="everything")])
def test_unknown_searcher_loss_scope(kw, x24):
    with pytest.raises(ConfigError) as e:
        fk.small_config(**kw)
    assert repr(next(iter(kw.values()))) in one_line(e)
    # a config changed after construction is caught when used
    cfg = fk.small_config()
    setattr(cfg.search, *next(iter(kw.items())))
    with pytest.raises(ConfigError):
        quantize_model(fk.tiny_vit(), x24, cfg)


def test_unknown_model_name():
    from evolq.models import load_model

    with pytest.raises(UnknownModelError) as e:
        load_model("vit_tiny_patch16_244", hub=False)
    assert "did you mean" in one_line(e)


def test_unsupported_architecture_lists_families():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(UnsupportedModelError) as e:
        quantize_model(mlp, torch.randn(8, 3, 8, 8), fk.small_config(infonce_batch=2))
    msg = one_line(e)
    assert "Sequential" in msg and "vit" in msg and "supported families" in msg


@pytest.mark.parametrize("n", [0, 5])
def test_empty_or_tiny_calibration_set(n, x24):
    with pytest.raises(DataError) as e:
        quantize_model(fk.tiny_vit(), x24[:n], fk.small_config())  # infoNCE batch 8
    one_line(e)
    if n:
        assert "infoNCE batch" in str(e.value)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x24[:0]), batch_size=4)
    with pytest.raises(DataError):
        quantize_model(fk.tiny_vit(), loader, fk.small_config())


@pytest.mark.parametrize("case", ["channels_last", "uint8", "dict_batches", "ragged", "strings"])
def test_bad_user_dataloader(case, x24):
    if case == "channels_last":
        data = torch.utils.data.DataLoader(x24.permute(0, 2, 3, 1), batch_size=8)
    elif case == "uint8":
        data = torch.utils.data.DataLoader((x24.abs() * 50).to(torch.uint8), batch_size=8)
    elif case == "dict_batches":
        data = [{"image": x24[:8]}]
    elif case == "ragged":
        data = [(x24[:8], 0), (fk.images(8, size=40), 0)]
        data = torch.utils.data.DataLoader(data, batch_size=None)
    else:
        data = ["a.png", "b.png"]
    with pytest.raises(DataError) as e:
        quantize_model(fk.tiny_vit(), data, fk.small_config())
    one_line(e)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_inputs(bad, x24):
    x = x24.clone()
    x[3, 1, 2, 2] = bad
    with pytest.raises(DataError) as e:
        quantize_model(fk.tiny_vit(), x, fk.small_config())
    assert "NaN or inf" in one_line(e)


@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(w_bits=9), dict(a_bits=3), dict(a_bits=16), dict(attn_bits=0)])
def test_bits_out_of_range(kw):
    with pytest.raises(ConfigError) as e:
        fk.small_config(**kw)
    assert next(iter(kw)) in one_line(e)


@pytest.mark.parametrize("kw", [dict(passes=-1), dict(cycles=0), dict(cycles=-3), dict(population=0),
                                dict(samples=0), dict(popsize=1), dict(max_batch=0), dict(infonce_batch=1),
                                dict(eps=0.0), dict(eps=-1e-3), dict(eps=float("nan")), dict(holdout=1.0),
                                dict(temperature=0.0), dict(seed=-1), dict(cycles=2.5)])
def test_zero_or_negative_budgets(kw):
    with pytest.raises(ConfigError) as e:
        fk.small_config(**kw)
    assert next(iter(kw)) in one_line(e)


def test_zero_passes_is_the_start_point(x24):
    torch.manual_seed(0)
    config = fk.small_config(passes=0)
    qm0 = prepare_model(fk.tiny_vit(), split_calibration(x24, config.search.holdout, config.search.seed)[0],
                        QuantConfig(w_bits=4))
    qm, rep = quantize_model(fk.tiny_vit(), x24, config)
    assert rep["evaluations"] == 0 and rep["blocks"] == []
    assert fk.same_tensors(fk.scales_of(qm), fk.scales_of(qm0))


def test_unusable_device(x24):
    with pytest.raises(ConfigError) as e:
        quantize_model(fk.tiny_vit(), x24, fk.small_config(device="cuda:7" if not torch.cuda.is_available()
                                                           else "nosuchdevice"))
    one_line(e)


def test_output_folder_of_another_run(tmp_path, x24):
    out = tmp_path / "run"
    quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1), checkpoint_dir=out)
    assert (out / CKPT_NAME).exists()
    # the same folder without resume: refused before any work
    with pytest.raises(CheckpointError) as e:
        quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1), checkpoint_dir=out)
    assert "resume" in one_line(e)
    # resume with other settings: refused, naming them
    with pytest.raises(CheckpointError) as e:
        quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1, seed=3), checkpoint_dir=out, resume=True)
    assert "seed" in one_line(e)
    # resume with the same settings but other data: refused
    with pytest.raises(CheckpointError) as e:
        quantize_model(fk.tiny_vit(), fk.images(24, seed=5), fk.small_config(passes=1), checkpoint_dir=out,
                       resume=True)
    assert "another run" in one_line(e)
    # resume without a folder; a folder that is a file; a corrupt checkpoint
    with pytest.raises(ConfigError):
        quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1), resume=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError):
        quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1), checkpoint_dir=tmp_path / "afile")
    data = (out / CKPT_NAME).read_bytes()
    (out / CKPT_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1), checkpoint_dir=out, resume=True)
    assert "corrupt" in one_line(e)


def test_two_runs_in_one_folder_are_refused(tmp_path):
    from evolq.checkpoint import RunLock

    with RunLock(tmp_path):
        with pytest.raises(CheckpointError) as e:
            with RunLock(tmp_path):
                pass
        assert "another evolq run" in one_line(e)
    with RunLock(tmp_path):  # released
        pass


# =============================================================== bad input (images)
def _write_images(folder, modes):
    from PIL import Image

    rows = []
    for i, mode in enumerate(modes):
        f = folder / f"img{i}.png"
        Image.new(mode, (16, 12), 120 if mode in ("L", "P") else (200, 30, 30, 128)[:len(mode)]).save(f)
        rows.append(f"img{i}.png,{2 * i}")
    (folder / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")


def test_grayscale_and_rgba_images_are_converted(tmp_path):
    from evolq.data import load_images

    _write_images(tmp_path, ["L", "RGBA", "P", "RGB"])
    to_t = lambda im: torch.from_numpy(__import__("numpy").asarray(im.resize((8, 8)), dtype="float32")).permute(2, 0, 1)
    x, y = load_images(tmp_path, to_t)
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 2, 4, 6]


def test_corrupt_jpeg_names_the_file(tmp_path):
    from PIL import Image

    from evolq.data import load_images

    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "good.jpg", quality=90)
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "bad.jpg", quality=90)
    data = (tmp_path / "bad.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(data[: len(data) // 3])  # truncated mid-scan
    (tmp_path / "labels.csv").write_text("file,label\ngood.jpg,0\nbad.jpg,2\n")
    with pytest.raises(DataError) as e:
        load_images(tmp_path, lambda im: torch.zeros(3, 8, 8))
    assert "bad.jpg" in one_line(e)


# =============================================================== bad input (CLI)
def run_cli(args, capsys):
    from evolq.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args,needle", [
    (["eval", "--model", "no_such_model"], "unknown model"),
    (["quantize", "--model", fk.ARCH, "--w-bits", "9", "--a-bits", "8", "--out", "o"], "w_bits"),
    (["quantize", "--model", fk.ARCH, "--w-bits", "4", "--a-bits", "8", "--cycles", "0", "--out", "o"], "cycles"),
    (["quantize", "--model", fk.ARCH, "--w-bits", "4", "--a-bits", "8", "--searcher", "ga", "--out", "o"], "searcher"),
    (["quantize", "--model", fk.ARCH, "--w-bits", "4", "--a-bits", "8", "--passes", "-2", "--out", "o"], "passes"),
])
def test_cli_bad_options(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("evolq: error:") and needle in err[0], err
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("case", ["missing", "truncated", "other_arch"])
def test_cli_bad_weights_file(case, tmp_path, capsys):
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    if case != "missing":
        m = fk.tiny_vit() if case == "other_arch" else timm.create_model("resnet10t", pretrained=False)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        save_file(sd, str(f))
        if case == "truncated":
            f.write_bytes(f.read_bytes()[:1000])
    code, err = run_cli(["eval", "--model", fk.ARCH, "--weights", str(f)], capsys)
    assert code == 2 and len(err) == 1 and "w.safetensors" in err[0], err


def _assets_vit():
    from evolq.data import asset_model_file

    if asset_model_file(fk.ARCH) is None:
        pytest.skip("ViT-Tiny weights not in the assets")


def test_cli_corrupt_image_in_data_folder(tmp_path, capsys):
    _assets_vit()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(tmp_path / f"ok{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (tmp_path / "labels.csv").write_text("file,label\nok0.jpg,0\nok1.jpg,1\nbroken.jpg,2\nok2.jpg,3\n")
    code, err = run_cli(["eval", "--model", fk.ARCH, "--data", str(tmp_path), "--json"], capsys)
    assert code == 2 and len(err) == 1 and "broken.jpg" in err[0], err


def test_cli_output_folder_with_another_runs_checkpoint(tmp_path, capsys):
    _assets_vit()
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(data / f"im{i}.png")
    (data / "labels.csv").write_text("file,label\n" + "".join(f"im{i}.png,{i}\n" for i in range(6)))
    out = tmp_path / "out"
    from evolq.checkpoint import run_settings

    other = run_settings(EvolQConfig.make(w_bits=4, a_bits=8, passes=1, infonce_batch=2, seed=7))
    save_checkpoint(out / CKPT_NAME, {"prepass": torch.ones(2)},
                    {"run_id": "someone-else", "config": other,
                     "state": {"pass": 0, "pos": 0, "blocks": [], "passes": [], "evaluations": 0}})
    base = ["quantize", "--model", fk.ARCH, "--data", str(data), "--w-bits", "4", "--a-bits", "8",
            "--calib-size", "3", "--limit", "2", "--infonce-batch", "2", "--passes", "1", "--quiet",
            "--out", str(out)]
    code, err = run_cli(base, capsys)
    assert code == 2 and len(err) == 1 and "already holds a run's checkpoint" in err[-1], err
    code, err = run_cli(base + ["--resume"], capsys)
    assert code == 2 and len(err) == 1 and "seed" in err[-1], err


def test_cli_ctrl_c_exits_130(monkeypatch, capsys):
    import evolq.cli.eval_cmd as eval_cmd

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cmd, "run", interrupted)
    code, err = run_cli(["eval", "--model", fk.ARCH], capsys)
    assert code == 130 and "resume" in err[-1]


# =============================================================== numerics
class Poison:
    """A fitness-hook subscriber: some candidates get NaN / +inf / -inf losses; with
    mode="all" every candidate is NaN. Records the poisoned candidates."""

    def __init__(self, mode):
        self.mode, self.calls, self.poisoned = mode, 0, []

    def subscribe(self, engine):
        engine.fitness_hook.append(self)

    def __call__(self, index, cands, losses):
        self.calls += 1
        losses = losses.clone()
        for i in range(losses.shape[0]):
            bad = self.mode == "all" or (self.calls % 3 == 1) or (i % 3 == 2)
            if bad and not (self.mode != "all" and self.calls == 1):  # keep the start's own evaluation finite
                losses[i] = (float("nan"), float("inf"), -float("inf"))[(self.calls + i) % 3]
                self.poisoned.append(cands[i].clone())
        return losses


@pytest.mark.parametrize("searcher", list_searchers())
def test_degenerate_candidates_never_win(searcher, x24):
    poison = Poison("some")
    # eps 0.05 on 4-bit weight scales of ~0.01: large, often near-zero steps
    config = fk.small_config(searcher=searcher, eps=0.05, cycles=8, popsize=4, holdout=0.0)
    qm, rep = quantize_model(fk.tiny_vit(), x24, config, subscribers=[poison])
    poisoned = poison.poisoned
    assert poisoned, "the test did not poison anything"
    for b in rep["blocks"]:
        assert math.isfinite(b["final_fitness"]) and b["final_fitness"] <= b["start_fitness"]
    for name, q in qm.quantizers().items():
        if hasattr(q, "scale"):
            assert torch.isfinite(q.scale).all() and (q.scale > 0).all(), name
    for i in {1, 2}:
        v = ScaleSpace(qm.blocks[i].searched("attn-weights")).vector()
        assert not any(torch.equal(v, p) for p in poisoned if p.shape == v.shape)
    # the installed model evaluates to a finite fitness without the poison
    fit = BlockFitness(qm, x24, reference_outputs(qm, x24), lambda o, r: infonce(o, r, batch_size=8))
    sp = ScaleSpace(qm.blocks[1].searched("attn-weights"))
    assert math.isfinite(fit(1, sp, sp.vector())[0].item())


@pytest.mark.parametrize("searcher", list_searchers())
def test_all_nan_fitness_keeps_the_start(searcher, x24):
    config = fk.small_config(searcher=searcher, popsize=4, passes=1)
    qm0 = prepare_model(fk.tiny_vit(), fitness_part(x24, config.search), QuantConfig(w_bits=4))
    qm, rep = quantize_model(fk.tiny_vit(), x24, config, subscribers=[Poison("all")])
    assert fk.same_tensors(fk.scales_of(qm), fk.scales_of(qm0))
    assert all(b["final_fitness"] == b["start_fitness"] for b in rep["blocks"])


def test_degenerate_scales_on_the_real_model(x24):
    """Scales at 0, 1e-30, 1e30, NaN, inf, negative, evaluated on the real model:
    no crash, finite losses, and the start (better than all of them) stays."""
    qm0 = prepare_model(fk.tiny_vit(), x24, QuantConfig(w_bits=4))
    fk.degenerate_searcher.seen.clear()
    qm, rep = quantize_model(fk.tiny_vit(), x24, fk.small_config(searcher=fk.degenerate_searcher, passes=1,
                                                                 loss="mse", holdout=0.0))
    seen = torch.cat(fk.degenerate_searcher.seen)
    assert seen.numel() == 2 * len(fk.DEGENERATE_FACTORS) and torch.isfinite(seen).all()
    assert fk.same_tensors(fk.scales_of(qm), fk.scales_of(qm0))
    assert all(b["final_fitness"] == b["start_fitness"] <= seen.min().item() for b in rep["blocks"])


def test_problem_decodes_degenerate_vectors_to_positive_finite_scales():
    from evolq.problems import BlockScaleProblem

    start = torch.tensor([0.5, 0.02, 3.0, 1e-3])
    seen = []
    prob = BlockScaleProblem(start, lambda s: seen.append(s) or s.sum(1), start_fitness=float("nan"), seed=0)
    vals = torch.tensor([[float("nan"), -0.0, float("inf"), -2.0], [-float("inf"), 1e-30, 1e38, 0.1]])
    losses = prob.evaluate_values(vals)
    s = seen[0]
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0, 0] == start[0] and s[0, 2] == start[2] and s[1, 0] == start[0]  # non-finite -> start
    assert s[0, 1] == 1e-8 and s[0, 3] == 2.0  # zero -> floor, negative -> |value|
    assert torch.isfinite(losses).all() and prob.best_fitness < 1e6  # a NaN start fitness counts as the penalty


# =============================================================== crash safety
def test_checkpoint_write_is_atomic(tmp_path):
    from evolq.io import replace_hooks

    f = tmp_path / CKPT_NAME
    meta = {"run_id": "r", "state": {"pass": 0}}
    save_checkpoint(f, {"a": torch.arange(4.0)}, meta)

    def crash(tmp, path):
        assert tmp.exists() and tmp.stat().st_size > 0  # the new file is complete here
        raise KeyboardInterrupt

    replace_hooks.append(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(f, {"a": torch.zeros(4)}, {"run_id": "r", "state": {"pass": 1}})
    finally:
        replace_hooks.remove(crash)
    tensors, m = load_checkpoint(f)  # the old checkpoint, whole
    assert torch.equal(tensors["a"], torch.arange(4.0)) and m["state"]["pass"] == 0
    assert list(tmp_path.iterdir()) == [f]  # no partial file left


def test_sigkill_at_random_moments_then_resume_is_identical(tmp_path, x24, reference_run, record_property):
    kills = int(os.environ.get("EVOLQ_FAULT_KILLS", "4"))  # python -m benchmarks faults asks for more
    stats = fk.kill_resume(tmp_path / "run", x24, fk.small_config(), kills=kills, seed=0)
    for k, v in stats.items():
        record_property(k, json.dumps(v))
    scales, report = fk.load_result(tmp_path / "run")
    assert stats["kills"] == kills and stats["kills_by_kind"]["mid-write"] == (kills + 2) // 3
    # resumes: runs that started from a checkpoint
    assert stats["checkpoints_readable"] and stats["resumes"] >= kills - 1 and stats["stale_tmp_files"] >= 2
    assert fk.same_tensors(scales, reference_run[0])
    assert report == reference_run[1]
    assert not list((tmp_path / "run").glob("*.tmp*"))


def _interruptible_worker(w, out_dir, x, config):
    def markers(engine):  # b"S" when a block search starts, b"E" when it ended; slow fitness
        engine.block_start_hook.append(lambda info: os.write(w, b"S"))
        engine.block_end_hook.append(lambda rec: os.write(w, b"E"))
        engine.fitness_hook.append(lambda index, cands, losses: time.sleep(0.06))

    qm = prepare_model(fk.tiny_vit(), fitness_part(x, config.search), config.quant, arch=fk.ARCH)
    try:
        quantize_model(qm, x, config, checkpoint_dir=out_dir, subscribers=[markers])
    except KeyboardInterrupt:
        tensors, _ = load_checkpoint(Path(out_dir) / CKPT_NAME)
        ok = all(torch.equal(tensors["q/" + k], v) for k, v in fk.scales_of(qm).items())
        os.write(w, b"M" if ok else b"X")  # in-memory model == checkpoint (last finished block)
        return 130
    return 0


def test_ctrl_c_keeps_the_last_finished_block(tmp_path, x24, reference_run):
    out = tmp_path / "run"
    pid, fd = fk.fork_call(_interruptible_worker, out, x24, fk.small_config())
    m = fk.Markers(fd)
    assert m.wait_for(b"S", 3, timeout=120)  # inside the third block search
    time.sleep(0.05)
    os.kill(pid, signal.SIGINT)
    code = fk.wait_exit(pid)
    seen = m.drain()
    assert code == 130 and seen.endswith(b"M"), seen
    assert read_checkpoint_meta(out / CKPT_NAME)["state"]["pos"] + 2 * read_checkpoint_meta(
        out / CKPT_NAME)["state"]["pass"] == seen.count(b"E") == 2
    qm, rep = quantize_model(fk.tiny_vit(), x24, fk.small_config(), arch=fk.ARCH, checkpoint_dir=out, resume=True)
    assert fk.same_tensors(fk.scales_of(qm), reference_run[0])
    assert json.loads(json.dumps(fk.strip_timings(rep))) == reference_run[1]


# =============================================================== determinism
@pytest.mark.parametrize("searcher", ["tournament", "snes"])
def test_same_seed_same_scales_and_report(searcher, x24):
    runs = []
    for global_seed in (1, 2):
        model = fk.tiny_vit()  # (seeds torch itself)
        torch.manual_seed(global_seed)  # the search must not depend on global RNG state
        __import__("random").seed(global_seed)
        __import__("numpy").random.seed(global_seed)
        qm, rep = quantize_model(model, x24, fk.small_config(searcher=searcher, popsize=4))
        runs.append((fk.scales_of(qm), fk.strip_timings(rep)))
    assert fk.same_tensors(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    qm, rep = quantize_model(fk.tiny_vit(), x24, fk.small_config(searcher=searcher, popsize=4, seed=1))
    assert not fk.same_tensors(fk.scales_of(qm), runs[0][0])  # the seed matters


# =============================================================== save / load
LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from evolq import load_quantized
qm = load_quantized(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"y": qm.model(x)}, sys.argv[3])
"""


def test_save_load_in_a_fresh_process_is_exact(tmp_path, x24):
    from safetensors.torch import load_file, save_file

    qm, _ = quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1), arch=fk.ARCH)
    save_quantized(qm, tmp_path / "m", model_kwargs=fk.TINY_KW)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["evolq.json", "model.safetensors"]
    x = fk.images(6, seed=9)
    with torch.no_grad():
        y = qm.model(x)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    p = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "m"), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "y.safetensors")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["y"], y)
    # in process, and into a caller-built model
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "m").model(x), y)
        assert torch.equal(load_quantized(tmp_path / "m", model=fk.tiny_vit(seed=5)).model(x), y)


def test_weights_scope_moves_only_weight_scales(x24):
    qm0 = prepare_model(fk.tiny_vit(), x24, QuantConfig(w_bits=4), arch=fk.ARCH)
    before = {n: q.scale.clone() for n, q in qm0.quantizers().items()}
    qm, rep = quantize_model(qm0, x24, fk.small_config(passes=1, scope="weights", holdout=0.0))
    moved = {n for n, q in qm.quantizers().items() if not torch.equal(q.scale, before[n])}
    assert moved and all(n.endswith("weight_quant") for n in moved), moved
    assert any(".mlp.fc" in n for n in moved)  # beyond the attention's qkv/proj


def test_activations_scope_moves_only_activation_scales(x24):
    qm0 = prepare_model(fk.tiny_vit(), x24, QuantConfig(w_bits=4), arch=fk.ARCH)
    before = {n: q.scale.clone() for n, q in qm0.quantizers().items()}
    qm, rep = quantize_model(qm0, x24, fk.small_config(passes=1, scope="activations", noise="relative",
                                                       eps=0.05, holdout=0.0))
    moved = {n for n, q in qm.quantizers().items() if not torch.equal(q.scale, before[n])}
    assert moved and not any(n.endswith("weight_quant") for n in moved), moved


def test_save_load_outlier_aware_block_scope(tmp_path, x24):
    """Per-channel zero-points, PTF factors and folded channel factors survive save/load,
    after a search that moved their layer scales (scope "block")."""
    qm, rep = quantize_model(fk.tiny_vit(), x24, fk.small_config(passes=1, preset="outlier-aware", scope="block"),
                             arch=fk.ARCH)
    assert rep["evaluations"] > 0
    save_quantized(qm, tmp_path / "m", model_kwargs=fk.TINY_KW)
    x = fk.images(4, seed=3)
    back = load_quantized(tmp_path / "m")
    assert back.config.linear_input == "channel" and back.config.ptf_zero_point == "channel"
    with torch.no_grad():
        assert torch.equal(back.model(x), qm.model(x))


@pytest.mark.parametrize("tamper", ["flip_byte", "truncate", "json_bits", "json_arch", "swap_json", "garbage_json",
                                    "missing", "wrong_model"])
def test_tampered_or_mismatched_files_are_refused(tamper, tmp_path, x24):
    qm = prepare_model(fk.tiny_vit(), x24, QuantConfig(w_bits=4), arch=fk.ARCH)
    save_quantized(qm, tmp_path / "a", model_kwargs=fk.TINY_KW)
    w, j = tmp_path / "a" / "model.safetensors", tmp_path / "a" / "evolq.json"
    model = None
    if tamper == "flip_byte":
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 1
        w.write_bytes(bytes(data))
    elif tamper == "truncate":  # even with the hash fixed up, the file is refused
        import hashlib

        data = w.read_bytes()[:-100]
        w.write_bytes(data)
        meta = json.loads(j.read_text())
        meta["sha256"] = hashlib.sha256(data).hexdigest()
        j.write_text(json.dumps(meta))
    elif tamper in ("json_bits", "json_arch"):
        meta = json.loads(j.read_text())
        if tamper == "json_bits":
            meta["quant"]["w_bits"] = 8
        else:
            meta["model_kwargs"]["depth"] = 3
        j.write_text(json.dumps(meta))
    elif tamper == "swap_json":  # evolq.json of another saved model
        qm8 = prepare_model(fk.tiny_vit(), x24, QuantConfig(w_bits=8), arch=fk.ARCH)
        save_quantized(qm8, tmp_path / "b", model_kwargs=fk.TINY_KW)
        j.write_text((tmp_path / "b" / "evolq.json").read_text())
    elif tamper == "garbage_json":
        j.write_text("{not json")
    elif tamper == "missing":
        w.unlink()
    elif tamper == "wrong_model":
        model = fk.tiny_vit(depth=1)
    with pytest.raises(CheckpointError) as e:
        load_quantized(tmp_path / "a", model=model)
    one_line(e)


def test_every_torch_load_is_weights_only():
    offenders = []
    for folder in ("evolq", "benchmarks", "tests"):
        for f in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"torch\.load\(", line) and "weights_only=True" not in line and "re.search" not in line:
                    offenders.append(f"{f.relative_to(ROOT)}:{i}")
                if re.search(r"\bpickle\.loads?\(", line) and "re.search" not in line:
                    offenders.append(f"{f.relative_to(ROOT)}:{i}")
    assert not offenders, offenders


# =============================================================== memory
def _fitness_setup(x):
    qm = prepare_model(fk.tiny_vit(), x, QuantConfig(w_bits=4))
    ref = reference_outputs(qm, x)
    space = ScaleSpace(qm.blocks[1].searched("block"))
    v = space.vector()
    cands = v * (1 + 0.05 * torch.randn(7, v.numel(), generator=torch.Generator().manual_seed(0)))
    return qm, ref, space, cands


def _record_batches(qm):
    seen = []
    for b in qm.blocks:
        run = b.run
        b.run = (lambda r: (lambda xb: seen.append(xb.shape[0]) or r(xb)))(run)
    return seen


def test_max_batch_bounds_every_forward_and_keeps_the_losses(x24):
    x = x24[:16]
    qm, ref, space, cands = _fitness_setup(x)
    seen = _record_batches(qm)
    loss = lambda o, r: infonce(o, r, batch_size=8)
    base = BlockFitness(qm, x, ref, loss, max_batch=10_000)(1, space, cands)
    for mb in (3, 16, 40, 120):
        seen.clear()
        fit = BlockFitness(qm, x, ref, loss, max_batch=mb)
        got = fit(1, space, cands)
        assert max(seen) <= mb and max(seen) > mb // 2  # bounded, and the bound is used
        torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-6)  # equal up to float summation order
        assert torch.equal(fit(1, space, cands), got)  # and bit-for-bit repeatable for a given max_batch
        assert torch.argsort(got).tolist() == torch.argsort(base).tolist()


def test_oom_halves_the_chunk_and_continues(x24, monkeypatch):
    qm, ref, space, cands = _fitness_setup(x24)
    loss = lambda o, r: infonce(o, r, batch_size=8)
    expected = BlockFitness(qm, x24, ref, loss, max_batch=96)(1, space, cands)
    head = qm.blocks[-1]
    real, raised = head.run, []

    def flaky(xb):
        if xb.shape[0] > 40:  # "the GPU" holds 40 samples at most
            raised.append(xb.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(xb)

    head.run = flaky
    fit = BlockFitness(qm, x24, ref, loss, max_batch=256)
    got = fit(1, space, cands)
    assert raised and fit.oom_retries == 3 and fit.max_batch == 32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.argsort(got).tolist() == torch.argsort(expected).tolist()
    # an OOM while filling the activation cache is retried with smaller chunks too
    first, calls = qm.blocks[1].run, []

    def flaky_block(xb):
        calls.append(xb.shape[0])
        if xb.shape[0] > 6:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return first(xb)

    qm.blocks[1].run = flaky_block
    fit2 = BlockFitness(qm, x24, ref, loss, max_batch=24)
    fit2.block_input(2)
    assert max(c for c in calls if c <= 6) == 6 and calls[0] == 24
    qm.blocks[1].run = first
    head.run = real
    # other errors are not swallowed
    head.run = lambda xb: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        BlockFitness(qm, x24, ref, loss, max_batch=256)(1, space, cands)
