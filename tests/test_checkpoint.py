"""Params saved with flax.serialization and the config as YAML restore to identical outputs."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from flax_dotattn import DotAttention, DotAttentionConfig, save_config


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path, rng):
    cfg = DotAttentionConfig(use_scale=True, score_mode="concat", causal=True)
    layer = DotAttention.from_config(cfg)
    q = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    variables = layer.init(jax.random.key(0), q, v)
    variables = {"params": {"scale": jnp.float32(0.3), "concat_score_weight": jnp.float32(-2.0)}}
    expected = np.asarray(layer.apply(variables, q, v))

    (tmp_path / "params.msgpack").write_bytes(serialization.to_bytes(variables))
    save_config(cfg, tmp_path / "config.yaml")
    np.save(tmp_path / "q.npy", np.asarray(q))
    np.save(tmp_path / "v.npy", np.asarray(v))
    np.save(tmp_path / "expected.npy", expected)

    script = textwrap.dedent(f"""
        import pathlib, numpy as np
        from flax import serialization
        from flax_dotattn import DotAttention, load_config
        root = pathlib.Path({str(tmp_path)!r})
        layer = DotAttention.from_config(load_config(root / "config.yaml"))
        variables = serialization.msgpack_restore((root / "params.msgpack").read_bytes())
        out = layer.apply(variables, np.load(root / "q.npy"), np.load(root / "v.npy"))
        np.testing.assert_array_equal(np.asarray(out), np.load(root / "expected.npy"))
        print("restored", sorted(variables["params"]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert "restored ['concat_score_weight', 'scale']" in result.stdout
