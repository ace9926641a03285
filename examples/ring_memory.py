"""Per-device memory and causal work of ring attention on simulated CPU devices.

For causal self-attention of length ``--length`` and depth ``--depth`` it reports, per
device, what XLA's compiled memory analysis of ``jax.grad`` (forward + backward) holds:
temporaries (activations, the figure to compare), arguments and outputs, for

* one device, the chunked kernel (``dot_attention(..., implementation="chunked")``);
* ``sequence_parallel_attention`` (keys/values sharded, queries replicated);
* ``ring_attention`` with the zig-zag (default for causal) and the contiguous layout.

Nothing runs for the memory figures (compilation only). Then it runs the ring's forward
pass once per layout and counts the kernel blocks each device computes (see
``flax_dotattn._src.parallel.ring.blocks_per_device``), and with ``--time`` times forward+backward
(wall time of simulated devices sharing this machine's cores says little about real
speed-up). With ``--window W`` it instead times the ring's forward+backward with
``window=(W, 0)`` against the full causal ring and counts the ring steps each runs
(``flax_dotattn._src.parallel.ring.ring_work``).

Run::

    python examples/ring_memory.py --length 32768 --depth 64 --devices 8
    python examples/ring_memory.py --length 32768 --devices 8 --paths seqpar zigzag \
        contiguous --window 1024
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Sequence
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="T = Tq = Tv")
    parser.add_argument("--depth", type=int, default=64, help="D = Dv")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--block-size", type=int, nargs=2, default=None, metavar=("BQ", "BK"),
                        help="kernel blocks (default: BlockSizes.default)")  # fmt: skip
    parser.add_argument("--time", action="store_true", help="also time forward+backward")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="also time the ring's forward+backward with window=(W, 0) "
                             "against the full causal ring, and count its steps")  # fmt: skip
    parser.add_argument("--paths", nargs="+", default=None, metavar="PATH",
                        help="memory rows to compile: one, seqpar, zigzag, contiguous "
                             "(default: all)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from flax_dotattn import dot_attention, ring_attention, sequence_parallel_attention
    from flax_dotattn._src.parallel.ring import blocks_per_device, ring_work

    cpus = jax.devices("cpu")
    if len(cpus) < args.devices:
        raise SystemExit(f"needs {args.devices} CPU devices; JAX was initialised with {len(cpus)}")
    mesh = Mesh(np.array(cpus[: args.devices]), ("seq",))
    shape = (args.batch, args.length, args.depth)
    one = jax.ShapeDtypeStruct(shape, jnp.float32)
    seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
    sharded = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=seq)
    common = dict(causal=True, block_size=args.block_size and tuple(args.block_size))
    shard = dict(mesh=mesh, axis_name="seq")
    all_paths = {
        "one device, chunked": (functools.partial(dot_attention, implementation="chunked"), one),
        "sequence_parallel_attention": (
            functools.partial(sequence_parallel_attention, **shard),
            sharded,
        ),
        "ring_attention, zigzag": (
            functools.partial(ring_attention, layout="zigzag", **shard),
            sharded,
        ),
        "ring_attention, contiguous": (
            functools.partial(ring_attention, layout="contiguous", **shard),
            sharded,
        ),
    }
    short = dict(zip(("one", "seqpar", "zigzag", "contiguous"), all_paths, strict=True))
    chosen = [short[p] for p in args.paths] if args.paths else list(all_paths)
    paths = {name: all_paths[name] for name in chosen}

    def grad_of(attention):
        loss = lambda q, k, v: jnp.sum(attention(None, q, v, k, **common))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    mib = 2.0**-20
    print(f"causal, T={args.length}, D={args.depth}, batch={args.batch}, {args.devices} devices,")
    print(f"blocks {args.block_size or 'default'}; per device, jax.grad (forward + backward):")
    print("| path | temp MiB | arguments MiB | outputs MiB |")
    print("|---|---:|---:|---:|")
    results: dict[str, Any] = {"memory": {}, "blocks": {}, "seconds": {}}
    for name, (attention, arg) in paths.items():
        stats = grad_of(attention).lower(arg, arg, arg).compile().memory_analysis()
        row = (stats.temp_size_in_bytes, stats.argument_size_in_bytes, stats.output_size_in_bytes)
        results["memory"][name] = row
        print(f"| {name} | {row[0] * mib:.1f} | {row[1] * mib:.1f} | {row[2] * mib:.1f} |")

    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.normal(size=shape), jnp.float32), seq)
    if args.window is not None:
        print(f"\nring, forward+backward, causal, full vs window=({args.window}, 0) "
              "(default layouts; steps = ring steps run per device):")  # fmt: skip
        for label, extra in (("full", {}), (f"window={args.window}", {"window": (args.window, 0)})):
            work = ring_work(None, x, x, x, **shard, **common, **extra)
            attention = functools.partial(ring_attention, **shard, **extra)
            grad = grad_of(attention)
            jax.block_until_ready(grad(x, x, x))  # compile and warm up
            start = time.perf_counter()
            jax.block_until_ready(grad(x, x, x))
            results["seconds"][label] = seconds = time.perf_counter() - start
            print(f"  {label:12s} {seconds:7.2f} s  steps {work['steps'].max()}, "
                  f"derivative steps {work['derivative_steps'].max()}, "
                  f"blocks/device max {work['blocks'].max()}")  # fmt: skip
        ratio = results["seconds"][f"window={args.window}"] / results["seconds"]["full"]
        results["window_ratio"] = ratio
        print(f"  window / full: {ratio:.2f}")
        return results
    print("\nkernel blocks computed per device, ring forward:")
    for layout in ("contiguous", "zigzag"):
        work = blocks_per_device(None, x, x, x, layout=layout, **shard, **common)
        results["blocks"][layout] = work
        print(f"  {layout:10s} {work.tolist()}  max/min {work.max() / work.min():.2f}, "
              f"max/mean {work.max() / work.mean():.2f}")  # fmt: skip

    if args.time:
        print("\nforward+backward wall time (simulated devices share this machine's cores):")
        for name, (attention, _) in paths.items():
            grad = grad_of(attention)
            inputs = (x, x, x) if "device" not in name else (jax.device_put(x, cpus[0]),) * 3
            jax.block_until_ready(grad(*inputs))
            start = time.perf_counter()
            jax.block_until_ready(grad(*inputs))
            results["seconds"][name] = seconds = time.perf_counter() - start
            print(f"  {name}: {seconds:.2f} s")
    return results


if __name__ == "__main__":
    main()
