"""The Pareto figure of a bit-allocation run: loss against packed size, one front per searcher,
the uniform widths, the budget and the chosen point (matplotlib, written as PNG)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_fronts"]


def plot_fronts(fronts: dict, path, *, uniform=(), budget_bytes: float | None = None, chosen: dict | None = None,
                title: str = "") -> Path:
    """``fronts``: searcher name -> list of points ``{"size_bytes", "loss", "holdout_loss"?}``;
    ``uniform``: points ``{"option", "size_bytes", "loss"}``; writes ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, pts in fronts.items():
        pts = sorted(pts, key=lambda p: p["size_bytes"])
        if pts:
            ax.plot([p["size_bytes"] / 1e6 for p in pts], [p["loss"] for p in pts], marker="o", ms=3, lw=1,
                    label=f"{name} front")
    us = [u for u in uniform if u.get("loss") is not None]
    if us:
        ax.scatter([u["size_bytes"] / 1e6 for u in us], [u["loss"] for u in us], marker="s", color="black",
                   zorder=3, label="uniform widths")
        for u in us:
            ax.annotate(f"W{u['option']}", (u["size_bytes"] / 1e6, u["loss"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    if budget_bytes is not None:
        ax.axvline(budget_bytes / 1e6, color="grey", ls="--", lw=1, label="budget")
    if chosen is not None:
        ax.scatter([chosen["size_bytes"] / 1e6], [chosen["loss"]], marker="*", s=160, color="red", zorder=4,
                   label="chosen (hold-out)")
    ax.set_xlabel("packed size (MB)")
    ax.set_ylabel("fitness loss (proxy)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
