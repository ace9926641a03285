"""``python -m flax_dotattn.bench --device`` (the accelerator table) runs end to end: on a
CPU host at a tiny size it times the entries this platform has, names the kernel each
took, and skips the GPU- and TPU-only entries."""

import json

import pytest

from flax_dotattn.bench import main


@pytest.mark.slow
def test_device_table_runs_on_cpu_at_a_tiny_size(tmp_path, capsys):
    path = tmp_path / "device.json"
    argv = ["--device", "--shapes", "1x32", "--depth", "16", "--repeats", "1", "--causal"]
    assert main([*argv, "--json", str(path), "--markdown", str(tmp_path / "device.md")]) == 0
    rows = json.loads(path.read_text())["rows"]
    taken = {(r["impl"], r["mode"]): r["kernel"] for r in rows}
    assert taken == {
        ("ours", "fwd"): "xla",
        ("ours", "fwd_bwd"): "xla",
        ("naive", "fwd"): "xla einsum",
        ("naive", "fwd_bwd"): "xla einsum",
    }
    assert all(r["seconds"] > 0 and r["causal"] for r in rows)
    err = capsys.readouterr().err
    assert "jax_nn_cudnn needs a GPU" in err and "splash needs a TPU" in err
    assert "| 32 | fwd_bwd causal | ours | xla |" in (tmp_path / "device.md").read_text()


def test_device_entries_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "--impls", "chunked"])
    assert "with --device" in capsys.readouterr().err
