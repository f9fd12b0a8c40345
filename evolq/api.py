"""The user verbs: ``quantize_model`` (start point + Evol-Q search) and ``allocate_bits``
(bits per layer, then the start point of that allocation), with ``prepare_model`` (the start
point alone, ``evolq.start``) re-exported. Saving and loading are in ``evolq.io``, run state in
``evolq.checkpoint``, the schedules in ``evolq.engine`` and ``evolq.allocation.engine``."""
from __future__ import annotations

import json
import time

import torch
from torch import nn

from .checkpoint import RunCheckpoint, check_run_folder, fingerprint, run_settings
from .config import EvolQConfig, QuantConfig
from .data import as_tensor_data, resolve_device, split_calibration
from .errors import ConfigError, DataError
from .io import load_quantized, save_quantized
from .qnn.calibrate import sample_digests
from .qnn.qmodel import QModel
from .start import prepare_model

__all__ = ["prepare_model", "quantize_model", "allocate_bits", "save_quantized", "load_quantized"]


def quantize_model(model: nn.Module | QModel, calib_data, config: EvolQConfig | None = None, *,
                   arch: str = "", checkpoint_dir=None, resume: bool = False, subscribers=()):
    """Quantize ``model`` and improve its scales block by block with evolutionary search.

    Args:
        model: a float model (quantized in place and calibrated on the fitness part of
            ``calib_data``: the hold-out is split off first) or a ``QModel`` from
            ``prepare_model``, calibrated on data that excludes the hold-out
            (``evolq.data.split_calibration(x, search.holdout, search.seed)[0]``).
        calib_data: tensor of inputs, dataset or DataLoader (labels are ignored).
        config: ``EvolQConfig``; defaults are the paper's/the authors' settings.
        arch: architecture name, recorded for saving and loading.
        checkpoint_dir: folder for an atomic checkpoint after every block (one run
            per folder; see docs/reliability.md).
        resume: continue from the checkpoint in ``checkpoint_dir`` (same settings,
            model and data only); the result equals an uninterrupted run's. Without
            a checkpoint there, the run starts afresh.
        subscribers: objects with a ``subscribe(engine)`` method (``evolq.hooks``), or
            callables ``f(engine)``, attached to the engine's hooks before it runs.

    With ``config.search.actors`` the fitness runs on Ray actors (``evolq.scaleout``):
    Ray is started or joined, and its resources checked, before anything is prepared or
    written; the result equals the in-process one (docs/scale-out.md).

    Returns:
        ``(qmodel, report)``: the quantized model (``qmodel.model`` is the module)
        and a JSON-able report (per block: start/final fitness, evaluations,
        seconds; per pass: hold-out loss before/after and whether it was kept).

    Raises:
        ConfigError, DataError, UnsupportedModelError, CheckpointError, ScaleOutError:
        user mistakes and unusable clusters, with one-line messages. ``KeyboardInterrupt`` propagates after
        the model (and the checkpoint) are back at the last finished block.
    """
    from .engine import SearchEngine
    from .hooks import BlockLog, FitnessCurve, ProgressBar

    config = config or EvolQConfig()
    if not isinstance(config, EvolQConfig):
        raise ConfigError(f"config must be an EvolQConfig, got {type(config).__name__}")
    config.quant.validate()
    config.search.validate()
    search = config.search
    x = as_tensor_data(calib_data)
    fit_x, hold_x = split_calibration(x, search.holdout, search.seed)
    if search.loss == "infonce" and fit_x.shape[0] < search.infonce_batch:
        raise DataError(f"the fitness set has {fit_x.shape[0]} samples (after holding out {hold_x.shape[0]}), fewer "
                        f"than the infoNCE batch of {search.infonce_batch}: give more calibration data or lower "
                        f"infonce_batch")
    ckpt_dir = check_run_folder(checkpoint_dir, config, resume)
    placement = connect_ray(search)  # before anything is prepared or written
    t0 = time.perf_counter()
    if isinstance(model, QModel):
        qmodel = model
        if hold_x.shape[0] and qmodel.calibration_digests and qmodel.calibration_digests & sample_digests(hold_x):
            raise DataError("this QModel was calibrated on images that the search holds out; calibrate it on the "
                            "fitness part only (evolq.data.split_calibration(x, holdout, seed)[0]) or pass the "
                            "float model")
    else:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
        # split first: the hold-out never reaches the calibration statistics
        qmodel = prepare_model(model, fit_x, config.quant, arch=arch, progress=search.progress,
                               checkpoint_dir=ckpt_dir, resume=resume, holdout=hold_x)
    qmodel.model.to(resolve_device(search.device))
    fit_x, hold_x = fit_x.to(search.device), hold_x.to(search.device)
    settings = run_settings(config)
    run_id = fingerprint(qmodel.arch, qmodel.family, settings["quant"], settings["search"],
                         x[:: max(1, x.shape[0] // 16)])
    engine = SearchEngine(qmodel, fit_x, hold_x, search, config.quant.w_bits,
                          RunCheckpoint(qmodel, ckpt_dir, run_id, settings), placement=placement)
    log, curve = BlockLog().subscribe(engine), FitnessCurve().subscribe(engine)
    if search.progress:
        ProgressBar().subscribe(engine)
    for s in subscribers:
        s.subscribe(engine) if hasattr(s, "subscribe") else s(engine)
    state = engine.run(resume=resume)
    report = {
        "config": config.to_dict(),
        "calibration": {"fitness_samples": int(fit_x.shape[0]), "holdout_samples": int(hold_x.shape[0]),
                        "holdout_metric": search.holdout_metric},
        "blocks": log.blocks,
        "passes": log.passes,
        "evaluations": state["evaluations"],
        "search_seconds": state["seconds"],
        "seconds": time.perf_counter() - t0,
        "fitness_curve": curve.values,
    }
    if engine.scale_out is not None:
        report["scale_out"] = engine.scale_out.scale_out_report()
    if qmodel.start_report is not None:
        report["start"] = qmodel.start_report
    if qmodel.rotation_report is not None:
        report["rotation"] = qmodel.rotation_report
    return qmodel, report


def connect_ray(config):
    """Start or join Ray for ``config.actors`` (a ``SearchConfig`` or ``AllocationConfig``;
    ``evolq.scaleout.connect``): the ``Placement``, or None in-process. Warns
    (``ScaleOutWarning``) when a scale search's searcher is steady-state."""
    if config.actors == 0:
        return None
    import warnings

    from .config import SearchConfig
    from .scaleout import ScaleOutWarning, connect
    from .search import is_steady_state

    if isinstance(config, SearchConfig) and is_steady_state(config.searcher):
        warnings.warn(ScaleOutWarning(f"the {config.searcher} searcher evaluates one candidate per step, so its "
                                      f"actors take turns instead of sharing work; use a population searcher "
                                      f"(batched-tournament, cmaes, snes, pgpe) to gain from actors"), stacklevel=3)
    return connect(config.actors, config.ray_address)


def allocate_bits(model: nn.Module, calib_data, quant: QuantConfig | None = None, config=None, *, arch: str = "",
                  checkpoint_dir=None, resume: bool = False, search=None, subscribers=()):
    """Choose bits per layer under a budget by evolutionary search, then build that model.

    The calibration data is split into a hold-out (``config.holdout``; never calibrates, never
    enters the fitness) and the rest, which calibrates a proxy of ``model`` in the ``quant`` regime,
    quantizes every layer at every menu width once (``evolq.allocation.tables``) and scores
    allocations on ``config.fitness_images`` of its images against the float outputs. The searcher
    (``config.searcher``, NSGA-II by default) spends ``config.evaluations`` evaluations on the front
    of [loss, size] (with a ``latency-ms`` budget [loss, size, latency], the latency predicted by a
    per-layer table timed in the deploy runtime: ``evolq.allocation.latency``) under the budget;
    the hold-out chooses one allocation among the best front points. With ``config.actors`` the
    fitness runs on Ray actors (``evolq.scaleout``; Ray is started or joined before anything is
    prepared or written) with the in-process result. The final model is then built
    as ``prepare_model`` builds any model, with ``quant.layer_bits`` set to that allocation and
    ``quant.start`` (rtn, gptq, brecq, ofq) as its start; ``search`` (a ``SearchConfig`` with
    ``passes > 0``) runs Evol-Q's scale search on top.

    Args:
        model: a float model (quantized in place; a copy becomes the proxy).
        calib_data: tensor, dataset or DataLoader of calibration inputs.
        quant: the regime and start of the final model (its ``layer_bits`` are chosen here).
        config: an ``AllocationConfig``.
        checkpoint_dir: run folder: the allocation is checkpointed after every generation, the
            start after every block or epoch; ``resume`` continues a killed run there.
        search: optional ``SearchConfig`` of an Evol-Q scale search on the chosen model.
        subscribers: objects with ``subscribe(engine)`` (or callables) on the ``AllocationEngine``.

    Returns:
        ``(qmodel, report)``; ``report["allocation"]`` is the chosen ``layer_bits``, with
        ``avg_bits`` and ``size_bytes`` (and ``latency_ms``, the predicted latency, with the table
        and its validation in ``report["latency"]``); ``report["front"]`` every front point.
    """
    import dataclasses

    from .allocation.engine import AllocationEngine
    from .allocation.setup import genes_to_bits, prepare_allocation
    from .config import AllocationConfig, EvolQConfig
    from .hooks import AllocationProgress

    quant = quant or QuantConfig()
    config = config or AllocationConfig()
    if not isinstance(config, AllocationConfig):
        raise ConfigError(f"config must be an AllocationConfig, got {type(config).__name__}")
    quant.validate()
    config.validate()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
    from .allocation.latency import check_latency_budget

    check_latency_budget(quant, config)  # deploy regime and runtime, before any expensive work
    x = as_tensor_data(calib_data)
    fit_x, hold_x = split_calibration(x, config.holdout, config.seed)
    if fit_x.shape[0] == 0:
        raise DataError("no calibration images are left after the hold-out: give more or lower holdout")
    check_alloc_folder(checkpoint_dir, resume, create=False)
    placement = connect_ray(config)  # before anything is prepared or written
    folder = check_alloc_folder(checkpoint_dir, resume)
    t0 = time.perf_counter()
    model.eval()
    setup = prepare_allocation(model, fit_x, hold_x, quant, config, arch=arch, progress=config.progress,
                               placement=placement, folder=folder, resume=resume)
    settings = {"quant": dataclasses.asdict(quant), "allocation": config.to_dict(), "arch": arch,
                "data": fingerprint(x[:: max(1, x.shape[0] // 16)])}
    for k in ("progress", "device", "cache_mb", "actors", "ray_address"):  # free to differ on resume
        settings["allocation"].pop(k, None)
    engine = AllocationEngine(setup.problem, setup.fitness, searcher=config.searcher,
                              searcher_kwargs=config.searcher_kwargs, popsize=config.popsize,
                              evaluations=config.evaluations, seed=config.seed, holdout=setup.holdout,
                              reference=setup.reference, select=config.select,
                              compare_additive=config.compare_additive, folder=folder,
                              settings=json.loads(json.dumps(settings, default=str)))
    if config.progress:
        AllocationProgress().subscribe(engine)
    for s in subscribers:
        s.subscribe(engine) if hasattr(s, "subscribe") else s(engine)
    try:
        result = engine.run(resume=resume)
    finally:
        setup.problem.close()
    scale_out = None
    if placement is not None:
        scale_out = setup.problem.scale_out_report()
    if result["chosen"] is None:
        raise ConfigError("the search found no allocation under the budget")  # pragma: no cover (repair guarantees)
    genes = torch.tensor(result["front"][result["chosen"]]["genes"])
    bits = genes_to_bits(setup.layers, setup.menu, genes)
    for pt in result["front"]:
        pt["avg_bits"] = float(setup.sizes.avg_bits(torch.tensor(pt["genes"]))[0])
        pt["allocation"] = genes_to_bits(setup.layers, setup.menu, pt["genes"])
    uniform = []
    for o in setup.menu.options:
        g = setup.sizes.uniform(o)
        uniform.append({"option": o, "size_bytes": float(setup.sizes.bytes(g)[0]),
                        "avg_bits": float(setup.sizes.avg_bits(g)[0]),
                        "loss": float(setup.fitness(g[None])[0]),
                        "holdout_loss": float(setup.holdout(g[None])[0]) if setup.holdout is not None else None})
        if setup.latency is not None:
            uniform[-1]["latency_ms"] = float(setup.latency.predict(g)[0])
    latency = None
    if setup.latency is not None:
        latency = {"table_ms": setup.latency.table.tolist(), "constant_ms": setup.latency.constant,
                   "menu": list(setup.menu.options), **setup.latency.record}
    search_seconds = time.perf_counter() - t0
    del setup  # the proxy and its tables are not needed for the final model
    final_quant = dataclasses.replace(quant, layer_bits=bits, w_group=None)  # all layers named; bare widths per channel
    qmodel = prepare_model(model, fit_x, final_quant, arch=arch, progress=config.progress, checkpoint_dir=folder,
                           resume=resume, holdout=hold_x)
    report_search = None
    if search is not None and search.passes > 0:
        search = dataclasses.replace(search, holdout=config.holdout, seed=config.seed)  # the same hold-out
        qmodel, report_search = quantize_model(qmodel, x, EvolQConfig(final_quant, search), arch=arch,
                                               checkpoint_dir=folder, resume=resume)
    chosen = result["front"][result["chosen"]]
    report = {"allocation": bits, "avg_bits": chosen["avg_bits"], "size_bytes": chosen["size_bytes"],
              "budget": {"kind": config.budget_kind[0], "value": config.budget_kind[1]},
              "chosen": chosen, "chosen_index": result["chosen"], "front": result["front"], "uniform": uniform,
              "search": {k: v for k, v in result.items() if k not in ("front", "chosen")},
              "config": {"quant": dataclasses.asdict(final_quant), "allocation": config.to_dict()},
              "calibration": {"fitness_images": min(config.fitness_images, int(fit_x.shape[0])),
                              "calibration_images": int(fit_x.shape[0]), "holdout_images": int(hold_x.shape[0])},
              "search_seconds": search_seconds, "seconds": time.perf_counter() - t0}
    if latency is not None:
        report["latency_ms"] = chosen["latency_ms"]
        report["latency"] = latency
    if qmodel.start_report is not None:
        report["start"] = qmodel.start_report
    if qmodel.rotation_report is not None:
        report["rotation"] = qmodel.rotation_report
    if report_search is not None:
        report["evolq"] = report_search
    if scale_out is not None:
        report["scale_out"] = scale_out
    return qmodel, report


def check_alloc_folder(folder, resume: bool, create: bool = True):
    """The run folder of an allocation (None: memory only); refuses a folder holding another run
    unless resuming; ``create``: make it (else only check)."""
    from pathlib import Path

    from .allocation.engine import ALLOC_CKPT_NAME
    from .errors import CheckpointError

    if folder is None:
        if resume:
            raise ConfigError("resume needs the folder of the run to continue")
        return None
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} exists and is not a folder")
    if (folder / ALLOC_CKPT_NAME).exists() and not resume:
        raise CheckpointError(f"{str(folder)!r} already holds an allocation run: resume it or choose another folder")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
