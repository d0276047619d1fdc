"""The report's figures: matplotlib drawing off-screen (Agg), and the one finish every plot of the report gets."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: only the report draws."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def axes(size: tuple[float, float] = (5.5, 3.6)):
    """(figure, axes) of one plot of the report."""
    return pyplot().subplots(figsize=size, dpi=90)


def save(fig, ax, path: Path) -> Path:
    """Grid, legend, tight layout, written to `path` and closed."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path
