"""The tuned table (``python -m flax_dotattn.tune``): written, read, ignored, and harmless.

The table changes which path and which blocks the automatic choice takes, never what a
call means: outputs with and without it equal ``jax.nn.dot_product_attention`` (to
float32 rounding where the path or the blocks differ, bitwise where they are the same).
"""

import itertools
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

from flax_dotattn import BlockSizes, dot_attention, tune, which_implementation
from flax_dotattn._src import dispatch
from flax_dotattn._src.kernels import pallas_gpu, pallas_tpu
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.tuning import tuner
from flax_dotattn.bench.cli import main as bench_main

B, T, D = 2, 64, 8
Q = jax.random.normal(jax.random.key(0), (B, T, D)) * 0.5
V = jax.random.normal(jax.random.key(1), (B, T, D))
SMALL = T * T * 4  # bytes of one sequence's float32 scores


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir, tuning on, nothing read yet."""
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.TUNING_ENV, raising=False)
    tuning.forget()
    yield tmp_path
    tuning.forget()


def _table(crossover: int, blocks=(32, 16), causal: bool = False) -> None:
    """A table whose dot-product case has this crossover and blocks (for every length)."""
    entry = {"max_length": None, **BlockSizes.coerce(blocks).to_dict()}
    case = {"crossover_bytes": crossover, "blocks": [entry]}
    tuning.write_table({tuning.case_name("dot", causal, jnp.float32): case})


def _reference(causal: bool = False):
    return jax.nn.dot_product_attention(
        Q[:, :, None], V[:, :, None], V[:, :, None], scale=1.0, is_causal=causal
    )[:, :, 0]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tune.cache_dir() == tmp_path / "xdg" / "flax_dotattn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tune.cache_dir() == tmp_path / "home" / ".cache" / "flax_dotattn"
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path / "own"))
    assert tune.cache_dir() == tmp_path / "own"


def test_the_plan_reads_the_table_and_says_so(cache):
    untuned = which_implementation(None, Q, V)
    assert untuned.implementation == "xla" and "tuned" not in untuned.reason
    assert "no tuned table" in tune.status()
    _table(crossover=SMALL)  # chunked from T = 64
    kind = tuning.device_key()["device_kind"]
    plan = which_implementation(None, Q, V)
    assert plan == ("chunked", f"{plan.reason.split(' (')[0]} (tuned on {kind})")
    assert plan.reason.endswith(f">= 0.0156 MiB (tuned on {kind})")
    assert f"tuned table {tuning.table_path()}" in tune.status()
    # Explicit choices, returned weights and dropout do not read it; causal has no case.
    assert which_implementation(None, Q, V, implementation="xla").reason == "requested"
    assert which_implementation(None, Q, V, return_attention_scores=True).implementation == "xla"
    dropout = dict(dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=False)
    assert which_implementation(None, Q, V, **dropout) == untuned
    assert which_implementation(None, Q, V, causal=True).implementation == "xla"
    # Blocks: the table's for this length, narrowed by a window like the defaults.
    call = tuning.lookup("dot", False, jnp.bfloat16, T)  # no bfloat16 case: float32's
    assert call.blocks == BlockSizes(block_q=32, block_k=16)
    assert call.crossover_bytes == SMALL and call.device_kind == kind


def test_tuning_off_and_forget(cache, monkeypatch):
    _table(crossover=SMALL)
    monkeypatch.setenv(tuning.TUNING_ENV, "off")
    assert "tuned" not in which_implementation(None, Q, V).reason
    assert tune.status().startswith("off")
    monkeypatch.setenv(tuning.TUNING_ENV, "on")
    assert which_implementation(None, Q, V).implementation == "chunked"
    _table(crossover=4 * SMALL)  # writing drops the copy read so far
    assert which_implementation(None, Q, V).implementation == "xla"


def _write(path, table) -> None:
    path.write_text(table if isinstance(table, str) else json.dumps(table))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("garbage", "cannot be read"),
        ("version", "its version is 0"),
        ("device", "measured with device_kind='TPU v9'"),
        ("jax", "measured with jax='0.0.1'"),
        ("blocks", "block_q must be a positive int"),
    ],
)
def test_a_table_that_does_not_apply_is_ignored_with_one_warning(cache, damage, message):
    _table(crossover=SMALL)
    path = tuning.table_path()
    table = json.loads(path.read_text())
    if damage == "garbage":
        table = "{not json"
    elif damage == "version":
        table["version"] = 0
    elif damage == "device":
        table["key"]["device_kind"] = "TPU v9"
    elif damage == "jax":
        table["key"]["jax"] = "0.0.1"
    else:
        table["cases"]["dot/full/float32"]["blocks"][0]["block_q"] = 0
    _write(path, table)
    tuning.forget()
    with pytest.warns(RuntimeWarning, match=message):
        plan = which_implementation(None, Q, V)
    assert plan == which_implementation(None, Q, V, implementation=None)  # read once
    assert plan.implementation == "xla" and "tuned" not in plan.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert "(tuned" not in tune.status()
        if damage == "garbage":  # a call runs, untuned
            assert_close(jax.jit(lambda q, v: dot_attention(None, q, v))(Q, V), _reference())


@pytest.mark.slow
def test_outputs_do_not_depend_on_the_table(cache):
    """Bitwise where the path and blocks are the same, to float32 rounding where the table
    switches xla -> chunked or changes the blocks; always equal to jax.nn's."""

    def run(grad: bool = False, **kw):  # a fresh jit: traced again, reading the table
        def loss(q, v):
            out = dot_attention(None, q, v, **kw)
            return jnp.sum(out**2), out

        if not grad:
            return (jax.jit(lambda q, v: loss(q, v)[1])(Q, V),)
        (_, out), dq = jax.jit(jax.value_and_grad(loss, has_aux=True))(Q, V)
        return out, dq

    dropout = dict(dropout_rate=0.5, dropout_rng=jax.random.key(3), deterministic=False)
    explicit = dict(implementation="chunked", block_size=(16, 32))
    untuned = run(grad=True), run(**dropout), run(**explicit)
    _table(crossover=SMALL)  # switches T = 64 to chunked, with (32, 16) blocks
    tuned = run(grad=True), run(**dropout), run(**explicit)
    assert which_implementation(None, Q, V).implementation == "chunked"
    for got, want in zip(tuned[1:], untuned[1:], strict=True):  # the table is not read
        np.testing.assert_array_equal(got[0], want[0])
    for got, want in zip(tuned[0], untuned[0], strict=True):  # xla -> chunked
        assert_close(got, want)
    assert_close(tuned[0][0], _reference())


@pytest.mark.slow
def test_smoke_tuning_writes_a_table_the_automatic_choice_and_the_kernels_read(cache, capsys):
    assert tune.main(["--smoke", "--no-progress"]) == 0
    path = tuning.table_path()
    table = json.loads(path.read_text())
    assert table["key"] == tuning.device_key() and table["version"] == tuning.TABLE_VERSION
    case = table["cases"]["dot/full/float32"]
    assert case["crossover_bytes"] > 0 and case["blocks"][-1]["max_length"] is None
    assert {m["what"].removesuffix(" again") for m in table["measurements"]} == {
        "forward blocks",
        "backward blocks",
        "crossover",
    }
    # Both Pallas kernels' grids ran, interpreted off their platforms. An interpreted
    # entry's timings mean nothing, so the kernel keeps its own blocks; a compiled one's
    # blocks are read back.
    measured = {m["case"] for m in table["measurements"]}
    assert {"pallas_tpu/full/float32", "pallas_gpu/full/float32"} <= measured
    here = dispatch.current_platform()
    kernels = table["kernels"]
    assert kernels["pallas_tpu"]["interpreted"] == (here != "tpu")
    assert kernels["pallas_gpu"]["interpreted"] == (here != "cuda")
    (splash,) = kernels["pallas_tpu"]["full"]
    tuned = (*splash["forward"], *splash["backward"])
    expected = pallas_tpu.shipped_blocks(256, 256) if here != "tpu" else tuned
    assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == expected
    (triton,) = kernels["pallas_gpu"]["full"]
    tuned = (256, triton["forward"], triton["backward"])
    expected = pallas_gpu.shipped_blocks(256) if here != "cuda" else tuned
    assert pallas_gpu.blocks_for(256, False, 16, 4) == expected
    assert str(path) in capsys.readouterr().out
    plan = which_implementation(None, Q, V)
    assert plan.reason.endswith(f"(tuned on {table['key']['device_kind']})")
    assert_close(dot_attention(None, Q, V), _reference())
    # The benchmark says it used the table, and records it.
    out = cache / "bench.json"
    flags = "--shapes 1x16 --impls default --modes fwd --repeats 1 --no-memory --json"
    assert bench_main([*flags.split(), str(out)]) == 0
    assert f"Tuning: tuned table {path}" in capsys.readouterr().out
    assert json.loads(out.read_text())["tuning"] == tune.status()


def test_the_command_line_shows_the_table_and_rejects_bad_flags(cache, capsys):
    assert tune.main(["--show"]) == 0
    assert "No applicable table" in capsys.readouterr().out
    _table(crossover=SMALL)
    assert tune.main(["--show"]) == 0
    assert str(tuning.table_path()) in capsys.readouterr().out
    # The Pallas kernels' tuned blocks are part of the table in use: shown too.
    splash = {"full": [{"forward": [128, 256], "backward": [256, 128]}]}
    tuning.write_table({}, kernels={"pallas_tpu": splash})
    assert tune.main(["--show"]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown[shown.index("{") :])["kernels"] == {"pallas_tpu": splash}
    for flags, named in [(["--dtypes", "int8"], "--dtypes"), (["--quick", "--smoke"], "--smoke")]:
        with pytest.raises(SystemExit):
            tune.main(flags)
        assert named in capsys.readouterr().err


def test_blocks_apply_within_their_lengths_and_the_shipped_ones_elsewhere(cache):
    entries = [
        {"min_length": 45, "max_length": 90, "block_q": 32, "block_k": 16},
        {
            "min_length": 91,
            "max_length": None,
            "block_q": 64,
            "block_k": 32,
            "block_q_backward": 128,
        },
    ]
    tuning.write_table({"dot/causal/float32": {"crossover_bytes": SMALL, "blocks": entries}})
    blocks = {t: tuning.lookup("dot", True, jnp.float32, t).blocks for t in (32, 64, 128)}
    assert blocks[32] is None  # shorter than measured: BlockSizes.default applies
    assert blocks[64] == BlockSizes(block_q=32, block_k=16)
    assert blocks[128].backward == (128, 32)


def _covering(entries, length: int) -> int | None:
    """The ``"i"`` of the entry ``entry_for_length`` picks for ``length``, or None."""
    entry = tuning.entry_for_length(entries, length)
    return None if entry is None else entry["i"]


def test_an_entry_covers_both_of_its_bounds():
    entries = [{"min_length": 45, "max_length": 90, "i": 0}, {"min_length": 91, "i": 1}]
    assert _covering(entries, 44) is None  # below the first entry: the shipped blocks apply
    assert [_covering(entries, t) for t in (45, 90, 91, 10**6)] == [0, 0, 1, 1]


def test_length_ranges_meet_halfway_between_measured_lengths():
    """The first range reaches down to ``T / sqrt(2)``, neighbours meet at the geometric
    midpoint (``sqrt(256 * 1024) = 512``), and the last has no upper bound."""
    assert tuning.length_ranges([256, 1024, 4096]) == [(181, 512), (513, 2048), (2049, None)]
    assert tuning.length_ranges([128]) == [(91, None)]


@given(st.lists(st.integers(1, 1 << 20), min_size=1, max_size=6, unique=True).map(sorted))
def test_each_measured_length_and_each_bound_finds_its_own_entry(lengths):
    """Entries laid out by ``length_ranges`` and read by ``entry_for_length``: each holds
    its measured length and both of its bounds, neighbours meet at the geometric midpoint
    with no gap, and nothing shorter than the first range is covered."""
    ranges = tuning.length_ranges(lengths)
    entries = [{"min_length": lo, "max_length": hi, "i": i} for i, (lo, hi) in enumerate(ranges)]
    assert ranges[-1][1] is None
    for (a, (_, high)), (b, (low, _)) in itertools.pairwise(zip(lengths, ranges, strict=True)):
        assert high == round(math.sqrt(a * b)) and low == high + 1
    for i, (length, (low, high)) in enumerate(zip(lengths, ranges, strict=True)):
        probes = [t for t in (low, length, high) if t is not None]
        assert [_covering(entries, t) for t in probes] == [i] * len(probes), ranges
    assert _covering(entries, ranges[0][0] - 1) is None


def test_the_kernels_take_tuned_blocks_that_fit_and_their_own_elsewhere(cache, monkeypatch):
    splash = {
        "full": [{"max_length": 300, "forward": [128, 256], "backward": [256, 128]}],
        "causal": [{"forward": [384, 128], "backward": [128, 128]}],  # 384 divides no 256
    }
    triton = {
        "full": [{"forward": 64, "backward": 16}],
        "causal": [{"forward": 48, "backward": 16}],  # 48 is not a power of two
    }
    tuning.write_table({}, kernels={"pallas_tpu": splash, "pallas_gpu": triton})
    assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == (128, 256, 256, 128)
    assert pallas_tpu.kernel_blocks(512, 512, False, 16, 4) == (512,) * 4  # beyond max_length
    assert pallas_tpu.kernel_blocks(256, 256, True, 16, 4) == (256,) * 4
    assert pallas_gpu.blocks_for(300, False, 16, 4) == (384, 64, 16)
    assert pallas_gpu.blocks_for(300, True, 16, 4) == (384, 128, 32)
    # Blocks tuned at one head size and dtype apply to calls no larger and no wider only.
    sized = {"depth": 64, "dtype": "bfloat16"}
    tuning.write_table(
        {}, kernels={"pallas_tpu": {**splash, **sized}, "pallas_gpu": {**triton, **sized}}
    )
    assert pallas_tpu.kernel_blocks(256, 256, False, 64, 2) == (128, 256, 256, 128)
    assert pallas_tpu.kernel_blocks(256, 256, False, 128, 2) == (256,) * 4
    assert pallas_tpu.kernel_blocks(256, 256, False, 64, 4) == (256,) * 4
    assert pallas_gpu.blocks_for(300, False, 32, 2) == (384, 64, 16)
    assert pallas_gpu.blocks_for(300, False, 32, 4) == (384, 128, 32)
    assert pallas_gpu.blocks_for(300, False, 256, 2) == (384, 128, 32)
    tuning.write_table({}, kernels={"pallas_tpu": splash, "pallas_gpu": triton})
    # The plan says so where the blocks apply.
    q = jnp.zeros((1, 256, 16))
    kind = tuning.device_key()["device_kind"]
    for platform in ("tpu", "cuda"):
        plan = which_implementation(None, q, q, platform=platform)
        assert plan.implementation.startswith("pallas")
        assert plan.reason.endswith(f"(blocks tuned on {kind})"), plan.reason
    assert "tuned" not in which_implementation(None, q, q, causal=True, platform="tpu").reason
    override = {"full": [{"forward": [256, 128], "backward": [128, 128]}]}
    with tuning.kernel_override("pallas_tpu", override):  # what the tuner times
        assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == (256, 128, 128, 128)
    assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == (128, 256, 256, 128)

    # Tuned blocks change the kernels' tiling, not their numbers (interpret mode here).
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 256, 16)) * 0.5 for i in range(3))
    expected = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0)[
        :, :, 0
    ]
    for kernel in ("pallas_tpu", "pallas_gpu"):

        def loss(q, k, v, kernel=kernel):
            out = dot_attention(None, q, v, k, implementation=kernel)
            return jnp.sum(out**2), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        assert_close(out, expected)
        reference = jax.grad(lambda q, k, v: jnp.sum(
            jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0)
            ** 2
        ), (0, 1, 2))(q, k, v)  # fmt: skip
        for got, want in zip(grads, reference, strict=True):
            assert_close(got, want)
    monkeypatch.setenv(tuning.TUNING_ENV, "off")
    assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == (256,) * 4
    monkeypatch.delenv(tuning.TUNING_ENV)
    # An entry measured in interpret mode (``--smoke`` off the kernel's platform) is ignored.
    tuning.write_table({}, kernels={"pallas_tpu": {**splash, "interpreted": True}})
    assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == (256,) * 4


@pytest.mark.parametrize(
    "entries",
    [
        ["not a mapping"],
        [None],
        [{"min_length": None, "forward": [128, 128], "backward": [128, 128]}],
        [{"min_length": "0", "forward": [128, 128], "backward": [128, 128]}],
        [{"max_length": "1024", "forward": [128, 128], "backward": [128, 128]}],
        [{"min_length": [0], "forward": [128, 128], "backward": [128, 128]}],
        [{"min_length": True, "forward": [128, 128], "backward": [128, 128]}],
        [{"forward": [128, 128, 128], "backward": [128]}],  # not two pairs
        [{"forward": [128], "backward": [128, 128, 128]}],
        [{"forward": "128", "backward": "16"}],
        [{"forward": [True, True], "backward": True}],
        [{"forward": [128.0, 128.0], "backward": 64.0}],
        [{"forward": [2**80, 2**80], "backward": 2**80}],
        [{"forward": [-128, -128], "backward": -16}],
        [{}],
    ],
)
def test_corrupt_kernel_entries_fall_back_to_the_shipped_blocks(cache, entries):
    """A hand-edited or corrupt ``kernels`` entry never raises: each kernel keeps its own
    blocks (and the plan names no tuning)."""
    kernels = {name: {"full": entries} for name in ("pallas_tpu", "pallas_gpu")}
    tuning.write_table({}, kernels=kernels)
    # ``min_length: null`` is "no bound" (as in a case's blocks): that entry's blocks apply
    # (the Triton kernel's blocks are ints, so these lists never fit it).
    takes = isinstance(entries[0], dict) and entries[0].get("min_length", 0) is None
    want = (128,) * 4 if takes else pallas_tpu.shipped_blocks(256, 256)
    assert pallas_tpu.kernel_blocks(256, 256, False, 16, 4) == want
    assert pallas_gpu.blocks_for(256, False, 16, 4) == pallas_gpu.shipped_blocks(256)
    q = jnp.zeros((1, 256, 16))
    plan = which_implementation(None, q, q, platform="tpu")
    assert plan.implementation == "pallas_tpu"
    assert ("tuned" in plan.reason) == takes, plan.reason
    assert which_implementation(None, q, q, platform="cuda").implementation.startswith("pallas")


def test_a_null_min_length_in_a_case_means_no_bound(cache):
    """The table check accepts ``"min_length": null``; the lookup must read it too."""
    entry = {"min_length": None, "max_length": None, "block_q": 32, "block_k": 16}
    tuning.write_table({"dot/full/float32": {"crossover_bytes": SMALL, "blocks": [entry]}})
    assert tuning.lookup("dot", False, jnp.float32, T).blocks == BlockSizes(block_q=32, block_k=16)
    assert_close(dot_attention(None, Q, V), _reference())
    # A bool is no length: such a table is refused, as a bool crossover is.
    with pytest.raises(ValueError, match="min_length"):
        entry = {"min_length": True, "block_q": 32, "block_k": 16}
        tuning.write_table({"dot/full/float32": {"crossover_bytes": SMALL, "blocks": [entry]}})


def test_a_smoke_table_is_written_only_to_a_named_cache_dir(cache, monkeypatch, tmp_path):
    # Its timings mean nothing: a user's default cache must never receive it.
    writes = []

    def run(grid, *, progress, write):
        writes.append(write)
        return {"cases": {}, "seconds": 0.0, "load_average": {"end": []}}

    monkeypatch.setattr(tuner, "run", run)
    assert tune.main(["--smoke", "--no-progress"]) == 0  # the fixture names a cache dir
    monkeypatch.delenv(tuning.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tune.main(["--smoke", "--no-progress"]) == 0
    assert tune.main(["--smoke", "--no-progress", "--dry-run"]) == 0
    assert tune.main(["--quick", "--no-progress"]) == 0
    assert writes == [True, False, False, True]
