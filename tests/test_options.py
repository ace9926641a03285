"""One options spec: every entry point and module declares the same options, with the spec's
defaults, and every option is checked by the spec's check.

The declarations are compared as ``inspect.signature`` parameters and dataclass fields, so a
new option, or a changed default or annotation, that reaches one entry point and not another
fails here.
"""

import ast
import dataclasses
import inspect
import re
import typing

import jax
import jax.numpy as jnp
import pytest

from flax_dotattn import (
    DotAttention,
    DotAttentionConfig,
    dot_attention,
    ring_attention,
    sequence_parallel_attention,
    which_implementation,
)
from flax_dotattn import nnx as fdnnx
from flax_dotattn._src import attention
from flax_dotattn._src.options import OPTIONS, AttentionOptions

Q = jnp.ones((2, 3, 4))
V = jnp.ones((2, 5, 4))

#: What each sharded entry point leaves out of dot_attention's parameters (its docstring says
#: why); everything else it takes is dot_attention's parameter, unchanged.
LEFT_OUT = {
    sequence_parallel_attention: {"return_attention_scores", "implementation"},
    ring_attention: {
        "return_attention_scores",
        "implementation",
        "attention_mask",
        "bias",
        "segment_ids",
        "window",
        "query_offset",
        "kv_length",
        "logits_soft_cap",
        "score_mod",
        "mask_mod",
    },
}
#: Parameters of their own (not options).
OWN = {
    sequence_parallel_attention: {"mesh", "axis_name"},
    ring_attention: {"mesh", "axis_name", "layout"},
}

#: Spec options that are not call options: the modules apply them before calling.
MODULE_ONLY = {"use_scale", "scale_init", "dtype", "param_dtype"}


def _parameters(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def _annotation(x) -> str:
    """An annotation as written (TypedDict keeps postponed annotations as ForwardRefs)."""
    return x.__forward_arg__ if isinstance(x, typing.ForwardRef) else x


# -- the public functions ---------------------------------------------------------------


def test_dot_attention_takes_every_call_option_with_the_spec_default():
    parameters = _parameters(dot_attention)
    fields = _fields(AttentionOptions)
    assert set(parameters) & set(OPTIONS) == set(fields) == set(OPTIONS) - MODULE_ONLY
    for name, field in fields.items():
        assert parameters[name].default == field.default == OPTIONS[name].default, name
        assert parameters[name].kind is not inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("fn", list(LEFT_OUT), ids=lambda fn: fn.__name__)
def test_sharded_entry_points_take_dot_attentions_parameters(fn):
    reference = _parameters(dot_attention)
    own = _parameters(fn)
    assert set(own) == (set(reference) - LEFT_OUT[fn]) | OWN[fn]
    for name in set(own) - OWN[fn]:
        assert own[name] == reference[name], name  # kind, default and annotation
    assert list(own)[:6] == list(reference)[:6]  # the positional ones, in order
    assert not OWN[fn] & set(OPTIONS)


def test_sharded_entry_points_share_their_own_parameters():
    seq, ring = _parameters(sequence_parallel_attention), _parameters(ring_attention)
    assert seq["mesh"] == ring["mesh"] and seq["axis_name"] == ring["axis_name"]


def test_which_implementation_takes_dot_attentions_arguments():
    reference = _parameters(dot_attention)
    own = _parameters(which_implementation)
    positional = [p for p in reference.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert list(own.values())[: len(positional)] == positional
    (keywords,) = [p for p in own.values() if p.kind is p.VAR_KEYWORD]
    typed = typing.get_type_hints(which_implementation, include_extras=True)[keywords.name]
    (typed_dict,) = typing.get_args(typed)  # Unpack[AllKeywords]
    keyword_only = {p.name: p.annotation for p in reference.values() if p.kind is p.KEYWORD_ONLY}
    assert {k: _annotation(a) for k, a in typed_dict.__annotations__.items()} == keyword_only


def test_dot_attention_overloads_differ_in_return_attention_scores_only():
    reference = _parameters(dot_attention)
    overloads = typing.get_overloads(dot_attention)
    assert len(overloads) == 3
    keyword_only = {p.name: p.annotation for p in reference.values() if p.kind is p.KEYWORD_ONLY}
    del keyword_only["return_attention_scores"]
    typed = attention.DotAttentionKeywords.__annotations__
    assert {k: _annotation(a) for k, a in typed.items()} == keyword_only
    for overload in overloads:
        own = list(_parameters(overload).values())
        assert own[:6] == list(reference.values())[:6]
        assert [p.name for p in own[6:]] == ["return_attention_scores", "keywords"]


def test_which_implementation_rejects_what_dot_attention_rejects():
    with pytest.raises(TypeError, match="unexpected keyword argument 'windows'"):
        which_implementation(None, Q, V, windows=(1, 1))
    with pytest.raises(ValueError, match="score_mode must be one of"):
        which_implementation(None, Q, V, score_mode="dott")
    plan = which_implementation(None, Q, V, return_attention_scores=True)
    assert plan.implementation == "xla"


# -- the config and the modules ---------------------------------------------------------


def test_config_fields_are_the_spec_options_with_their_defaults():
    fields = _fields(DotAttentionConfig)
    assert set(fields) == set(OPTIONS) - {"return_attention_scores"}
    for name, field in fields.items():
        assert field.default == OPTIONS[name].default, name


def test_linen_fields_are_the_config_fields():
    config, linen = _fields(DotAttentionConfig), _fields(DotAttention)
    assert list(linen) == list(config)
    for name, field in linen.items():
        assert field.default == config[name].default, name
    # Declared in the class body, as written in its source.
    assert _declared(DotAttention) == list(config)


def test_nnx_constructor_takes_the_linen_fields_and_rngs():
    parameters = _parameters(fdnnx.DotAttention.__init__)
    assert list(parameters) == ["self", *_fields(DotAttention), "rngs"]
    linen = _fields(DotAttention)
    for name, field in linen.items():
        p = parameters[name]
        assert p.kind is p.KEYWORD_ONLY, name
        assert (p.default, p.annotation) == (field.default, field.type), name
    assert parameters["rngs"].default is None


def test_module_calls_take_the_same_arguments():
    linen = _parameters(DotAttention.__call__)
    nnx = _parameters(fdnnx.DotAttention.__call__)
    assert list(nnx) == [*linen, "rngs"]
    assert all(nnx[name] == p for name, p in linen.items())
    # The call's causal, window and deterministic override the fields: None keeps them.
    for name in ("causal", "window", "deterministic"):
        assert name in OPTIONS and linen[name].default is None


def test_nnx_attributes_hold_the_canonical_values():
    model = fdnnx.DotAttention(dtype=jnp.bfloat16, precision=jax.lax.Precision.HIGH, window=[4, 0])
    config = model.config
    assert (model.dtype, model.precision, model.window) == ("bfloat16", "high", (4, 0))
    assert config == DotAttentionConfig(dtype="bfloat16", precision="high", window=(4, 0))


# -- written out, not generated at import -----------------------------------------------


def _definitions(obj) -> list[ast.ClassDef | ast.FunctionDef]:
    """The ``class``/``def`` statements named like ``obj`` in its module's source."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(obj)))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == obj.__name__
    ]


def _declared(cls) -> list[str]:
    """The names annotated in the body of ``cls``, in its source."""
    (node,) = _definitions(cls)
    return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)]


def _source_docstring(obj) -> str:
    docstrings = [ast.get_docstring(node) for node in _definitions(obj)]
    (docstring,) = [d for d in docstrings if d]  # overloads have none
    return docstring


@pytest.mark.parametrize(
    "obj",
    [DotAttentionConfig, DotAttention, fdnnx.DotAttention, dot_attention],
    ids=lambda obj: f"{obj.__module__}.{obj.__name__}",
)
def test_docstrings_are_the_source_and_document_every_option(obj):
    assert inspect.cleandoc(obj.__doc__) == _source_docstring(obj)
    if obj is dot_attention:
        names = set(_parameters(dot_attention))
    else:
        names = set(_fields(DotAttentionConfig))
    for name in names:
        assert re.search(rf"\b{name}\b", obj.__doc__), name


def test_no_signature_is_built_by_hand():
    for obj in (dot_attention, which_implementation, fdnnx.DotAttention.__init__):
        assert "__signature__" not in vars(obj)
    assert "__signature__" not in vars(fdnnx.DotAttention) and "__signature__" not in vars(
        DotAttention
    )


# -- the options object -----------------------------------------------------------------


def test_attention_options_are_frozen_hashable_and_canonical():
    options = AttentionOptions(
        causal=True, window=[3, 2**30], precision=jax.lax.Precision.HIGHEST, block_size=16
    )
    assert options.window == (3, None) and options.precision == "highest"
    assert options.lax_precision is jax.lax.Precision.HIGHEST
    assert options.block_size.forward == (16, 16)
    assert hash(options) == hash(dataclasses.replace(options))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.causal = False


def test_attention_options_read_the_options_among_arguments():
    options = AttentionOptions.from_arguments({"query": Q, "causal": True, "mesh": None})
    assert options == AttentionOptions(causal=True)


def test_attention_options_dropout():
    assert not AttentionOptions(dropout_rate=0.5, deterministic=True).dropout
    on = AttentionOptions(dropout_rate=0.5, deterministic=False)
    assert on.dropout and on.applied_dropout_rate == 0.5
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        AttentionOptions(dropout_rate=0.5)
    with pytest.raises(ValueError, match="dropout_rng is required"):
        on.dropout_key(None)
    assert AttentionOptions(dropout_rate=0.5, deterministic=True).dropout_key(None) is None


BAD_VALUES = [
    ("causal", "yes", r"causal must be a Python bool"),
    ("window", (1, -1), r"window must be None or a pair"),
    ("score_mode", "dott", r"score_mode must be one of"),
    ("dropout_rate", 1.0, r"dropout_rate must be in \[0, 1\)"),
    ("deterministic", 1, r"deterministic must be None or a Python bool"),
    ("precision", "fast", r"precision must be None, a jax.lax.Precision"),
    ("implementation", "flash", r"implementation must be one of"),
    ("block_size", 0, r"block_size must be None, a positive int"),
]


@pytest.mark.parametrize("name,value,pattern", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_each_option_is_checked_by_the_spec_everywhere(name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        OPTIONS[name].check(name, value)
    with pytest.raises(ValueError, match=pattern):
        AttentionOptions(**{name: value})
    with pytest.raises(ValueError, match=pattern):
        DotAttentionConfig(**{name: value})
    with pytest.raises(ValueError, match=pattern):
        dot_attention(None, Q, V, **{name: value})
    with pytest.raises(ValueError, match=pattern):
        fdnnx.DotAttention(**{name: value})
