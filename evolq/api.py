"""The user verbs: ``prepare_model`` (the start point) and ``quantize_model`` (start
point + Evol-Q search). Saving and loading are in ``evolq.io``, run state in
``evolq.checkpoint``, the schedule in ``evolq.engine``."""
from __future__ import annotations

import time

import torch
from torch import nn

from .adapters import check_inputs, wrap_model
from .checkpoint import RunCheckpoint, check_run_folder, fingerprint, run_settings
from .config import EvolQConfig, QuantConfig
from .data import as_tensor_data, resolve_device, split_calibration
from .errors import ConfigError, DataError
from .io import load_quantized, save_quantized
from .qnn.calibrate import calibrate, sample_digests
from .qnn.qmodel import QModel

__all__ = ["prepare_model", "quantize_model", "save_quantized", "load_quantized"]


def prepare_model(model: nn.Module, calib_data, quant: QuantConfig | None = None, arch: str = "",
                  progress: bool = False, checkpoint_dir=None, resume: bool = False, holdout=None,
                  subscribers=()) -> QModel:
    """Quantize ``model`` in place (the ``quant`` regime, FQ-ViT by default) and
    calibrate it on ``calib_data``: the start point of the search. In the deploy regime
    SmoothQuant factors are folded into the float model first (``evolq.qnn.smooth``). With
    ``quant.start`` "gptq" or "brecq" the weights' rounding is then reconstructed
    block by block (``evolq.qnn.reconstruct``; report in ``qmodel.start_report``),
    checkpointed after every block in ``checkpoint_dir`` and resumable; with "ofq" the
    quantized weights are fine-tuned on ``calib_data`` (checkpointed after every epoch).
    ``holdout``: inputs kept out of calibration and of the start, on which the ``ofq``
    start reports the KL to the float model before and after its fine-tune. ``subscribers``:
    objects with a ``subscribe(hooks)`` method, or callables ``f(hooks)``, attached to the
    start's hooks (``evolq.hooks.StartHooks``: the ``ofq`` fine-tune's epochs, CGA phase and
    end of training) before it runs."""
    quant = quant or QuantConfig()
    quant.validate()
    x = as_tensor_data(calib_data)
    model.eval()
    qmodel = wrap_model(model, quant, arch=arch)
    check_inputs(qmodel, x)
    if quant.smoothing > 0:  # deploy regime: an exact float transform, before any statistics are taken
        from .qnn.smooth import smooth_model

        qmodel.smooth_report = smooth_model(qmodel, x, quant.smoothing)
    calibrate(qmodel, x, progress=progress)
    if quant.start != "rtn":
        from .hooks import StartHooks
        from .qnn.reconstruct import run_start

        hooks = StartHooks()
        for s in subscribers:
            s.subscribe(hooks) if hasattr(s, "subscribe") else s(hooks)
        empty = holdout is None or (isinstance(holdout, torch.Tensor) and holdout.ndim > 0 and holdout.shape[0] == 0)
        hold = None if empty else as_tensor_data(holdout, "hold-out data")
        qmodel.start_report = run_start(qmodel, x, quant, progress=progress, checkpoint_dir=checkpoint_dir,
                                        resume=resume, holdout=hold, hooks=hooks)
    return qmodel


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

    Returns:
        ``(qmodel, report)``: the quantized model (``qmodel.model`` is the module)
        and a JSON-able report (per block: start/final fitness, evaluations,
        seconds; per pass: hold-out loss before/after and whether it was kept).

    Raises:
        ConfigError, DataError, UnsupportedModelError, CheckpointError: user
        mistakes, with one-line messages. ``KeyboardInterrupt`` propagates after
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
                          RunCheckpoint(qmodel, ckpt_dir, run_id, settings))
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
    if qmodel.start_report is not None:
        report["start"] = qmodel.start_report
    return qmodel, report
