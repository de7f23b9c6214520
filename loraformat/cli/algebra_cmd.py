"""``stack``, ``subtract``, ``scale``, ``reduce``, ``combine``, ``extract``: adapter algebra.

Each command loads its inputs, calls one function of :mod:`loraformat.algebra`, and writes OUT
atomically (refusing to replace it without ``--overwrite``).
"""

from __future__ import annotations

from typing import Any

import click

from ..algebra import DTYPE_CHOICES, ops
from ..algebra.combine import METHODS, combine
from ..algebra.combine import report_json as combine_report
from ..algebra.extract import extract
from ..algebra.extract import report_json as extract_report
from ..algebra.reduce import parse_rank_pattern, reduce
from ..algebra.reduce import report_json as reduce_report
from ..atomic import check_output
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ._common import (
    adapter_base_option,
    echo_json,
    from_option,
    json_option,
    opened_adapters,
    overwrite_option,
    progress,
)

output_option = click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(),
    help="Output adapter: a directory, or a single file if it ends in .safetensors.",
)
weights_option = click.option(
    "-w",
    "--weight",
    "weights",
    type=float,
    multiple=True,
    help="Weight of each adapter, in order (repeat once per adapter; default 1).",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default=None,
    help="Dtype of the output's A/B tensors (default: the inputs').",
)


def _save(adapter: Adapter, out: str, overwrite: bool) -> None:
    adapter.save(out, overwrite=overwrite)


def _wrote(out: str, adapter: Adapter, as_json: bool = False) -> None:
    if as_json:
        echo_json({
            "output": out,
            "layers": [{"path": s.path, "rank": s.rank, "alpha": s.alpha}
                       for s in adapter.specs.values()],
            "replacements": list(adapter.replacement_names),
        })
        return
    layers = len(adapter.layer_paths)
    extra = (
        f", {len(adapter.replacement_names)} replacement(s)" if adapter.replacement_names else ""
    )
    click.echo(f"wrote {out} ({layers} layer(s){extra})")


def _print_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """A plain table: columns are (key, header, format spec)."""
    if not rows:
        return
    width = max(len(str(row["path"])) for row in rows)
    click.echo("  ".join([f"{'layer':<{width}}"] + [f"{h:>10}" for _, h, _ in columns]))
    for row in rows:
        cells = [f"{row['path']:<{width}}"] + [f"{row[k]:>10{spec}}" for k, _, spec in columns]
        click.echo("  ".join(cells))


def _report_layers(
    out: str,
    result: Adapter,
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str, str]],
    as_json: bool,
    **json_fields: Any,
) -> None:
    """With --json, ``{"output": out, **json_fields, "layers": rows}``; else the per-layer table
    and the "wrote" line."""
    if as_json:
        echo_json({"output": out, **json_fields, "layers": rows})
        return
    _print_rows(rows, columns)
    _wrote(out, result)


@click.command("stack")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@weights_option
@output_option
@dtype_option
@from_option
@adapter_base_option
@overwrite_option
@json_option
def stack_command(
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    out: str,
    dtype: str | None,
    overwrite: bool,
    from_: str | None,
    base: str | None,
    as_json: bool = False,
) -> None:
    """Stack ADAPTERS into one whose ΔW is exactly Σ wᵢ·ΔWᵢ (ranks are concatenated).

    Layers present in only some inputs are kept. The output has scale 1 on every layer.
    """
    check_output(out, overwrite)
    with opened_adapters(adapters, from_, base) as loaded, progress("stack") as update:
        result = ops.stack(loaded, list(weights) or None, dtype=dtype, progress=update)
        _save(result, out, overwrite)
    _wrote(out, result, as_json)


@click.command("subtract")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@output_option
@dtype_option
@from_option
@adapter_base_option
@overwrite_option
@json_option
def subtract_command(
    a: str, b: str, out: str, dtype: str | None, overwrite: bool, from_: str | None,
    base: str | None, as_json: bool = False,
) -> None:
    """An adapter whose ΔW is exactly ΔW_A − ΔW_B."""
    check_output(out, overwrite)
    with opened_adapters([a, b], from_, base) as (first, second):
        result = ops.subtract(first, second, dtype=dtype)
        _save(result, out, overwrite)
    _wrote(out, result, as_json)


@click.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("adapter", type=click.Path())
@click.argument("weight", type=float)
@output_option
@dtype_option
@from_option
@adapter_base_option
@overwrite_option
@json_option
def scale_command(
    adapter: str, weight: float, out: str, dtype: str | None, overwrite: bool, from_: str | None,
    base: str | None, as_json: bool = False,
) -> None:
    """An adapter whose ΔW is WEIGHT·ΔW of ADAPTER (WEIGHT may be negative)."""
    check_output(out, overwrite)
    with opened_adapters([adapter], from_, base) as (loaded,):
        result = ops.scale(loaded, weight, dtype=dtype)
        _save(result, out, overwrite)
    _wrote(out, result, as_json)


@click.command("reduce")
@click.argument("adapter", type=click.Path())
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Keep this rank in every layer (the best rank-R approximation).",
)
@click.option(
    "--energy",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="Keep, per layer, the smallest rank with Σσ²(kept)/Σσ² ≥ ENERGY.",
)
@click.option(
    "--rank-pattern",
    default=None,
    metavar="PAT=R,...",
    help="Per-layer ranks, e.g. 'q_proj=8,v_proj=4' (glob or path suffix; first match "
    "wins); other layers use --rank/--energy, or keep their rank.",
)
@output_option
@dtype_option
@from_option
@adapter_base_option
@overwrite_option
@json_option
def reduce_command(
    adapter: str,
    rank: int | None,
    energy: float | None,
    rank_pattern: str | None,
    out: str,
    dtype: str | None,
    overwrite: bool,
    from_: str | None,
    base: str | None,
    as_json: bool,
) -> None:
    """Reduce each layer's rank by a factored SVD (the dense ΔW is never built).

    Prints per layer the kept rank and the relative Frobenius error ‖ΔW − ΔW_kept‖/‖ΔW‖.
    """
    if rank is not None and energy is not None:
        raise click.UsageError("give --rank or --energy, not both")
    if rank is None and energy is None and not rank_pattern:
        raise click.UsageError("give --rank, --energy or --rank-pattern")
    pattern = parse_rank_pattern(rank_pattern) if rank_pattern else None
    check_output(out, overwrite)
    with opened_adapters([adapter], from_, base) as (loaded,), progress("reduce") as update:
        result, report = reduce(
            loaded, rank, energy=energy, rank_pattern=pattern, dtype=dtype, progress=update
        )
        _save(result, out, overwrite)
    _report_layers(
        out,
        result,
        reduce_report(report),
        [
            ("rank_in", "rank in", "d"),
            ("rank_out", "kept", "d"),
            ("relative_error", "rel.error", ".3e"),
        ],
        as_json,
    )


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="svd",
    show_default=True,
    help="PEFT add_weighted_adapter's combination_type, with the same meaning.",
)
@weights_option
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Output rank of the svd methods (default: the largest input rank).",
)
@click.option(
    "--density",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Fraction of values kept by ties/dare/magnitude_prune.",
)
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="TIES sign election.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random masks.")
@output_option
@dtype_option
@from_option
@adapter_base_option
@overwrite_option
@json_option
def combine_command(
    adapters: tuple[str, ...],
    method: str,
    weights: tuple[float, ...],
    rank: int | None,
    density: float | None,
    majority_sign: str,
    seed: int,
    out: str,
    dtype: str | None,
    overwrite: bool,
    from_: str | None,
    base: str | None,
    as_json: bool,
) -> None:
    """Combine ADAPTERS like PEFT's add_weighted_adapter.

    svd and cat are exact (svd up to the truncation error it reports); linear, ties, dare_* and
    magnitude_prune combine A and B separately as PEFT does, which adds cross terms: the report
    gives each layer's relative deviation from the exact Σ wᵢ·ΔWᵢ.
    """
    check_output(out, overwrite)
    with opened_adapters(adapters, from_, base) as loaded, progress("combine") as update:
        result, report = combine(
            loaded,
            list(weights) or None,
            method,
            rank=rank,
            density=density,
            majority_sign=majority_sign,
            seed=seed,
            dtype=dtype,
            progress=update,
        )
        _save(result, out, overwrite)
    _report_layers(
        out,
        result,
        combine_report(report),
        [
            ("inputs", "inputs", "d"),
            ("rank_out", "rank", "d"),
            ("relative_error", "rel.error", ".3e"),
        ],
        as_json,
        method=method,
    )


@click.command("extract")
@click.argument("finetuned", type=click.Path())
@click.argument("base", type=click.Path())
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Rank of every layer.")
@click.option(
    "--energy",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="Per layer, the smallest rank keeping this fraction of ‖ΔW‖²_F.",
)
@click.option(
    "--arch",
    "architecture",
    default=None,
    help="Architecture plugin to use (default: detected from the base).",
)
@click.option(
    "--full-embeddings",
    is_flag=True,
    help="Store changed embedding tables as full replacements instead of low rank.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--power-iterations", type=click.IntRange(min=0), default=2, show_default=True)
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Precision of ΔW and the SVD.",
)
@output_option
@dtype_option
@overwrite_option
@json_option
def extract_command(
    finetuned: str,
    base: str,
    rank: int | None,
    energy: float | None,
    architecture: str | None,
    full_embeddings: bool,
    seed: int,
    oversample: int,
    power_iterations: int,
    compute_dtype: str,
    out: str,
    dtype: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Extract an adapter from FINETUNED − BASE (two checkpoints of the same model).

    Dense layers become low-rank LoRA layers (randomized SVD); other changed tensors (norms,
    biases) become full replacements; unchanged tensors are skipped.
    """
    if (rank is None) == (energy is None):
        raise click.UsageError("give exactly one of --rank or --energy")
    check_output(out, overwrite)
    with progress("extract") as update:
        try:
            result, report = extract(
                finetuned,
                base,
                rank,
                energy=energy,
                architecture=architecture,
                full_embeddings=full_embeddings,
                seed=seed,
                oversample=oversample,
                power_iterations=power_iterations,
                compute_dtype=compute_dtype,
                dtype=dtype,
                progress=update,
            )
        except MemoryError:
            raise LoraformatError(finetuned, "out of memory while forming a layer's ΔW") from None
    _save(result, out, overwrite)
    rows = extract_report(report)
    if as_json:
        echo_json({"output": out, "fingerprint": result.fingerprint, "tensors": rows})
        return
    changed = [row for row in rows if row["action"] != "unchanged"]
    lora = [row for row in changed if row["action"] == "lora"]
    _print_rows(lora, [("rank", "rank", "d"), ("relative_error", "rel.error", ".3e")])
    for row in changed:
        if row["action"] == "replacement":
            click.echo(f"{row['path']}: full replacement")
    _wrote(out, result)
