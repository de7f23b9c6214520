"""Hugging Face PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading also accepts the legacy ``adapter_model.bin``, loaded with
``torch.load(weights_only=True)`` only: that refuses every pickled object other than tensors and
plain containers, so a hostile file cannot run code. Nothing is ever unpickled otherwise.

What is carried (checked against peft 0.21):

- keys ``base_model.model.<module>.lora_A.weight`` (r×in) / ``.lora_B.weight`` (out×r), math
  orientation also for ``fan_in_fan_out`` (GPT-2 Conv1D): PEFT transposes only the product;
- ``r``, ``lora_alpha``, ``use_rslora`` (scale alpha/√r), ``rank_pattern`` / ``alpha_pattern``
  resolved per module exactly as PEFT's ``get_pattern_key`` does (first key, in order, such that
  the module name matches ``(.*\\.)?(key)$``);
- DoRA ``<module>.lora_magnitude_vector`` → magnitude; ``lora_bias`` ``<module>.lora_B.bias`` →
  lora_bias; embedding LoRA ``lora_embedding_A`` (r×num_embeddings) / ``lora_embedding_B``
  (dim×r) → kind ``embedding``;
- ``modules_to_save`` tensors and the biases saved by ``bias="all"`` / ``"lora_only"``
  (``<module>.base_layer.bias``) → replacements, keyed by the *checkpoint* tensor name.

PEFT names modules as transformers holds them in memory; for some architectures (ViT under
transformers 5) that differs from the checkpoint's tensor names. The architecture's name table
(column ``"peft"``) translates; where it has no row (or no plugin provides the architecture) the
names are taken as equal.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir
from ..base import as_base
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ..format.safetensors_io import write_safetensors
from ._common import (
    Context,
    Names,
    adapter_architecture,
    fit_rank,
    read_safetensors,
    refuse_escape,
    torch_load_weights_only,
)
from .experts import collect_stacks, expert_storage
from .peft_experts import (
    expert_layers,
    nesting_orders,
    peft_factors,
    take_wrappers,
    unwrap,
    weight_parameter,
    wrapper_keys,
)
from .peft_keys import PREFIX, get_pattern_key
from .peft_variants import read_variant

NAME = "peft"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
#: PEFT methods converted by :mod:`loraformat.interchange.peft_variants` (exact low-rank forms).
VARIANTS = ("LOHA", "LOKR", "ADALORA", "VERA")

_LAYER_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # older PEFT spelling
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
}


# -- reading ------------------------------------------------------------------------------------


def sniff(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not path.is_dir() or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "peft_type" in data


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise LoraformatError(path, f"not a PEFT adapter directory: no {CONFIG_FILE}")
    refuse_escape(path, config_path)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraformatError(config_path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoraformatError(config_path, "not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type in VARIANTS:
        return config  # checked by peft_variants
    if peft_type != "LORA":
        raise LoraformatError(
            config_path,
            f"peft_type is {peft_type!r}; only LoRA adapters (\"LORA\") and the variants "
            f"{', '.join(VARIANTS)} convert",
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise LoraformatError(config_path, f"{key} must be a number, got {config.get(key)!r}")
    for key, what in (
        ("layer_replication", "layer_replication (duplicated layers)"),
        ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
        ("use_qalora", "QA-LoRA"),
    ):
        if config.get(key):
            raise LoraformatError(config_path, f"{what} has no loraformat form")
    return config


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    st = path / WEIGHTS_FILE
    refuse_escape(path, st, path / LEGACY_WEIGHTS_FILE)
    if st.is_file():
        return read_safetensors(st)[0], st
    legacy = path / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        return torch_load_weights_only(legacy), legacy
    raise LoraformatError(
        path, f"PEFT adapter has neither {WEIGHTS_FILE} nor {LEGACY_WEIGHTS_FILE}"
    )


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _LAYER_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def read_peft(
    path: str | os.PathLike[str],
    base: Any = None,
    *,
    architecture: str | None = None,
    lossy: bool = False,
    context: Context | None = None,
) -> Adapter:
    """Read a PEFT LoRA adapter directory into an in-memory :class:`Adapter`.

    ``base``: the base checkpoint (path or :class:`~loraformat.base.BaseModel`); with it, layer
    paths, shapes and the architecture are checked against the checkpoint. Without it, the
    architecture comes from ``architecture`` or is detected by the plugins from the adapter's
    ``auto_mapping`` and module names, and in/out features come from the tensor shapes.
    ``lossy``: accept dropping what the format cannot hold (see :class:`Context`).
    """
    ctx = context or Context(base=as_base(base), allow_lossy=lossy)
    if context is not None and base is not None and ctx.base is None:
        ctx.base = as_base(base)
    return _read(Path(path), ctx, architecture or ctx.options.get("architecture"))


def _resolve_architecture(
    path: Path, config: Mapping[str, Any], modules: list[str], ctx: Context, given: str | None
) -> str:
    # PEFT records the model class and its module (transformers.models.<model_type>.modeling_…):
    # what the adapter says it is for, checked against the base (adapter_architecture).
    said: dict[str, Any] = {}
    mapping = config.get("auto_mapping") or {}
    if isinstance(mapping.get("base_model_class"), str):
        said["architectures"] = [mapping["base_model_class"]]
    library = mapping.get("parent_library")
    match = re.fullmatch(r"transformers\.models\.(\w+)\.modeling_\w+", str(library or ""))
    if match:
        said["model_type"] = match.group(1)
    return adapter_architecture(path, ctx, modules, "this PEFT adapter", config=said, given=given)


def _read(path: Path, ctx: Context, architecture: str | None) -> Adapter:
    config = _read_config(path)
    raw, weights_path = _read_tensors(path)
    if config["peft_type"] in VARIANTS:
        return read_variant(
            path, config, raw, weights_path, ctx,
            lambda modules: _resolve_architecture(path, config, modules, ctx, architecture),
        )[0]
    if ctx.options.get("rank") is not None or ctx.options.get("energy") is not None:
        raise LoraformatError(None, "--rank/--energy apply to PEFT LoHa, LoKr, AdaLoRA and VeRA "
                                    "inputs; reduce a LoRA adapter with `loraformat reduce`")
    grouped: dict[str, dict[str, np.ndarray]] = {}
    others: dict[str, np.ndarray] = {}
    for key, array in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".original_module." in name:
            continue  # bias="all" also saves the untouched original of a modules_to_save module
        split = _split(name)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = array
            continue
        if ".lora_" in name:
            raise LoraformatError(weights_path, f"tensor {key!r}: unsupported PEFT LoRA variant")
        name = name.replace(".modules_to_save.", ".")
        if name in others and key.find(".modules_to_save.") >= 0:
            continue  # the plain key (saved by modules_to_save) wins over bias="all"'s wrapper key
        others[name] = array

    if config.get("alora_invocation_tokens"):
        ctx.lossy(
            "aLoRA invocation tokens: the adapter acts only after them, loraformat applies it "
            "to every token ([[lossy]] drops the invocation sequence)"
        )
    arch = _resolve_architecture(
        path, config, sorted({unwrap(m)[0] for m in grouped}), ctx, architecture
    )
    names = Names(arch, ctx.config, "peft", identity_fallback=True, present=ctx.present)
    scaling = "alpha/sqrt(r)" if config.get("use_rslora") else "alpha/r"
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    base_layers = ctx.base.layers if ctx.base is not None else None

    def resolved(patterns: dict[str, Any], name: str, default: Any) -> Any:
        return patterns.get(get_pattern_key(list(patterns), name), default)

    layers: dict[str, LoraLayer] = {}
    storages = expert_storage(arch)
    base_shapes = ctx.base.checkpoint.shapes() if ctx.base is not None else {}
    all_wrapped = take_wrappers(
        grouped, list(config.get("target_parameters") or ()), storages,
        (lambda name: base_shapes.get(names.to_path(name) or name)) if ctx.base else None,
        weights_path,
    )
    for wrapped in all_wrapped:
        produced = expert_layers(
            wrapped, int(resolved(rank_pattern, wrapped.name, config["r"])),
            float(resolved(alpha_pattern, wrapped.name, config["lora_alpha"])),
            storages, names, weights_path,
        )
        for layer_path, layer in produced.items():
            _check_expert_layer(ctx, wrapped.name, layer_path, layer, weights_path)
        layers.update(produced)
    module_of: dict[str, str] = {}  # layer path → PEFT module name
    total = len(grouped)
    for done, (module, parts) in enumerate(sorted(grouped.items()), 1):
        layer_path = names.to_path(module)
        if layer_path is None or (base_layers is not None and layer_path not in base_layers):
            raise LoraformatError(
                weights_path,
                f"PEFT module {module!r} is not an adaptable layer of the base "
                f"({ctx.base.path if ctx.base is not None else arch})",
            )
        embedding = "embA" in parts or "embB" in parts
        a = parts.get("embA" if embedding else "A")
        b = parts.get("embB" if embedding else "B")
        if a is None or b is None:
            raise LoraformatError(
                weights_path, f"module {module!r}: has only one of LoRA A and B"
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraformatError(
                weights_path,
                f"module {module!r}: A {list(a.shape)} and B {list(b.shape)} are not r×in and "
                "out×r with the same r",
            )
        rank = int(a.shape[0])
        expected_rank = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
        if int(expected_rank) != rank:
            raise LoraformatError(
                weights_path,
                f"module {module!r}: tensors have rank {rank} but adapter_config.json gives "
                f"{expected_rank}",
            )
        alpha_key = get_pattern_key(list(alpha_pattern), module)
        alpha = alpha_pattern.get(alpha_key, config["lora_alpha"])
        in_features, out_features = int(a.shape[1]), int(b.shape[0])
        if base_layers is not None:
            dense = ctx.base.layer_as(
                layer_path, "embedding" if embedding else "linear", in_features, out_features
            )
            if (dense.in_features, dense.out_features) != (in_features, out_features):
                raise LoraformatError(
                    weights_path,
                    f"module {module!r}: LoRA maps {in_features}→{out_features} but base layer "
                    f"{layer_path} is {dense.in_features}→{dense.out_features}",
                )
            if (dense.kind == "embedding") != embedding:
                raise LoraformatError(
                    weights_path,
                    f"module {module!r}: {'embedding' if embedding else 'linear'} LoRA on a "
                    f"{dense.kind} layer",
                )
        magnitude = parts.get("magnitude")
        if magnitude is not None and embedding:
            ctx.lossy(f"DoRA magnitude of embedding {module!r} (loraformat has no embedding DoRA)")
            magnitude = None
        if config.get("use_dora") and magnitude is None and not embedding:
            raise LoraformatError(
                weights_path,
                f"module {module!r}: use_dora is set but lora_magnitude_vector is missing",
            )
        layers[layer_path] = fit_rank(LoraLayer(
            A=a,
            B=b,
            alpha=float(alpha),
            in_features=in_features,
            out_features=out_features,
            kind="embedding" if embedding else "linear",
            magnitude=magnitude,
            lora_bias=parts.get("bias"),
        ), scaling, ctx)
        module_of[layer_path] = module
        ctx.tick(done, total)

    replacements = _replacements(others, layers, module_of, names, ctx, weights_path)
    ctx.check_lossy(path, "loraformat")
    ctx.report.layers = len(layers)
    provenance = {
        "converted_from": "peft",
        "peft_config": {
            k: config[k]
            for k in ("base_model_name_or_path", "task_type", "auto_mapping", "target_modules",
                      "layers_to_transform", "modules_to_save", "bias", "peft_version")
            if config.get(k) is not None
        },
    }
    if nesting_orders(all_wrapped):
        provenance["peft_config"]["parameter_nesting"] = nesting_orders(all_wrapped)
    base_name = config.get("base_model_name_or_path")
    return Adapter.from_layers(
        arch,
        layers,
        scaling=scaling,
        replacements=replacements or None,
        base_name=base_name if isinstance(base_name, str) and base_name else None,
        fingerprint=ctx.base.checkpoint.fingerprint() if ctx.base is not None else None,
        provenance=provenance,
    )


def _check_expert_layer(
    ctx: Context, name: str, layer_path: str, layer: LoraLayer, where: Path
) -> None:
    """An expert layer made from PEFT parameter ``name`` against the base (when given)."""
    if ctx.base is None:
        return
    if layer_path not in ctx.base.layers:
        raise LoraformatError(
            where, f"PEFT parameter {name!r}: the base {ctx.base.path} has no layer "
            f"{layer_path!r} to hold it",
        )
    dense = ctx.base.layer_as(layer_path, "linear", layer.in_features, layer.out_features)
    experts = layer.experts
    if (dense.in_features, dense.out_features, dense.experts) != (
        layer.in_features, layer.out_features, experts
    ):
        raise LoraformatError(
            where, f"PEFT parameter {name!r}: LoRA maps {layer.in_features}→"
            f"{layer.out_features}" + (f" for {experts} experts" if experts else "")
            + f", but base layer {layer_path} is {dense.in_features}→{dense.out_features}"
            + (f" for {dense.experts} experts" if dense.experts else ""),
        )


def _replacements(
    others: dict[str, np.ndarray],
    layers: dict[str, LoraLayer],
    module_of: dict[str, str],
    names: Names,
    ctx: Context,
    weights_path: Path,
) -> dict[str, np.ndarray]:
    """Full tensors (modules_to_save, saved biases) → replacements keyed by checkpoint name."""
    by_module = {module: path for path, module in module_of.items()}
    out: dict[str, np.ndarray] = {}
    for name, array in sorted(others.items()):
        module, _, param = name.rpartition(".")
        module = module.removesuffix(".base_layer")
        path = by_module.get(module) or names.to_path(module) or module
        target = f"{path}.{param}"
        if path in layers and param == "weight":
            # PEFT saves the embedding table next to an embedding LoRA (save_embedding_layers).
            # loraformat never replaces and adapts one tensor, so this copy must equal the base.
            if ctx.base is not None:
                base_weight = ctx.base.checkpoint.numpy(target)
                if base_weight.shape != array.shape or not np.array_equal(base_weight, array):
                    ctx.lossy(
                        f"PEFT's copy of {target} differs from the base weight and the layer is "
                        "also adapted ([[lossy]] keeps the base weight)"
                    )
                else:
                    ctx.note(f"dropped PEFT's saved copy of {target} (identical to the base)")
            else:
                ctx.note(
                    f"dropped PEFT's saved copy of {target} (PEFT saves it whenever an embedding "
                    "is adapted; assumed equal to the base — pass --base to check)"
                )
            continue
        if ctx.base is not None and target not in ctx.base.checkpoint:
            raise LoraformatError(
                weights_path,
                f"tensor {name!r} has no counterpart {target!r} in the base checkpoint",
            )
        if ctx.base is not None:
            shape = tuple(ctx.base.checkpoint.info(target).shape)
            if shape != tuple(array.shape):
                raise LoraformatError(
                    weights_path,
                    f"tensor {name!r} is {list(array.shape)}, base {target} is {list(shape)}",
                )
        out[target] = array
    return out


# -- writing ------------------------------------------------------------------------------------


def _resolves(patterns: dict[str, Any], module: str, default: Any, expected: Any) -> bool:
    value = patterns.get(get_pattern_key(list(patterns), module), default)
    return value == expected


def _patterns(
    values: dict[str, Any], default: Any
) -> dict[str, Any]:
    """A ``*_pattern`` dict that PEFT resolves to ``values[module]`` for every module.

    Full module names are used as patterns; if PEFT's regex matching would confuse two of them
    (names are regexes to PEFT), the keys are escaped.
    """
    plain = {m: v for m, v in values.items() if v != default}
    if all(_resolves(plain, m, default, v) for m, v in values.items()):
        return plain
    escaped = {re.escape(m): v for m, v in plain.items()}
    if all(_resolves(escaped, m, default, v) for m, v in values.items()):
        return escaped
    raise LoraformatError(None, "cannot build a PEFT rank/alpha pattern for these module names")


def write_peft(
    adapter: Adapter,
    out: str | os.PathLike[str],
    base: Any = None,
    *,
    lossy: bool = False,
    overwrite: bool = False,
    context: Context | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT directory that ``PeftModel.from_pretrained`` loads.

    Each layer's scale is reproduced exactly: ``use_rslora`` from the scaling rule, the most
    common rank/alpha as ``r``/``lora_alpha`` and the rest in ``rank_pattern``/``alpha_pattern``
    keyed by full module name. Fused-layer adapters (``out_rows``) have no PEFT form: refused, or
    with ``lossy`` B is expanded to every row with zeros (same outputs, bigger file).
    """
    from ..atomic import check_output

    ctx = context or Context(base=as_base(base), allow_lossy=lossy)
    out = Path(out)
    if context is None:
        check_output(out, overwrite)
    _write(adapter, out, ctx)
    return out


def _write(adapter: Adapter, out: Path, ctx: Context) -> None:
    names = Names(adapter.architecture, ctx.config, "peft", identity_fallback=True)
    base_layers = ctx.base.layers if ctx.base is not None else {}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    targets: list[str] = []
    dora = {path: spec.dora for path, spec in adapter.specs.items()}
    any_dora = any(dora.values())
    any_bias = any(spec.lora_bias for spec in adapter.specs.values())
    fused = [p for p, s in adapter.specs.items() if s.out_rows is not None]
    if fused:
        ctx.lossy(
            f"{len(fused)} layer(s) adapt only some output rows (out_rows, e.g. {fused[0]}); "
            "PEFT has no such form ([[lossy]] writes B with zero rows elsewhere: same outputs, "
            "larger file)"
        )
    if any_dora and not all(dora.values()):
        ctx.lossy(
            "DoRA on some layers only; PEFT's use_dora applies to all ([[lossy]] drops the "
            "DoRA magnitudes)"
        )
    ctx.check_lossy(out, "PEFT")
    use_dora = any_dora and all(dora.values())
    fan_in_fan_out = False
    total = len(adapter.specs)
    storages = expert_storage(adapter.architecture)
    stacks, expert_paths = collect_stacks(adapter, storages, ctx)
    stems = wrapper_keys(
        stacks, storages, out,
        adapter.manifest.get("provenance", {}).get("peft_config", {}).get("parameter_nesting", ()),
    )
    for stack in stacks:
        a, b = peft_factors(stack)
        tensors[PREFIX + stems[stack.name] + ".lora_A.weight"] = a
        tensors[PREFIX + stems[stack.name] + ".lora_B.weight"] = b
        ranks[stack.name] = stack.rank
        alphas[stack.name] = stack.alpha
    for done, (path, layer) in enumerate(adapter.layers(), 1):
        if path in expert_paths:
            continue
        module = names.to_foreign(path)
        if module is None:
            raise LoraformatError(out, f"layer {path!r} has no PEFT module name")
        if weight_parameter(adapter.architecture, module):
            stems[module + ".weight"] = module  # same keys; named in target_parameters
            ranks[module + ".weight"] = layer.rank
            alphas[module + ".weight"] = layer.alpha
        else:
            targets.append(module)
            ranks[module] = layer.rank
            alphas[module] = layer.alpha
        key = PREFIX + module
        b = layer.B
        if layer.out_rows is not None:
            b = np.zeros((layer.out_features, layer.rank), dtype=layer.B.dtype)
            b[layer.rows()] = layer.B
        if layer.kind == "embedding":
            tensors[key + ".lora_embedding_A"] = layer.A
            tensors[key + ".lora_embedding_B"] = b
        else:
            tensors[key + ".lora_A.weight"] = layer.A
            tensors[key + ".lora_B.weight"] = b
            if path in base_layers and base_layers[path].layout == "in_out":
                fan_in_fan_out = True
        if use_dora and layer.magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = layer.magnitude
        if any_bias and layer.kind != "embedding":
            if layer.lora_bias is not None:
                tensors[key + ".lora_B.bias"] = layer.lora_bias
            else:
                # PEFT's lora_bias is all-or-nothing: a zero bias changes nothing.
                tensors[key + ".lora_B.bias"] = np.zeros(layer.out_features, dtype=b.dtype)
                ctx.note(f"wrote a zero lora_B.bias for {path} (PEFT's lora_bias is per adapter)")
        ctx.tick(done, total)
    ctx.check_lossy(out, "PEFT")

    modules_to_save: set[str] = set()
    needs_bias_all = False
    needs_bias_lora_only = False
    module_of = {p: names.to_foreign(p) for p in adapter.specs}
    for name in adapter.replacement_names:
        path, _, param = name.rpartition(".")
        array = np.asarray(adapter.replacement(name))
        if path in adapter.specs:
            tensors[f"{PREFIX}{module_of[path]}.base_layer.{param}"] = array
            needs_bias_lora_only = True
            continue
        module = names.to_foreign(path) or path
        tensors[f"{PREFIX}{module}.{param}"] = array
        if param == "bias":
            needs_bias_all = True
        else:
            modules_to_save.add(module)
    if modules_to_save:
        # A module saved whole carries its bias with it; bias="all" is needed only for biases of
        # modules that are neither adapted nor saved whole.
        needs_bias_all = any(
            name.endswith(".bias")
            and name.rpartition(".")[0] not in adapter.specs
            and (names.to_foreign(name.rpartition(".")[0]) or name.rpartition(".")[0])
            not in modules_to_save
            for name in adapter.replacement_names
        )

    rank_default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha_default = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
    provenance = adapter.manifest.get("provenance", {}).get("peft_config", {})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": provenance.get("task_type"),
        "base_model_name_or_path": adapter.manifest["base_model"].get("name")
        or provenance.get("base_model_name_or_path"),
        "r": int(rank_default),
        "lora_alpha": _number(alpha_default),
        "rank_pattern": _patterns(ranks, rank_default),
        "alpha_pattern": {k: _number(v) for k, v in _patterns(alphas, alpha_default).items()},
        "use_rslora": adapter.scaling == "alpha/sqrt(r)",
        "use_dora": use_dora,
        "lora_bias": any_bias,
        "target_modules": sorted(targets) if targets or not stems else None,
        "target_parameters": sorted(stems) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "all" if needs_bias_all else ("lora_only" if needs_bias_lora_only else "none"),
        "modules_to_save": sorted(modules_to_save) or None,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if provenance.get("auto_mapping"):
        config["auto_mapping"] = provenance["auto_mapping"]
    ctx.report.layers = len(targets) + len(stems)
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def _number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


class PeftCodec:
    name = NAME
    description = "Hugging Face PEFT LoRA directory (adapter_config.json + adapter weights)"
    writes_directory = True
    options = ("rank", "energy")  # reduce LoHa/LoKr/AdaLoRA/VeRA inputs in the same pass

    def sniff(self, path: Path) -> bool:
        return sniff(path)

    def read(self, path: Path, ctx: Context) -> Adapter:
        return _read(path, ctx, ctx.options.get("architecture"))

    def write(self, adapter: Adapter, path: Path, ctx: Context) -> None:
        _write(adapter, path, ctx)


CODEC = PeftCodec()
