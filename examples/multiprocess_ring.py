"""Ring and key-sharded attention across separate processes, as on a multi-host pod.

The launcher starts ``--processes`` copies of this script on this machine. Each is one JAX
process with ``--local-devices`` simulated CPU devices; they find each other through
``jax.distributed.initialize`` on a loopback port and exchange data with CPU collectives
(gloo). Together they form one global mesh (``processes x local-devices`` devices, axis
``"seq"``), on which every process runs the same program: :func:`ring_attention` and
:func:`sequence_parallel_attention`, values and gradients of a packed (segment ids),
windowed, grouped-query (key/value heads shared by query groups) causal case, on global
inputs that each
process builds identically from a fixed seed (``jax.make_array_from_callback`` gives each
process only its own shards). Process 0 gathers the results and writes them to ``--out``.

This is the code path of a TPU/GPU pod: there each host runs the same script with its own
``process_id`` (or lets ``jax.distributed.initialize()`` read them from the cluster) and
its local accelerators instead of simulated CPU devices.

Run::

    python examples/multiprocess_ring.py --processes 2 --local-devices 4 --out /tmp/ring.npz

``tests/test_multiprocess.py`` runs it and compares with one process.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

SEED = 0
# Grouped-query attention: query [batch, kv_heads, groups, length, depth] against key/value
# [batch, kv_heads, 1, length, depth]. Length divisible by 2 x 8 devices.
SHAPE = dict(batch=2, kv_heads=2, groups=2, length=64, depth=8, value_depth=8)
#: Packed documents (sorted segment ids), a causal sliding window.
WINDOW = (12, 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="JAX processes (default: 2)")
    parser.add_argument("--local-devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--out", default="multiprocess_ring.npz", help="results (process 0)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for the run")
    # Internal: how the launcher starts each process.
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    return parser


# -- what every process runs ------------------------------------------------------------


def make_inputs(mesh: Any) -> dict[str, Any]:
    """Global inputs, sharded along the sequence over ``mesh``'s ``"seq"`` axis.

    Every process computes the same NumPy arrays from :data:`SEED` and hands JAX only the
    slices its own devices hold.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    rng = np.random.default_rng(SEED)
    b, h, g, t, d, dv = (
        SHAPE[k] for k in ("batch", "kv_heads", "groups", "length", "depth", "value_depth")
    )
    # Documents of random lengths packed into each row (ids sorted along the sequence).
    ids = np.sort(rng.integers(0, 5, size=(b, 1, 1, t)), axis=-1).astype(np.int32)
    host = {
        "query": rng.normal(size=(b, h, g, t, d)).astype(np.float32),
        "key": rng.normal(size=(b, h, 1, t, d)).astype(np.float32),
        "value": rng.normal(size=(b, h, 1, t, dv)).astype(np.float32),
        "query_mask": rng.random((b, h, g, t)) > 0.1,
        "value_mask": rng.random((b, 1, 1, t)) > 0.2,
        "segment_ids": ids,
    }
    host["value_mask"][1, ..., :4] = False  # causal: queries 0-3 of row 1 see no key
    sequence = PartitionSpec(None, None, None, "seq", None)
    specs = {
        "query": sequence,
        "key": sequence,
        "value": sequence,
        "query_mask": PartitionSpec(None, None, None, "seq"),
        "value_mask": PartitionSpec(None, None, None, "seq"),
        "segment_ids": PartitionSpec(None, None, None, "seq"),
    }
    arrays = {
        name: jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, specs[name]), lambda index, x=x: x[index]
        )
        for name, x in host.items()
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    arrays["params"] = {
        "scale": jax.make_array_from_callback((), replicated, lambda _: np.float32(0.8))
    }
    return arrays


def compute(mesh: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs and gradients of both sequence-parallel paths, gathered as NumPy arrays."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from flax_dotattn import ring_attention, sequence_parallel_attention

    paths = {"ring": ring_attention, "seqpar": sequence_parallel_attention}
    results = {}
    for name, attention in paths.items():

        def loss(params, q, k, v, masks, ids, attention=attention):
            out = attention(
                params, q, v, k, masks, True, mesh=mesh, axis_name="seq", block_size=(4, 4),
                segment_ids=(ids, ids), window=WINDOW,
            )  # fmt: skip
            return jnp.sum(jnp.sin(out)), out

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        (_, out), (d_params, dq, dk, dv) = grad(
            inputs["params"],
            inputs["query"],
            inputs["key"],
            inputs["value"],
            (inputs["query_mask"], inputs["value_mask"]),
            inputs["segment_ids"],
        )
        parts = {"out": out, "dscale": d_params["scale"], "dq": dq, "dk": dk, "dv": dv}
        for part, x in parts.items():
            results[f"{name}_{part}"] = multihost_utils.process_allgather(x, tiled=True)
    return results


def worker(args: argparse.Namespace) -> None:
    """One process of the run: joins the others, computes, and process 0 saves."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.sharding import Mesh

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    assert jax.device_count() == args.processes * args.local_devices, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("seq",))  # every process's devices, in order
    results = compute(mesh, make_inputs(mesh))
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    jax.distributed.shutdown()


# -- the launcher -----------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> None:
    """Starts the processes, waits for all of them, and kills the rest if one fails."""
    coordinator = f"127.0.0.1:{free_port()}"
    command = [sys.executable, os.path.abspath(__file__)]
    common = ["--processes", str(args.processes), "--local-devices", str(args.local_devices),
              "--out", args.out, "--coordinator", coordinator]  # fmt: skip
    children = [
        subprocess.Popen([*command, *common, "--process-id", str(i)]) for i in range(args.processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        while any(c.poll() is None for c in children):
            failed = [c for c in children if c.returncode not in (None, 0)]
            if failed:
                raise SystemExit(
                    f"process {children.index(failed[0])} exited {failed[0].returncode}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {args.timeout:.0f} s")
            time.sleep(0.1)
        codes = [c.returncode for c in children]
        if any(codes):
            raise SystemExit(f"process exit codes {codes}")
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                child.wait()
    print(f"{args.processes} processes x {args.local_devices} devices: results in {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.process_id is None:
        launch(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
