"""The benchmark runner (``benchmarks/``): every results file is listed by one suite with a command
that writes exactly that file, every listed command parses, ``--smoke`` and ``--seeds`` behave, a run
writes its JSON with the machine and time records and a resumable suite starts from it, and the
report renders columns, cross tables and sections from the JSON. No model runs here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.report import Col, Pivot, Section, Table  # noqa: E402
from benchmarks.runner import RESULTS, SMOKE_DIR, Run, Suite, build_parser, jobs, parse, results_path, suites  # noqa: E402


def test_every_results_file_is_listed_once_with_a_command_that_writes_it():
    listed = {}
    for s in suites().values():
        for stem in s.results:
            assert stem not in listed, f"{stem} listed by {listed.get(stem)} and {s.name}"
            listed[stem] = s.name
            for job in jobs(s, stem):
                suite, args = parse([s.name, *job])  # parses, with the suite's own options
                assert results_path(suite, args) == RESULTS / f"{stem}.json", (s.name, job)
    assert set(listed) == {p.stem for p in RESULTS.glob("*.json")}


def test_smoke_and_seeds():
    suite, args = parse(["search", "--smoke", "--calib", "30"])
    assert args.calib == 30 and args.eval == suite.smoke["eval"]  # what is given wins over --smoke
    assert results_path(suite, args) == SMOKE_DIR / "search.json"
    assert parse(["holdout", "--seeds", "0,1", "2"])[1].seeds == [0, 1, 2]
    assert parse(["holdout"])[1].seeds == [0, 1, 2]  # the suite's default
    with pytest.raises(SystemExit):
        parse(["no-such-suite"])


def test_a_run_records_the_machine_and_a_resumable_suite_starts_from_its_file(tmp_path):
    def count(run):
        run.doc.setdefault("runs", []).append(run.args.seeds)
        run.save()

    suite = Suite(name="counter", what="test", doc="test", run=count, common={"seeds": [0]}, resume=True)
    out = tmp_path / "counter.json"
    for argv in (["--seeds", "1", "--out", str(out)], ["--seeds", "2,3", "--out", str(out)]):
        args = build_parser(suite).parse_args(argv)
        args.seeds = [s for part in args.seeds for s in part]
        run = Run(suite, args, ["counter", *argv])
        suite.run(run)
        run.finish()
    doc = json.loads(out.read_text())
    assert doc["runs"] == [[1], [2, 3]]
    assert [b["command"].split("--seeds ")[1].split()[0] for b in doc["bench"]] == ["1", "2,3"]
    assert all(b["finished"] and b["seconds"] >= 0 and "load_1m" in b["cpu"] for b in doc["bench"])


def test_report_renders_columns_cross_tables_and_sections(tmp_path):
    doc = {"model": "m", "cpu": {"model": "AMD EPYC", "flags": ["avx2", "avx512_vnni"]},
           "runs": [{"bits": 8, "s": 0.5, "kl": 0.01234, "seed": 1}, {"bits": 4, "s": 0.5, "kl": 0.2, "seed": 0},
                    {"bits": 4, "s": 1.0, "kl": 0.3, "seed": 0}]}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    sec = Section("x", ["## {model}", Table([Col("bits", "bits", "W{}"), Col("KL", "kl", "{:.3f}")]),
                        Pivot("runs", [Col("bits", "bits", "W{}")], "s", "s={:g}".format, lambda r: f"{r['kl']:.2f}",
                              order="desc"), lambda d: None])
    assert sec.render(tmp_path) == [
        "## m", "",
        "*Measured on* `x.json`: AMD EPYC (avx2, avx512_vnni); seeds 0, 1 (the spread: the ± or per-seed figures "
        "below).", "",
        "| bits | KL |\n|---|---|\n| W8 | 0.012 |\n| W4 | 0.200 |\n| W4 | 0.300 |", "",
        "| bits | s=0.5 | s=1 |\n|---|---|---|\n| W8 | 0.01 | - |\n| W4 | 0.20 | 0.30 |", ""]
    assert Section("y", ["## never"]).render(tmp_path) == []  # no file: no section
    (tmp_path / "z.json").write_text(json.dumps({"cpu": "x86_64", "runs": [{"seed": 3}]}))
    assert Section("z", ["## z"]).render(tmp_path)[2] == (
        "*Measured on* `z.json`: CPU model not recorded (only the architecture, x86_64); one seed (3): no spread "
        "over seeds measured.")


def test_bit_allocation_figures_are_drawn_from_the_record_one_file_per_menu(tmp_path):
    from types import SimpleNamespace

    from benchmarks.suites import bit_allocation as ba

    def row(menu, searcher, loss):
        r = {"key": f"vit_tiny_patch16_224|outlier-aware|gptq|uniform=4|{menu}|{searcher}", "seed": 0,
             "searcher": searcher, "model": "vit_tiny_patch16_224", "preset": "outlier-aware", "start": "gptq",
             "tag": "", "budget": "size-mb=3.38", "budget_label": "uniform=4", "menu": menu,
             "chosen": {"loss": loss, "size_bytes": 3.3e6}}
        if searcher != "uniform":
            r["front"] = [{"loss": loss, "size_bytes": 3.3e6}, {"loss": 2 * loss, "size_bytes": 3.0e6}]
        return r

    runs = [row("2,3,4,8", "uniform", 0.3), row("2,3,4,8", "nsga2", 0.2), row("3,4,5,6,8", "nsga2", 0.1)]
    fake = SimpleNamespace(doc={"runs": runs}, path=tmp_path / "bit_allocation.json")
    for r in runs:
        ba._plot(fake, r)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "bit_allocation_vit_tiny_uniform4_gptq_m34568_seed0.png", "bit_allocation_vit_tiny_uniform4_gptq_seed0.png"]
    assert ba._slug("tf_efficientnet_lite0", "size-mb=2.5", "ofq", "2,3,4,8,float") == \
        "efficientnet_lite0_size-mb2p5_ofq_m2348float"


def test_lowbit_peers_counts_packed_bytes_nodes_and_skips_without_its_packages(monkeypatch, capsys):
    import importlib.util

    from onnx import TensorProto, helper

    from benchmarks.suites import lowbit_peers as lp

    keys = [p["key"] for p in lp.grid()]
    assert len(keys) == len(set(keys)) and {"fp32/openvino", "fp32/onnxruntime"} <= set(keys)
    # a 64x32 weight in blocks of 32: packed 4-bit blob, f32 scales, packed zero points; a float Gemm; int64 shape
    blob = helper.make_tensor("w_q", TensorProto.UINT8, [32, 2, 16], bytes(32 * 2 * 16), raw=True)
    scales = helper.make_tensor("w_s", TensorProto.FLOAT, [64], [1.0] * 64)
    zps = helper.make_tensor("w_z", TensorProto.UINT8, [32], bytes(32), raw=True)
    gemm_w = helper.make_tensor("g_w", TensorProto.FLOAT, [32, 10], [0.0] * 320)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 32])
    nodes = [helper.make_node("MatMulNBits", ["x", "w_q", "w_s", "w_z"], ["h"], domain="com.microsoft", K=64, N=32,
                              bits=4, block_size=32),
             helper.make_node("Reshape", ["h", "shape"], ["h2"]), helper.make_node("Gemm", ["h2", "g_w"], ["y"]),
             helper.make_node("MatMul", ["x", "x"], ["unused"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [blob, scales, zps, gemm_w, shape])
    model = helper.make_model(graph)
    packed = lp.onnx_packed(model)
    assert packed["by_role"] == {"nbits_weights": 1024, "nbits_scales": 256, "nbits_zero_points": 32, "other": 1280}
    assert packed["bytes"] == 1024 + 256 + 32 + 1280  # the int64 shape is not a weight
    assert lp.onnx_nodes(model) == {"MatMulNBits": 1, "float_weight_nodes": {"Gemm": 1}, "activation_MatMul": 1}
    row = {"points": {"ort/default-sym/b32": {"tool": "onnxruntime", "symmetric": True, "bits": 4, "group": 32,
                                              "nodes": {"MatMulNBits": 48}, "packed_mb": 3.5, "file_mb": 3.6,
                                              "metrics": {"top1": 80.2},
                                              "latency": {"b32": {"median_ms": 100.0, "contended": True,
                                                                  "speedup_vs_fp32": {"median": 1.25}}}},
                      "nncf/int4_sym/g64": {"tool": "nncf", "ratio": 1.0, "options": {}, "error": "X: failed"}}}
    r = lp.rows(row)
    assert r[0]["b32"] == "100.0 (1.25x) c" and r[0]["options"] == "sym, accuracy_level 4, 48 MatMulNBits"
    assert r[1]["top1"] == "X: failed" and r[1]["packed"] == ""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    assert lp.run(None) == 0 and "nncf not installed" in capsys.readouterr().out


def test_weight_only_grid_micro_graphs_and_report_cells():
    import numpy as np

    from benchmarks.suites import weight_only as wo
    from evolq.export.onnx import onnx_session

    keys = [r["key"] for r in wo.grid()]
    assert len(keys) == len(set(keys)) == 13 and not set(keys) & set(wo.SKIPPED)
    assert wo._blocks(192) == [32, 64] and wo._blocks(768) == [32, 64, 256]
    graphs = wo.micro_graphs(192, 64, 8, np.random.default_rng(0))
    assert sorted(graphs) == ["fp32", "int8_qdq", "nbits4/b32", "nbits4/b64", "nbits8/b32", "nbits8/b64"]
    x = np.random.default_rng(1).standard_normal((8, 192)).astype(np.float32)
    for g in graphs.values():
        assert onnx_session(g, 1).run(None, {"x": x})[0].shape == (8, 64)
    assert "MatMulIntegerToFloat" in wo.optimized_ops(graphs["int8_qdq"], 1)  # the deploy export's fused kernel
    assert wo.optimized_ops(graphs["nbits4/b32"], 1) == {"MatMulNBits": 1}
    doc = {"rows": {"wo/rtn/w4g32": {"error": "X: failed"}},
           "uptime": [{"at": "start", "uptime": "up, load average: 1.00, 2.00, 3.00"}]}
    assert wo.row_cells(doc) == [{"key": "wo/rtn/w4g32", "what": "X: failed"}]
    assert wo._load_line(doc).endswith("invocation 1 start: 1.00, 2.00, 3.00.")
