"""The figure: time and peak memory against T, one line per implementation.

matplotlib is imported only when drawing (``pip install -e ".[examples]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax_dotattn.bench.entries import IMPLS, MODES

#: One colour and marker per implementation, the same in every panel.
#: Open markers and dashes let lines that coincide (naive, xla and the automatic choice
#: below the crossover run the same computation) show through each other.
_STYLE = {
    "naive": dict(color="black", marker="o", linestyle="--", fillstyle="none"),
    "default": dict(color="tab:blue", marker="s", linestyle="-", fillstyle="full"),
    "xla": dict(color="tab:cyan", marker="v", linestyle=":", fillstyle="none"),
    "chunked": dict(color="tab:orange", marker="D", linestyle="-", fillstyle="none"),
    "jax_nn": dict(color="tab:green", marker="^", linestyle="-", fillstyle="full"),
    "keras": dict(color="tab:red", marker="x", linestyle="-.", fillstyle="full"),
    "torch_sdpa": dict(color="tab:purple", marker="P", linestyle="-", fillstyle="full"),
}
_LABELS = {
    "naive": "naive einsum-softmax-einsum",
    "default": "dot_attention (automatic)",
    "xla": 'dot_attention "xla"',
    "chunked": 'dot_attention "chunked"',
    "jax_nn": "jax.nn.dot_product_attention",
    "keras": "keras.layers.Attention",
    "torch_sdpa": "torch scaled_dot_product_attention",
}

#: Each row of panels: the row field drawn, its factor to the unit shown, the y label.
#: Without memory probes (``--no-memory``) only the time panels are drawn.
_PANELS = (("seconds", 1e3, "median time per call (ms)"), ("peak_mib", 1.0, "peak MiB"))


def require_matplotlib():
    """Imports matplotlib with a non-interactive backend, or explains how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed; it comes with the examples "
            'extra: pip install -e ".[examples]" (or pip install matplotlib).'
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
    """Draws time and peak memory against T, forward and forward+backward, to ``path``.

    Four panels on log axes: median time (top) and peak memory (bottom), forward (left)
    and forward+backward (right), one line per implementation in the same colour
    everywhere. Entries without a value (e.g. ``--no-memory``) are left out.

    Args:
      rows: result rows as :func:`main` writes them to ``--json`` (``batch``, ``length``,
        ``mode``, ``impl``, ``seconds``, ``peak_mib``).
      path: image file to write; the suffix picks the format (``.png``, ``.svg``, ...).
      title: figure title, e.g. the machine and its load.

    Returns:
      ``path``.

    Raises:
      RuntimeError: when matplotlib is not installed.
    """
    plt = require_matplotlib()
    panels = _PANELS if any(r.get("peak_mib") is not None for r in rows) else _PANELS[:1]
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(10, 3.6 * len(panels) + 0.6), sharex=True, squeeze=False
    )
    for col, mode in enumerate(MODES):
        for row, (field, factor, label) in enumerate(panels):
            ax = axes[row][col]
            _draw_lines(ax, rows, mode, field, factor)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title("forward" if mode == "fwd" else "forward + backward")
            if row == len(panels) - 1:
                _label_lengths(ax, rows)
    _legend(fig, axes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_lines(ax, rows: Sequence[dict[str, Any]], mode: str, field: str, factor: float):
    """One line per implementation: ``field`` (times ``factor``) against T, in ``mode``."""
    for impl in IMPLS:
        points = sorted(
            (r["length"], r[field] * factor)
            for r in rows
            if r["impl"] == impl and r["mode"] == mode and r.get(field) is not None and r[field] > 0
        )
        if points:
            lengths, values = zip(*points, strict=True)
            ax.plot(lengths, values, label=_LABELS[impl], linewidth=1.5, **_STYLE[impl])


def _label_lengths(ax, rows: Sequence[dict[str, Any]]) -> None:
    """The x axis of a bottom panel: one tick per length, ``BxT`` when batches differ."""
    batches = {r["batch"] for r in rows}
    ticks = sorted({(r["length"], r["batch"]) for r in rows})
    ax.set_xlabel("sequence length T" + ("" if len(batches) == 1 else " (B x T)"))
    ax.set_xticks([t for t, _ in ticks])
    if len(batches) == 1:
        ax.set_xticklabels([str(t) for t, _ in ticks])
    else:
        ax.set_xticklabels([f"{b}x{t}" for t, b in ticks], rotation=35, ha="right")
    ax.minorticks_off()


def _legend(fig, axes) -> None:
    """One legend entry per implementation, across panels, below them."""
    handles: dict[str, Any] = {}
    for ax in (a for line in axes for a in line):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, frameon=False)


def plot_title(machine_text: str, depth: int, load: Sequence[float] | None) -> str:
    """The figure title: machine, depth and dtype, and the load average during the run."""
    text = f"{machine_text}; D = {depth}, float32"
    if load:
        text += f"\nload average (1 min) {load[0]:.2f} at start, {load[-1]:.2f} at end"
    return text
