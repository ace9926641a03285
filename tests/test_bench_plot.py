"""``python -m flax_dotattn.bench --plot``: the figure is drawn from result rows."""

import json

import pytest

from flax_dotattn import bench
from flax_dotattn.bench.entries import MODES
from flax_dotattn.bench.plot import plot, plot_title


def _rows():
    """A tiny fake result set: two lengths, both modes, three implementations."""
    rows = []
    for t in (256, 1024):
        for mode in MODES:
            for i, impl in enumerate(("naive", "chunked", "jax_nn")):
                rows.append(
                    dict(batch=1, length=t, depth=64, mode=mode, impl=impl,
                         seconds=1e-3 * t / 256 * (i + 1), gflops=1.0,
                         peak_mib=None if impl == "jax_nn" else 0.5 * t / 256 * (i + 1),
                         speedup_vs_naive=1.0 / (i + 1))
                )  # fmt: skip
    return rows


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    title = plot_title("CPU (test)", 64, [0.5, 1.5])
    assert plot(_rows(), str(path), title) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_cli_replots_a_saved_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps({"machine": "CPU (test)", "depth": 64, "rows": _rows()}))
    out = tmp_path / "bench.png"
    assert bench.main(["--from-json", str(saved), "--plot", str(out)]) == 0
    assert out.stat().st_size > 10_000 and "plot:" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(RuntimeError, match=r"needs matplotlib.*examples"):
        plot(_rows(), "unused.png")
