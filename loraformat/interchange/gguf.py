"""llama.cpp GGUF LoRA adapters, written and read with the ``gguf`` package.

What llama.cpp's loader (``src/llama-adapter.cpp``) requires, and this module writes:

- KV ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (f32),
  ``general.architecture`` = llama.cpp's architecture name (must equal the model's);
- tensors ``<llama.cpp weight name>.lora_a`` / ``.lora_b`` (e.g. ``blk.0.attn_q.weight.lora_a``),
  names from the architecture's name table (column ``"gguf"``). numpy A is (r, in) and B (out, r) —
  GGUF lists them as ne [in, r] / [r, out], and the loader checks model.ne[0] == a.ne[0],
  model.ne[1] == b.ne[1], a.ne[1] == b.ne[0]. ``token_embd`` is the exception: A is stored
  transposed, (num_embeddings, r), as llama.cpp's converter does;
- B's rows in llama.cpp's order: the architecture's ``row_permutation(..., "gguf")`` (LLaMA q/k are
  permuted for llama.cpp's rotary layout); A's columns where its optional
  ``column_permutation(..., "gguf")`` says (Qwen3.5's ``out_proj`` inputs); A is otherwise
  untouched.

The scale llama.cpp applies is ``user_scale·alpha/rank`` with one alpha per file and the rank read
from the tensor. So one alpha covers every layer with the same alpha under ``alpha/r``; rsLoRA
(alpha/√r) with one rank is written as alpha·√r. Layers whose scale no single alpha reproduces get
their scale ratio folded into B (a representation change, noted in the report).
``loraformat.scaling`` / ``loraformat.alpha`` KV entries record the original rule and alpha, so
reading back restores them exactly when nothing was folded. DoRA, lora_bias, replacements and
layers llama.cpp has no name for cannot be carried (refused unless ``lossy``).

Checked against llama.cpp's own ``convert_lora_to_gguf.py`` (llama.cpp vendored in
llama-cpp-python 0.3.36): for LLaMA (all seven projections and the embedding) both write the same
names, alpha and bit-identical tensors. For GPT-2 they differ on purpose: that converter
transposes the LoRA product along with HF's Conv1D weights, giving ``lora_a`` ne [out, r] for
``attn_qkv`` (ne [n_embd, 3·n_embd]), which the loader's ``model.ne[0] == a.ne[0]`` check rejects
(and, for square layers, applies ΔWᵀ). This module writes A, B in math orientation for every
layer, which is what the loader checks and computes with.

Mixture-of-experts layers become llama.cpp's stacked expert LoRA, which ``build_lora_mm_id``
(``src/llama-graph.cpp``) applies with ``ggml_mul_mat_id`` on each token's selected experts:
``blk.N.ffn_{gate,up,down}_exps.weight.lora_a`` numpy [E, r, in] (ne [in, r, E]) and ``.lora_b``
[E, out, r] (ne [r, out, E]); the loader's checks are the 2-D ones on the first two axes and the
rank is ``lora_b``'s ne[0]. The per-expert layers of Qwen3-MoE and Mixtral are stacked by expert
(llama.cpp's converter stacks the checkpoint's tensors the same way), a gate_up stack is split
into gate and up rows as the family's storage says (gpt-oss: interleaved, as the converter's
``[:, ::2]`` / ``[:, 1::2]``); reading does the inverse (:func:`~.experts.split_expert_tensors`).

Writing and reading need the base (``--base``: the Hugging Face checkpoint or the GGUF model
itself): llama.cpp's names and row order depend on the model config.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer, scale_of
from ..gguf_model import checked_permutation, column_permutation, open_reader, read_field
from ._common import Context, Names, atomic_path, scaled
from .experts import collect_stacks, expert_parts, expert_storage, split_expert_tensors

NAME = "gguf"
KV_SCALING = "loraformat.scaling"
KV_ALPHA = "loraformat.alpha"
_EMBEDDING_NAMES = ("token_embd",)


def _gguf() -> Any:
    import gguf

    return gguf


def _need_base(ctx: Context, path: Path) -> Any:
    if ctx.base is None:
        raise LoraformatError(
            path,
            "GGUF conversion needs the base model (--base BASE, a checkpoint or the .gguf "
            "model): llama.cpp's tensor names and row order depend on its config",
        )
    return ctx.base


def _llama_cpp_architecture(base: Any) -> str:
    """llama.cpp's ``general.architecture`` for the base: what its architecture says."""
    name = base.arch.gguf_architecture
    if name is None and base.generic:
        raise base.arch.missing_plugin(base.info, "llama.cpp (gguf) conversion")
    if name is None:
        raise base.info.error(
            f"llama.cpp (gguf) needs the {base.architecture!r} architecture's llama.cpp name, "
            "and its plugin gives none"
        )
    return str(name)


def _permutation(base: Any, path: str, rows: int) -> np.ndarray | None:
    return checked_permutation(base.arch.row_permutation(base.info, path, "gguf"), rows, path)


def _file_alpha(adapter: Adapter) -> tuple[float, dict[str, float]]:
    """(alpha for the file, per-layer factor to fold into B where alpha/rank is not the scale)."""
    specs = adapter.specs
    if adapter.scaling == "alpha/r":
        alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    else:
        alpha_r = Counter((s.alpha, s.rank) for s in specs.values()).most_common(1)[0][0]
        alpha = alpha_r[0] * math.sqrt(alpha_r[1])
    folds = {}
    for path, spec in specs.items():
        wanted = scale_of(adapter.scaling, spec.alpha, spec.rank)
        given = alpha / spec.rank
        if wanted != given:
            folds[path] = wanted / given
    return alpha, folds


def write_gguf(adapter: Adapter, out: Path, ctx: Context) -> None:
    gguf = _gguf()
    _need_base(ctx, out)
    config = ctx.config
    names = Names(adapter.architecture, config, "gguf", identity_fallback=False)
    specs = adapter.specs
    dora = [p for p, s in specs.items() if s.dora]
    biased = [p for p, s in specs.items() if s.lora_bias]
    stacks, expert_paths = collect_stacks(adapter, expert_storage(adapter.architecture), ctx)
    unnamed = [p for p in specs if p not in expert_paths and names.to_foreign(p) is None]
    unnamed += [stack.name for stack in stacks if not (stack.storage and stack.storage.gguf)]
    if len(unnamed) == len(specs) - len(expert_paths) + len(stacks):
        raise LoraformatError(
            out,
            names.missing("llama.cpp (gguf) tensor names")
            + ": llama.cpp cannot load this architecture's adapters",
        )
    if dora:
        ctx.lossy(f"DoRA magnitudes on {len(dora)} layer(s) (e.g. {dora[0]}): llama.cpp LoRA "
                  "has no DoRA ([[lossy]] drops them: outputs change)")
    if biased:
        ctx.lossy(f"lora_bias on {len(biased)} layer(s) (e.g. {biased[0]}): llama.cpp LoRA has "
                  "no bias ([[lossy]] drops it)")
    if adapter.replacement_names:
        ctx.lossy(f"{len(adapter.replacement_names)} replaced tensor(s) (e.g. "
                  f"{adapter.replacement_names[0]}): llama.cpp LoRA carries only A and B "
                  "([[lossy]] drops them)")
    if unnamed:
        ctx.lossy(f"{len(unnamed)} layer(s) llama.cpp has no tensor for (e.g. {unnamed[0]}) "
                  "([[lossy]] drops them)")
    ctx.check_lossy(out, "GGUF")

    alpha, folds = _file_alpha(adapter)
    if folds:
        ctx.note(f"GGUF has one alpha per file: scale ratios folded into B for {len(folds)} "
                 f"layer(s) (e.g. {next(iter(folds))}); alpha = {alpha:g}")
    arch_name = _llama_cpp_architecture(ctx.base)
    tensors: list[tuple[str, np.ndarray]] = []
    total = len(specs)
    for stack in stacks:
        if stack.storage and stack.storage.gguf:
            fold = scale_of(adapter.scaling, stack.alpha, stack.rank) / (alpha / stack.rank)
            for name, rows in expert_parts(stack):
                tensors.append((name + ".lora_a", np.ascontiguousarray(stack.A)))
                tensors.append((name + ".lora_b", np.ascontiguousarray(
                    scaled(stack.B[:, rows], fold))))
    for done, (path, layer) in enumerate(adapter.layers(), 1):
        name = None if path in expert_paths else names.to_foreign(path)
        if name is None:
            continue
        name = name.removesuffix(".weight") + ".weight"
        b = np.asarray(layer.B)
        if layer.out_rows is not None:
            full = np.zeros((layer.out_features, layer.rank), dtype=b.dtype)
            full[layer.rows()] = b
            b = full
            ctx.note("out_rows layers written with zero B rows for the rows they do not adapt")
        b = scaled(b, folds.get(path, 1.0))
        perm = _permutation(ctx.base, path, layer.out_features)
        if perm is not None:
            b = b[perm]
        a = np.asarray(layer.A)
        columns = column_permutation(ctx.base.arch, ctx.base.info, path, layer.in_features)
        if columns is not None:
            a = a[:, columns]
        if layer.kind == "embedding" or name.removesuffix(".weight") in _EMBEDDING_NAMES:
            a = a.T  # llama.cpp's token_embd LoRA: A stored (num_embeddings, r)
        tensors.append((name + ".lora_a", np.ascontiguousarray(a)))
        tensors.append((name + ".lora_b", np.ascontiguousarray(b)))
        ctx.tick(done, total)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_string(KV_SCALING, adapter.scaling)
        if not folds:
            alphas = {s.alpha for s in specs.values()}
            if len(alphas) == 1:
                writer.add_float64(KV_ALPHA, float(next(iter(alphas))))
        for name, array in tensors:
            _add_tensor(gguf, writer, name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    ctx.report.layers = len(tensors) // 2


def _add_tensor(gguf: Any, writer: Any, name: str, array: np.ndarray) -> None:
    import ml_dtypes

    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        writer.add_tensor(name, array.view(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
    elif array.dtype in (np.float32, np.float16):
        writer.add_tensor(name, array)
    else:
        writer.add_tensor(name, array.astype(np.float32))


def _tensor_array(gguf: Any, tensor: Any) -> np.ndarray:
    import ml_dtypes

    data = np.asarray(tensor.data)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type
    if kind == gguf.GGMLQuantizationType.BF16:
        return np.array(data.view(np.uint16).view(ml_dtypes.bfloat16).reshape(shape))
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(data.reshape(shape))
    raise LoraformatError(None, f"tensor {tensor.name}: type {kind.name} is not supported "
                          "(F32, F16, BF16 only)")


def read_gguf(path: Path, ctx: Context) -> Adapter:
    gguf = _gguf()
    base = _need_base(ctx, path)
    reader = open_reader(path)
    kind = read_field(reader, "general.type"), read_field(reader, "adapter.type")
    if kind != ("adapter", "lora"):
        raise LoraformatError(path, "not a GGUF LoRA adapter (general.type/adapter.type)")
    arch_name = read_field(reader, "general.architecture")
    expected = _llama_cpp_architecture(base)
    if arch_name != expected:
        raise LoraformatError(
            path, f"adapter is for llama.cpp architecture {arch_name!r}, the base is {expected!r}"
        )
    alpha = float(read_field(reader, "adapter.lora.alpha") or 0.0)
    scaling = read_field(reader, KV_SCALING)
    original_alpha = read_field(reader, KV_ALPHA)
    names = Names(
        base.architecture, ctx.config, "gguf", identity_fallback=False, present=ctx.present
    )
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        name = str(tensor.name)
        for suffix, role in ((".lora_a", "a"), (".lora_b", "b")):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[role] = _tensor_array(gguf, tensor)
                break
        else:
            if name.endswith("_norm.weight"):
                ctx.lossy(f"norm tensor {name} (llama.cpp ignores it too; [[lossy]] drops it)")
                continue
            raise LoraformatError(path, f"tensor {name!r} is neither .lora_a nor .lora_b")
    layers: dict[str, LoraLayer] = {}
    for name, pair in sorted(pairs.items()):
        if "a" not in pair or "b" not in pair:
            raise LoraformatError(path, f"{name}: has only one of lora_a and lora_b")
    stacked = {n: p for n, p in pairs.items() if p["a"].ndim == 3}
    if stacked:
        layers.update(split_expert_tensors(
            stacked, base.layers, expert_storage(base.architecture), alpha or None, path
        ))
    for name, pair in sorted(pairs.items()):
        if name in stacked:
            continue
        layer_path = names.to_path(name.removesuffix(".weight"))
        dense = base.layers.get(layer_path) if layer_path else None
        if dense is None:
            raise LoraformatError(path, f"{name}: no layer of the base has this llama.cpp name")
        a, b = pair["a"], pair["b"]
        if dense.kind == "embedding" or name.removesuffix(".weight") in _EMBEDDING_NAMES:
            a = np.ascontiguousarray(a.T)
        if a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != (
            dense.in_features, dense.out_features
        ):
            raise LoraformatError(
                path, f"{name}: lora_a {list(a.shape)} / lora_b {list(b.shape)} do not fit "
                f"{layer_path} ({dense.in_features}→{dense.out_features})",
            )
        perm = _permutation(base, layer_path, dense.out_features)
        if perm is not None:
            restored = np.empty_like(b)
            restored[perm] = b
            b = restored
        columns = column_permutation(base.arch, base.info, layer_path, dense.in_features)
        if columns is not None:
            restored = np.empty_like(a)
            restored[:, columns] = a
            a = restored
        rank = int(a.shape[0])
        layers[layer_path] = LoraLayer(
            A=a, B=np.ascontiguousarray(b), alpha=alpha if alpha else float(rank),
            in_features=dense.in_features, out_features=dense.out_features,
            kind="embedding" if dense.kind == "embedding" else "linear",
        )
    ctx.check_lossy(path, "loraformat")
    rule = "alpha/r"
    if scaling in ("alpha/r", "alpha/sqrt(r)") and original_alpha is not None:
        # Written by loraformat without folding: restore the exact rule and alpha, if they give
        # the same scale llama.cpp computes from the file's alpha (a check against edits).
        candidate = float(original_alpha)
        if all(
            math.isclose(scale_of(scaling, candidate, l.rank), l.alpha / l.rank, rel_tol=1e-6)
            for l in layers.values()
        ):
            rule = scaling
            for layer in layers.values():
                layer.alpha = candidate
    if not alpha:
        ctx.note("adapter.lora.alpha is 0 or absent: llama.cpp applies scale 1 (alpha = rank)")
    ctx.report.layers = len(layers)
    return Adapter.from_layers(
        base.architecture, layers, scaling=rule, fingerprint=base.checkpoint.fingerprint(),
        provenance={"converted_from": "gguf"},
    )


def sniff(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


class GgufCodec:
    name = NAME
    description = "llama.cpp GGUF LoRA adapter"
    writes_directory = False
    options = ()

    def sniff(self, path: Path) -> bool:
        return sniff(path)

    def read(self, path: Path, ctx: Context) -> Adapter:
        return read_gguf(path, ctx)

    def write(self, adapter: Adapter, path: Path, ctx: Context) -> None:
        write_gguf(adapter, path, ctx)


CODEC = GgufCodec()
