"""PEFT LoRA on bare parameters (``target_parameters``): stacked mixture-of-experts weights.

What PEFT writes (``lora.ParamWrapper``, checked with peft 0.22 and transformers 5.25 on
Qwen3-MoE, Mixtral and gpt-oss):

- one LoRA per targeted parameter [E, d1, d2] under its module's name:
  ``<module>.lora_A.weight`` [E·r, in] and ``<module>.lora_B.weight`` [out, E·r];
- A's rows are expert-major (expert e owns rows e·r … e·r+r-1) but B's columns are rank-major
  (expert e owns columns k·E + e): ParamWrapper reshapes A to (E, r, in) and B to (out, r, E);
- ``in``/``out`` are the expert's true input/output whatever the storage: PEFT reads [E, out, in]
  unless the experts module says ``is_transposed`` (gpt-oss: [E, in, out]);
- several parameters of one module are nested wrappers: the parameter the module registers first
  is innermost, so its keys carry the most ``.base_layer`` (two targeted: the first under
  ``<module>.base_layer.lora_A.weight``, the second under ``<module>.lora_A.weight``);
- the rank and alpha of a parameter are ``rank_pattern`` / ``alpha_pattern`` resolved on its full
  name (``model.layers.0.mlp.experts.gate_up_proj``), as for modules; rsLoRA applies alike. One
  rank for all experts of a parameter: PEFT has no per-expert rank.

In loraformat an adapter layer is a checkpoint tensor: where the checkpoint stores the stack as-is
(gpt-oss), one expert layer (``experts`` = E, A [E, r, in], B [E, out, r]) at the tensor's name;
where it stores one tensor per expert and projection (Qwen3-MoE, Mixtral: the family's
:class:`~loraformat.architecture.ExpertStorage`), one ordinary layer per expert and part, whose B
is the part's rows of the expert's B and whose A is the expert's A (shared by the parts). Going
back, parts sharing A (bit for bit) and their alpha/rank are joined again, so PEFT → loraformat →
PEFT gives the same tensors; anything else is joined exactly by stacking the parts' ranks (scales
folded into B, a representation change recorded as a note).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..architecture import ExpertStorage
from ..errors import LoraformatError
from ..format.adapter import LoraLayer
from ._common import Names
from .experts import Stack, architecture_of, storage_of

WRAPPER = ".base_layer"


def unwrap(module: str) -> tuple[str, int]:
    """A saved module name without its trailing ``.base_layer``s, and how many there were."""
    depth = 0
    while module.endswith(WRAPPER):
        module, depth = module[: -len(WRAPPER)], depth + 1
    return module, depth


def targeted(module: str, target_parameters: Sequence[str]) -> list[str]:
    """The parameter names of ``module`` that ``target_parameters`` selects, as PEFT matches
    them (the full ``<module>.<param>`` equals a target or ends with ``.<target>``)."""
    found = []
    for target in target_parameters:
        param = target.rpartition(".")[2]
        key = f"{module}.{param}"
        if (key == target or key.endswith("." + target)) and param not in found:
            found.append(param)
    return found


def by_registration(
    module: str, params: Sequence[str], storages: Sequence[ExpertStorage]
) -> list[str] | None:
    """``params`` of ``module`` in the order the family registers them; None if one is not the
    family's."""
    order = []
    for param in params:
        found = storage_of(f"{module}.{param}", storages)
        if found is None:
            return None
        order.append((storages.index(found[1]), param))
    return [param for _, param in sorted(order)]


def weight_parameter(arch: str, module: str) -> bool:
    """Whether PEFT adapts ``module`` of ``arch`` as the parameter ``<module>.weight``."""
    found = architecture_of(arch)
    relative = tuple(getattr(found, "peft_weight_parameters", ())) if found is not None else ()
    return any(module == r or module.endswith("." + r) for r in relative)


@dataclass
class Wrapped:
    """One targeted parameter as PEFT saved it: full name, A [E·r, in], B [out, E·r]."""

    name: str
    A: np.ndarray
    B: np.ndarray


# -- reading ------------------------------------------------------------------------------------


def take_wrappers(
    grouped: dict[str, dict[str, np.ndarray]],
    target_parameters: Sequence[str],
    storages: Sequence[ExpertStorage],
    base_shape: Callable[[str], tuple[int, ...] | None] | None,
    where: Path,
) -> list[Wrapped]:
    """Remove the ParamWrapper entries from ``grouped`` (module → role → array) and return them
    by parameter. Which nesting depth is which parameter: the family's registration order
    (``storages``); without a family, the only assignment the base's shapes allow
    (``base_shape``: a tensor's shape in the base by in-memory name; None without a base)."""
    modules: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key in list(grouped):
        module, depth = unwrap(key)
        if targeted(module, target_parameters):
            modules.setdefault(module, {})[depth] = grouped.pop(key)
    out = []
    for module, by_depth in sorted(modules.items()):
        params = targeted(module, target_parameters)
        if sorted(by_depth) != list(range(len(params))):
            raise LoraformatError(
                where,
                f"module {module!r}: target_parameters select {len(params)} parameter(s) "
                f"({', '.join(params)}) but the file nests LoRA at depth(s) {sorted(by_depth)}",
            )
        order = _registration_order(module, params, by_depth, storages, base_shape, where)
        for j, param in enumerate(order):
            parts = by_depth[len(order) - 1 - j]
            if "A" not in parts or "B" not in parts or set(parts) - {"A", "B"}:
                raise LoraformatError(
                    where, f"parameter {module}.{param}: PEFT saves only lora_A and lora_B for "
                    f"a targeted parameter, found {sorted(parts)}",
                )
            out.append(Wrapped(f"{module}.{param}", parts["A"], parts["B"]))
    return out


def _fits(shape: tuple[int, ...] | None, a: np.ndarray, b: np.ndarray) -> bool:
    if shape is None or len(shape) != 3 or a.ndim != 2 or b.ndim != 2:
        return False
    return sorted(shape[1:]) == sorted((a.shape[1], b.shape[0]))


def _registration_order(
    module: str,
    params: list[str],
    by_depth: Mapping[int, Mapping[str, np.ndarray]],
    storages: Sequence[ExpertStorage],
    base_shape: Callable[[str], tuple[int, ...] | None] | None,
    where: Path,
) -> list[str]:
    if len(params) == 1:
        return params
    known = by_registration(module, params, storages)
    if known is not None:
        return known
    why = "without the base model (--base) its shapes cannot decide"
    if base_shape is not None:
        missing = [p for p in params if len(base_shape(f"{module}.{p}") or ()) != 3]
        fitting = [
            order for order in itertools.permutations(params)
            if all(
                _fits(base_shape(f"{module}.{p}"),
                      by_depth[len(order) - 1 - j].get("A", np.empty(0)),
                      by_depth[len(order) - 1 - j].get("B", np.empty(0)))
                for j, p in enumerate(order)
            )
        ]
        if len(fitting) == 1:
            return list(fitting[0])
        why = (
            f"the base has no 3-D tensor {module}.{missing[0]} (a checkpoint storing one tensor "
            "per expert needs a plugin to say which)" if missing
            else "the base's shapes do not decide"
        )
    raise LoraformatError(
        where,
        f"module {module!r} nests LoRA on {len(params)} parameters ({', '.join(params)}); "
        "which is which depends on the order the model registers them: no installed plugin "
        f"states it, and {why}",
    )


def expert_factors(
    wrapped: Wrapped, rank: int, where: Path
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's A [E·r, in], B [out, E·r] → A [E, r, in], B [E, out, r]."""
    a, b = wrapped.A, wrapped.B
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] % rank:
        raise LoraformatError(
            where,
            f"parameter {wrapped.name!r}: A {list(a.shape)} and B {list(b.shape)} are not "
            f"[E·r, in] and [out, E·r] with r = {rank}",
        )
    experts = a.shape[0] // rank
    a3 = np.ascontiguousarray(a.reshape(experts, rank, a.shape[1]))
    b3 = np.ascontiguousarray(b.reshape(b.shape[0], rank, experts).transpose(2, 0, 1))
    return a3, b3


def expert_layers(
    wrapped: Wrapped,
    rank: int,
    alpha: float,
    storages: Sequence[ExpertStorage],
    names: Names,
    where: Path,
) -> dict[str, LoraLayer]:
    """The loraformat layers of one targeted parameter (see the module doc). A 2-D ``weight``
    (a router PEFT cannot wrap as a module: gpt-oss's ``mlp.router.weight``) is an ordinary
    LoRA of its module."""
    module, _, param = wrapped.name.rpartition(".")
    if param == "weight" and wrapped.A.ndim == 2 and wrapped.A.shape[0] == rank:
        path = names.to_path(module) or module
        return {path: LoraLayer(A=wrapped.A, B=wrapped.B, alpha=alpha,
                                in_features=int(wrapped.A.shape[1]),
                                out_features=int(wrapped.B.shape[0]))}
    a3, b3 = expert_factors(wrapped, rank, where)
    experts, out_features, in_features = b3.shape[0], b3.shape[1], a3.shape[2]
    found = storage_of(wrapped.name, storages)
    if found is None or not found[1].per_expert:
        path = names.to_path(wrapped.name) or wrapped.name
        return {path: LoraLayer(A=a3, B=b3, alpha=alpha, in_features=in_features,
                                out_features=out_features, experts=experts)}
    prefix, storage = found
    n_parts = len(storage.per_expert)
    if out_features % n_parts:
        raise LoraformatError(
            where, f"parameter {wrapped.name!r}: {out_features} output rows do not split into "
            f"the {n_parts} per-expert tensors the checkpoint stores it as",
        )
    rows = out_features // n_parts
    layers = {}
    for e in range(experts):
        for i, template in enumerate(storage.per_expert):
            layers[prefix + template.replace("{e}", str(e))] = LoraLayer(
                A=a3[e], B=np.ascontiguousarray(b3[e, i * rows:(i + 1) * rows]), alpha=alpha,
                in_features=in_features, out_features=rows,
            )
    return layers


# -- writing ------------------------------------------------------------------------------------


def peft_factors(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    """A stack's A [E, r, in], B [E, out, r] as PEFT saves them: [E·r, in], [out, r·E]."""
    experts, rank, in_features = stack.A.shape
    out_features = stack.B.shape[1]
    a = stack.A.reshape(experts * rank, in_features)
    b = stack.B.transpose(1, 2, 0).reshape(out_features, rank * experts)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def nesting_orders(wrapped: Sequence[Wrapped]) -> list[list[str]]:
    """The parameter orders of modules with several targeted parameters, as read (kept in the
    provenance so that writing PEFT again nests them the same way without a plugin)."""
    modules: dict[str, list[str]] = {}
    for item in wrapped:
        module, _, param = item.name.rpartition(".")
        modules.setdefault(module, []).append(param)
    orders: list[list[str]] = []
    for params in modules.values():
        if len(params) > 1 and params not in orders:
            orders.append(params)
    return orders


def wrapper_keys(stacks: Sequence[Stack], storages: Sequence[ExpertStorage], where: Path,
                 orders: Sequence[Sequence[str]] = ()) -> dict[str, str]:
    """Full parameter name → the PEFT key stem (``<module>`` with one ``.base_layer`` per
    parameter of the same module registered after it). The order is the family's, else one of
    ``orders`` (recorded when the adapter was read from PEFT) with the same parameters."""
    modules: dict[str, list[str]] = {}
    for stack in stacks:
        module, _, param = stack.name.rpartition(".")
        modules.setdefault(module, []).append(param)
    out = {}
    for module, params in modules.items():
        if len(params) > 1:
            known = by_registration(module, params, storages) or next(
                (list(o) for o in orders if sorted(o) == sorted(params)), None
            )
            if known is None:
                raise LoraformatError(
                    where,
                    f"module {module!r} has LoRA on {len(params)} parameters; PEFT nests them in "
                    "the order the model registers them, which no installed plugin states",
                )
            params = known
        for j, param in enumerate(params):
            out[f"{module}.{param}"] = module + WRAPPER * (len(params) - 1 - j)
    return out
