"""A true multi-process run: 2 JAX processes x 4 CPU devices on loopback (gloo collectives).

``examples/multiprocess_ring.py`` launches the processes; each runs ring attention and the
key-sharded path (values and gradients of a packed, windowed, grouped-query causal case)
on one global 8-device mesh. Their results must
equal this process's, computed on 8 simulated devices of one process, and the
single-device materialised path.
"""

import contextlib
import importlib
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from flax_dotattn import dot_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPUS = jax.devices("cpu")
pytestmark = [
    pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 (simulated) CPU devices"),
    pytest.mark.slow,
]


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    sys.modules.pop("multiprocess_ring", None)
    return importlib.import_module("multiprocess_ring")


def _launch(out: pathlib.Path, timeout: float) -> None:
    """Runs the launcher in its own process group, killed whole if anything goes wrong."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    script = str(ROOT / "examples/multiprocess_ring.py")
    command = [sys.executable, script, "--processes", "2", "--local-devices", "4",
               "--out", str(out), "--timeout", str(timeout - 5)]  # fmt: skip
    launcher = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = launcher.communicate(timeout=timeout)
    finally:
        # The launcher and both workers share the launcher's process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, output.decode(errors="replace")[-4000:]


def test_two_processes_match_one_process(example, tmp_path):
    out = tmp_path / "results.npz"
    _launch(out, timeout=85)
    multi = dict(np.load(out))

    mesh = Mesh(np.array(CPUS[:8]), ("seq",))
    inputs = example.make_inputs(mesh)
    single = example.compute(mesh, inputs)
    assert sorted(multi) == sorted(single)
    for name, expected in single.items():
        # The ring is the same program on the same 8 devices; psum orders may differ.
        np.testing.assert_allclose(multi[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)

    # And both equal one device's materialised attention.
    q, k, v = (np.asarray(inputs[n]) for n in ("query", "key", "value"))
    masks = (np.asarray(inputs["query_mask"]), np.asarray(inputs["value_mask"]))
    ids = np.asarray(inputs["segment_ids"])
    reference = dot_attention(
        {"scale": jnp.float32(0.8)}, q, v, k, masks, True, implementation="xla",
        segment_ids=(ids, ids), window=example.WINDOW,
    )  # fmt: skip
    for path in ("ring", "seqpar"):
        np.testing.assert_allclose(multi[f"{path}_out"], reference, rtol=2e-5, atol=2e-5)
