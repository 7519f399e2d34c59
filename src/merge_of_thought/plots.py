"""PNG plots of per-round curves, for the model card and ``mot compare``; matplotlib is the optional extra ``plot``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOT_HINT = '`pip install "merge-of-thought[plot]"`'


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    ylabel: str,
    xlabel: str = "MoT round (0: the starting student)",
) -> bool:
    """One line per label through its ``(x, value)`` points, as a PNG; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, points in curves.items():
        if points:
            ax.plot([r for r, _ in points], [v for _, v in points], "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
