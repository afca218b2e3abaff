"""Small pure helpers over parameter pytrees (``dict[str, Tensor]``), built on ``optree``.

Every direction, gradient and optimizer-state view in funcprobe is a flat
``dict[str, Tensor]`` keyed by the registry's parameter names (never by ``id()``,
docs/failure-modes.md#1-parameter-identity). These helpers keep the bookkeeping in one place.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import optree
import torch
from torch import Tensor

ParamTree = dict[str, Tensor]


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> ParamTree:
    """``optree.tree_map`` over flat name→tensor dicts; returns a plain ``dict``."""
    return dict(optree.tree_map(fn, dict(tree), *(dict(r) for r in rest)))


def tree_vdot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Σ over names of ⟨a[name], b[name]⟩, accumulated in the wider of the leaf dtypes.

    Shapes: each ``a[k]`` and ``b[k]`` have the same shape. Returns a 0-d tensor.
    Differentiable (used inside the α-trick of ``mode="vjp"``).
    """
    leaves = optree.tree_leaves(optree.tree_map(lambda x, y: (x * y).sum(), dict(a), dict(b)))
    if not leaves:
        raise ValueError("tree_vdot: the parameter trees are empty")
    return functools.reduce(torch.add, leaves)


def tree_sq_norm(tree: Mapping[str, Tensor]) -> float:
    """Σ ||tree[k]||² in float64 as a Python float (diagnostics and zero checks)."""
    return float(sum(float(t.detach().double().pow(2).sum()) for t in tree.values()))


def check_keys(expected: Mapping[str, object], given: Mapping[str, object], argname: str) -> None:
    """Raise ``KeyError`` naming ``argname`` and every missing / unexpected name."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} name(s): {_short(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} name(s) not in the parameter registry: {_short(extra)}")
        raise KeyError(f"{argname}: keys do not match the parameter registry; " + "; ".join(parts))


def check_like(reference: Mapping[str, Tensor], tree: Mapping[str, Tensor], argname: str) -> None:
    """Check ``tree`` has ``reference``'s names and shapes and only finite floating values.

    Raises ``KeyError`` (names), ``ValueError`` (shapes, dtypes or non-finite values), each
    listing the offending names.
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"{argname}: expected a dict name -> tensor (as update_direction returns), "
                         f"got {type(tree).__name__}")
    check_keys(reference, tree, argname)
    not_tensor = sorted(k for k, v in tree.items() if not isinstance(v, Tensor))
    if not_tensor:
        raise ValueError(f"{argname}: values must be torch.Tensor; not a tensor at {_short(not_tensor)}")
    bad_shape = sorted(k for k in reference if tuple(tree[k].shape) != tuple(reference[k].shape))
    if bad_shape:
        detail = ", ".join(
            f"{k}: {tuple(tree[k].shape)} != {tuple(reference[k].shape)}" for k in bad_shape[:5]
        )
        raise ValueError(f"{argname}: shapes differ from the parameters at {len(bad_shape)} name(s): {detail}")
    meta = sorted(k for k in reference if tree[k].is_meta)
    if meta:
        raise ValueError(f"{argname}: tensors on the meta device (no data) at {_short(meta)}")
    bad_dtype = sorted(k for k in reference if not tree[k].is_floating_point())
    if bad_dtype:
        raise ValueError(f"{argname}: values must be floating point; integer/bool at {_short(bad_dtype)}")
    non_finite = sorted(k for k in reference if not bool(torch.isfinite(tree[k]).all()))
    if non_finite:
        raise ValueError(f"{argname}: non-finite values (NaN or inf) at {_short(non_finite)}")


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
