"""Configuration objects, typed and validated on construction: what to quantize
(``QuantConfig``, ``quant.py``) and how to search block scales (``SearchConfig``), bundled in
``EvolQConfig`` for ``quantize_model`` (``search.py``); a per-layer bit allocation
(``AllocationConfig``, ``allocation.py``); the shared validators and ``field_default``
(``checks.py``)."""
from __future__ import annotations

from .allocation import BUDGET_KINDS, TABLE_METHODS, AllocationConfig, parse_budget
from .checks import field_default
from .quant import DEPLOY_STRENGTH, DEPLOY_WEIGHTS, REGIMES, STARTS, QuantConfig
from .search import SCOPES, UNITS, EvolQConfig, SearchConfig

__all__ = ["QuantConfig", "SearchConfig", "EvolQConfig", "AllocationConfig", "parse_budget", "SCOPES", "REGIMES",
           "STARTS", "UNITS", "BUDGET_KINDS", "TABLE_METHODS", "DEPLOY_WEIGHTS", "DEPLOY_STRENGTH", "field_default"]
