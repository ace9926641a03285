"""A linear map with a hand-written transpose that stays differentiable in its residuals.

``jax.custom_derivatives.linear_call`` lets a function that is linear in some arguments
bring its own transpose, but it cannot be differentiated with respect to its other
(residual) arguments, so a custom JVP rule built on it loses second-order derivatives.
:func:`linear_map` is the same idea as one JAX primitive with all four rules:

- evaluation and lowering: the map itself, as ordinary JAX code;
- JVP: linear in the linear arguments (the primitive again); in the residuals, the JVP of
  the ordinary code (so ``grad`` of ``grad`` works, at the generic code's cost);
- transpose: the hand-written transpose, itself a :func:`linear_map` whose transpose is
  the map, so transposing twice gives the map back;
- batching: the map's own ``fold(n, residuals, residuals_batched, linear)`` when it has
  one (returning ``(map, transpose, residuals, linear, unfold_outputs)`` for a map that
  takes the mapped axis into its own batch, or None), else both functions under
  ``jax.vmap``, batch axis first.

Both functions must be hashable and compare equal when they compute the same thing (e.g.
frozen dataclasses of static settings), so that compiled code is reused.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

# fn(residuals, linear) -> outputs; transpose(residuals, output cotangents) -> cotangents
# of ``linear`` (same tree, None where ``linear`` has None).
LinearFn = Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class _Flat:
    """``fn`` on flat lists: ``(*residual_leaves, *linear_leaves) -> output leaves``."""

    fn: Callable[..., Any]  # hashable: part of the primitive's static parameters
    residual_tree: Any
    linear_tree: Any
    n_res: int

    def __call__(self, *leaves: Any) -> list[Any]:
        residuals = jax.tree.unflatten(self.residual_tree, leaves[: self.n_res])
        linear = jax.tree.unflatten(self.linear_tree, leaves[self.n_res :])
        return jax.tree.leaves(self.fn(residuals, linear))

    def fold(self, n: int, residuals: list, batched: list[bool], linear: list) -> list | None:
        """The map's own batching, if it has one (see :func:`linear_map`), else None."""
        fold = getattr(self.fn, "fold", None)
        if fold is None:
            return None
        got = fold(
            n,
            jax.tree.unflatten(self.residual_tree, residuals),
            jax.tree.unflatten(self.residual_tree, batched),
            jax.tree.unflatten(self.linear_tree, linear),
        )
        if got is None:
            return None
        fn, transpose, residuals, linear, unfold = got
        return jax.tree.leaves(unfold(linear_map(fn, transpose, residuals, linear)))


@dataclasses.dataclass(frozen=True)
class _Vmapped:
    """A flat function under ``jax.vmap``: residuals batched along ``residual_axes``
    (None: unbatched), linear leaves and outputs along axis 0."""

    fn: Callable[..., Any]  # hashable: part of the primitive's static parameters
    residual_axes: tuple[int | None, ...]

    def __call__(self, *leaves: Any) -> list[Any]:
        n_res = len(self.residual_axes)
        axes = self.residual_axes + (0,) * (len(leaves) - n_res)
        return jax.vmap(lambda *x: list(self.fn(*x)), in_axes=axes)(*leaves)


_linear_p = Primitive("flax_dotattn_linear_map")
_linear_p.multiple_results = True


# Every bind carries: fn, transpose, n_res, and the output avals of fn and of transpose
# (known when the map is built, so that abstract evaluation never traces fn again).


def _evaluate(*leaves: Any, fn: Callable, **_: Any) -> list[Any]:
    return list(fn(*leaves))


@functools.cache
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


def _impl(*leaves: Any, fn: Callable, **_: Any) -> list[Any]:
    return list(_jitted(fn)(*leaves))


def _abstract_eval(*avals: Any, out_avals: tuple, **_: Any) -> list[Any]:
    return list(out_avals)


def _avals(leaves: Any, batch: int | None = None) -> tuple:
    """Avals of arrays (or of avals), with a leading ``batch`` dim when given."""
    lead = () if batch is None else (batch,)
    return tuple(jax.core.ShapedArray(lead + tuple(x.shape), x.dtype) for x in leaves)


def _is_zero(t: Any) -> bool:
    return type(t) is ad.Zero or jnp.dtype(t.dtype) == jax.dtypes.float0


def _jvp(primals, tangents, *, fn, n_res, **params):
    out = _linear_p.bind(*primals, fn=fn, n_res=n_res, **params)
    residuals, linear = primals[:n_res], primals[n_res:]
    d_linear = [ad.instantiate_zeros(t) for t in tangents[n_res:]]
    d_out = _linear_p.bind(*residuals, *d_linear, fn=fn, n_res=n_res, **params)
    moving = [i for i, t in enumerate(tangents[:n_res]) if not _is_zero(t)]
    if moving:  # the residuals' part: the JVP of the ordinary code

        def of_moving(*x):
            leaves = list(residuals)
            for i, xi in zip(moving, x, strict=True):
                leaves[i] = xi
            return fn(*leaves, *linear)

        _, d_res = jax.jvp(
            of_moving, tuple(residuals[i] for i in moving), tuple(tangents[i] for i in moving)
        )
        d_out = [a + b for a, b in zip(d_out, d_res, strict=True)]
    return out, d_out


def _transpose(cts, *args, fn, transpose, n_res, out_avals, transpose_avals):
    residuals = args[:n_res]
    if any(ad.is_undefined_primal(x) for x in residuals):
        raise ValueError("linear_map: residual arguments cannot be transposed")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    swapped = dict(fn=transpose, transpose=fn, out_avals=transpose_avals)
    return [None] * n_res + list(
        _linear_p.bind(*residuals, *cts, **swapped, n_res=n_res, transpose_avals=out_avals)
    )


def _batch(args, dims, *, fn, transpose, n_res, out_avals, transpose_avals):
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    residuals = [
        x if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(args[:n_res], dims[:n_res], strict=True)
    ]
    residual_axes = tuple(None if d is None else 0 for d in dims[:n_res])
    linear = [
        jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(args[n_res:], dims[n_res:], strict=True)
    ]
    if isinstance(fn, _Flat):
        batched = [d is not None for d in dims[:n_res]]
        folded = fn.fold(size, residuals, batched, linear)
        if folded is not None:
            return folded, [0] * len(folded)
    out = _linear_p.bind(
        *residuals,
        *linear,
        fn=_Vmapped(fn, residual_axes),
        transpose=_Vmapped(transpose, residual_axes),
        n_res=n_res,
        out_avals=_avals(out_avals, size),
        transpose_avals=_avals(transpose_avals, size),
    )
    return out, [0] * len(out)


_linear_p.def_impl(_impl)
_linear_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch
mlir.register_lowering(_linear_p, mlir.lower_fun(_evaluate, multiple_results=True))


def linear_map(fn: LinearFn, transpose: LinearFn, residuals: Any, linear: Any) -> Any:
    """``fn(residuals, linear)``, which must be linear in ``linear``, with ``transpose`` as
    its transpose in ``linear`` (used by ``jax.grad``/``jax.vjp``/``jax.linear_transpose``).

    Args:
      fn: ``fn(residuals, linear) -> outputs`` (pytrees of arrays). Hashable.
      transpose: ``transpose(residuals, output_cotangents) -> linear_cotangents``, with the
        tree of ``linear``. Hashable.
      residuals: pytree of arrays ``fn`` depends on non-linearly; differentiable.
      linear: pytree of float arrays ``fn`` is linear in.

    Returns:
      ``fn(residuals, linear)``.
    """
    res_leaves, res_tree = jax.tree.flatten(residuals)
    lin_leaves, lin_tree = jax.tree.flatten(linear)
    out_leaves, out_tree = jax.tree.flatten(jax.eval_shape(fn, residuals, linear))
    n_res = len(res_leaves)
    out = _linear_p.bind(
        *res_leaves,
        *lin_leaves,
        fn=_Flat(fn, res_tree, lin_tree, n_res),
        transpose=_Flat(transpose, res_tree, out_tree, n_res),
        n_res=n_res,
        out_avals=_avals(out_leaves),
        transpose_avals=_avals(lin_leaves),
    )
    return jax.tree.unflatten(out_tree, out)
