"""What each kernel takes: the one table the dispatcher, the plans' reasons and the
accelerators guide read.

Each kernel has one :class:`Capabilities` row in :data:`TABLE`: the platform it compiles
for, the dtypes and the call features (:data:`FEATURES`) it takes with Keras's numbers,
and, for a feature it does not take, why (the reason a plan gives). Adding a feature to a
kernel is one entry in its row. What a row cannot say (head sizes, a band that leaves a
row without keys, ...) is the kernel's own ``constraints()``, checked after the row.

A feature a kernel takes may still depend on run-time values (a mask that is a prefix,
a row that sees a key): the kernel then returns a run-time predicate with its output, and
the runner (:mod:`flax_dotattn._src.runner`) falls back to the chunked kernel where it
fails.

The guide's table is generated from this one (:func:`markdown_table`; a test checks that
``docs/guides/accelerators.md`` holds it; regenerate it with
``python -m flax_dotattn._src.kernels.capabilities``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.kernels.fused_inputs import dense_attention_mask, key_padding_mask
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.validation import AttentionInputs


@dataclasses.dataclass(frozen=True)
class Feature:
    """A feature a call may use."""

    name: str  # the key of a kernel's row
    row: str  # the guide's row title (markdown)
    label: str  # how a reason names the call's use of it
    given: bool = False  # an argument given: several are named together ("bias, window given")


#: The features a call may use, in the order a reason names them.
FEATURES: tuple[Feature, ...] = (
    Feature("concat", '`score_mode="concat"`', "score_mode is not 'dot'"),
    Feature("dropout", "dropout", "dropout is active"),
    Feature("weights", "returned weights", "the weights are requested"),
    Feature("bias", "`bias`", "bias", given=True),
    Feature(
        "attention_mask",
        "a pair `attention_mask [..., Tq, Tv]`",
        "a pair attention_mask [..., Tq, Tv]",
        given=True,
    ),
    Feature(
        "key_padding_mask",
        "a key-padding `attention_mask [..., 1, Tv]`",
        "attention_mask [..., 1, Tv]",
        given=True,
    ),
    Feature("window", "`window`", "window", given=True),
    Feature("query_offset", "`query_offset` (a host int)", "query_offset", given=True),
    Feature(
        "traced_query_offset",
        "`query_offset` traced or per sequence",
        "query_offset is a JAX array or differs per sequence",
    ),
    Feature("segment_ids", "`segment_ids`", "segment_ids", given=True),
    Feature("logits_soft_cap", "`logits_soft_cap`", "logits_soft_cap", given=True),
    Feature("score_mod", "`score_mod`", "score_mod", given=True),
    Feature("mask_mod", "`mask_mod`", "mask_mod", given=True),
    Feature("causal", "`causal`", "causal"),
    Feature("value_mask", "value mask, `kv_length` (key padding)", "a value mask"),
    Feature("query_mask", "query mask (rows zeroed after)", "a query mask"),
    Feature("learned_scale", "learned `scale` (no `1/sqrt(D)`)", "a learned scale"),
    Feature("grouped", "grouped key/value (GQA/MQA)", "grouped key/value"),
    Feature("empty", "an empty dimension", "a dimension is empty"),
)
_BY_NAME = {f.name: f for f in FEATURES}
#: The dtypes a kernel may take.
DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """One kernel's row: what it takes with Keras's numbers.

    Attributes:
      name: the kernel's ``implementation=`` name.
      platform: the platform it compiles for (None: every platform); elsewhere a Pallas
        kernel runs in interpret mode.
      dtypes: the input dtypes it takes, each with how (``""``: as given).
      takes: the features it takes, each with how (``""``: no comment).
      refuses: why it does not take a feature or dtype (one missing from both ``takes``
        and ``refuses``, or ``dtypes``, is refused without a comment).
    """

    name: str
    platform: str | None
    dtypes: Mapping[str, str]
    takes: Mapping[str, str]
    refuses: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*self.takes, *self.refuses):
            if name not in _BY_NAME and name not in DTYPES:
                raise ValueError(f"{self.name}: unknown feature {name!r}")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"{self.name}: unknown dtype {dtype!r}")

    def missing(self, inputs: AttentionInputs, options: AttentionOptions) -> str | None:
        """Why this kernel cannot take the call's dtype or features (the first that it
        does not take, with the other given arguments refused for the same reason), or
        None when it takes them all."""
        dtype = jnp.dtype(inputs.dtype).name
        if dtype not in self.dtypes:
            note = self.refuses.get(dtype)
            taken = "/".join(self.dtypes)
            return f"dtype {dtype} ({note})" if note else f"dtype {dtype} is not {taken}"
        absent = [f for f in call_features(inputs, options) if f.name not in self.takes]
        if not absent:
            return None
        first, note = absent[0], self.refuses.get(absent[0].name, "")
        if first.given:
            alike = [f for f in absent if f.given and self.refuses.get(f.name, "") == note]
            reason = f"{', '.join(f.label for f in alike)} given"
        else:
            reason = first.label
        return f"{reason} ({note})" if note else reason


def _static_offset(query_offset: object) -> bool:
    """Whether ``query_offset`` is one host integer (validation keeps host offsets as
    NumPy arrays)."""
    return isinstance(query_offset, np.ndarray) and query_offset.ndim == 0


def call_features(inputs: AttentionInputs, options: AttentionOptions) -> list[Feature]:
    """The features a (static) call uses, in :data:`FEATURES` order."""
    masking = inputs.masking
    query, key, value = inputs.query, inputs.key, inputs.value
    used = {
        "concat": options.score_mode == "concat",
        "dropout": bool(options.dropout),
        "weights": options.return_attention_scores,
        "bias": inputs.bias is not None,
        "attention_mask": dense_attention_mask(inputs) is not None,
        "key_padding_mask": key_padding_mask(inputs) is not None,
        "window": options.window is not None,
        "query_offset": inputs.query_offset is not None,
        "traced_query_offset": inputs.query_offset is not None
        and not _static_offset(inputs.query_offset),
        "segment_ids": masking.query_segment_ids is not None,
        "logits_soft_cap": options.logits_soft_cap is not None,
        "score_mod": options.score_mod is not None,
        "mask_mod": options.mask_mod is not None,
        "causal": options.causal,
        "value_mask": masking.value_mask is not None,
        "query_mask": inputs.query_mask is not None,
        "learned_scale": inputs.scale is not None,
        "grouped": query.shape[:-2] != key.shape[:-2],
        "empty": 0 in query.shape or 0 in key.shape or 0 in value.shape,
    }
    return [f for f in FEATURES if used[f.name]]


_EVERY_FEATURE = {f.name: "" for f in FEATURES}
_NO_DENSE = "the kernel takes no dense mask or bias"
_IDS_ONLY = "the kernel masks by segment ids only"
_NO_FUNCTIONS = "the kernel takes no score or mask function"
_NO_CAP = "the kernel has no soft-cap"

#: One row per kernel, in the guide's column order.
TABLE: Mapping[str, Capabilities] = MappingProxyType(
    {
        row.name: row
        for row in (
            Capabilities(
                name="xla",
                platform=None,
                dtypes=dict.fromkeys(DTYPES, ""),
                takes={**_EVERY_FEATURE, "weights": "the only path that forms them"},
            ),
            Capabilities(
                name="chunked",
                platform=None,
                dtypes=dict.fromkeys(DTYPES, ""),
                takes={
                    **{n: v for n, v in _EVERY_FEATURE.items() if n != "weights"},
                    "causal": "blocks outside the band skipped",
                    "window": "blocks outside the band skipped",
                    "segment_ids": "blocks of other segments skipped",
                },
                refuses={
                    "weights": "it never forms the [..., Tq, Tv] weights, so it cannot return "
                    "them; use implementation=None or 'xla'"
                },
            ),
            Capabilities(
                name="pallas_tpu",
                platform="tpu",
                dtypes={"float16": "computed in float32", "bfloat16": "", "float32": ""},
                takes={
                    "causal": "splash `CausalMask`, blocks skipped",
                    "window": "splash `LocalMask`, blocks skipped",
                    "query_offset": "the masks' offset",
                    "segment_ids": "splash segment ids",
                    "logits_soft_cap": "splash's `attn_logits_soft_cap`",
                    "value_mask": "as segment ids",
                    "query_mask": "",
                    "learned_scale": "folded into q and k",
                    "grouped": "splash's MQA form, not with segment ids",
                },
                refuses={
                    "bias": _NO_DENSE,
                    "attention_mask": _NO_DENSE,
                    "key_padding_mask": _NO_DENSE,
                    "traced_query_offset": "the kernel's masks take one static offset",
                    "score_mod": "splash takes no score function",
                    "mask_mod": "not mapped onto splash's masks yet",
                    "float64": "no float64 kernel on TPU",
                },
            ),
            Capabilities(
                name="cudnn",
                platform="cuda",
                dtypes={"float16": "", "bfloat16": ""},
                takes={
                    "bias": "as `[B or 1, 1, Tq, Tv]`, even lengths",
                    "attention_mask": "as `mask`, even lengths",
                    "key_padding_mask": "as lengths, when a prefix",
                    "window": "`(left, 0)` with `causal` or `right == 0`, `Tq == Tv`",
                    "causal": "`Tq == Tv`",
                    "value_mask": "as lengths, when a prefix",
                    "query_mask": "as lengths, when a prefix",
                    "learned_scale": "folded into q and k",
                    "grouped": "a broadcast copy",
                },
                refuses={
                    "segment_ids": "cuDNN takes packed sequences as offsets, not ids",
                    "query_offset": "cuDNN's causal mask and window start at query 0",
                    "logits_soft_cap": _NO_CAP,
                    "score_mod": _NO_FUNCTIONS,
                    "mask_mod": _NO_FUNCTIONS,
                },
            ),
            Capabilities(
                name="pallas_gpu",
                platform="cuda",
                dtypes={"float16": "", "bfloat16": "", "float32": "TF32 matmuls"},
                takes={
                    "causal": "`Tq <= Tv`",
                    "segment_ids": "the same ids on queries and keys",
                    "value_mask": "a padding segment id",
                    "key_padding_mask": "a padding segment id",
                    "query_mask": "",
                    "learned_scale": "folded into q and k",
                    "grouped": "a broadcast copy",
                },
                refuses={
                    "bias": _IDS_ONLY,
                    "attention_mask": _IDS_ONLY,
                    "window": _IDS_ONLY,
                    "query_offset": _IDS_ONLY,
                    "logits_soft_cap": _NO_CAP,
                    "score_mod": _NO_FUNCTIONS,
                    "mask_mod": _NO_FUNCTIONS,
                },
            ),
        )
    }
)


def markdown_table() -> str:
    """The accelerators guide's capability table, from :data:`TABLE`."""
    names = list(TABLE)
    lines = [
        "| feature | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
        "| compiles for | "
        + " | ".join(TABLE[n].platform or "every platform" for n in names)
        + " |",
    ]

    def cell(taken: Mapping[str, str], key: str) -> str:
        if key not in taken:
            return "falls back"
        return f"yes: {taken[key]}" if taken[key] else "yes"

    for dtype in DTYPES:
        lines.append(
            f"| {dtype} | " + " | ".join(cell(TABLE[n].dtypes, dtype) for n in names) + " |"
        )
    for feature in FEATURES:
        cells = " | ".join(cell(TABLE[n].takes, feature.name) for n in names)
        lines.append(f"| {feature.row} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - regenerates the guide's table
    print(markdown_table(), end="")
