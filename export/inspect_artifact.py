"""`dsv4c inspect ART [--onnx FILE]`: what a compiled artifact holds, and one variant's graph as ONNX.

`describe(artifact)` returns plain text lines: versions, model, numerics, targets, the W4A4 MoE's accuracy record
(`--moe w4a4`), then per variant the op counts (top ops, dsv4c fused ops), the pass log (each pass's matches and
node counts before -> after), the memory plan's peak where the memory-planning pass recorded one, the state
(bytes per sequence at max_seq_len, each packed cache's row layout, the bytes a token of context adds per
compressed layer kind, the fixed rings), given a memory budget the capacity table (per context: the state of one
sequence and how many sequences fit beside the weights and the step activations; runtime/capacity.py), and the
kernel table (a line a kernel). It reads only the manifest and the plans (no weights).

`export_onnx(artifact, variant, path)` writes the variant's optimised graph as an ONNX model (see
compiler/onnx_export.py for what it holds: the weights stay in the artifact and are graph inputs), checked
with `onnx.checker.check_model(full_check=True)` before the file is written.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Iterable

from dsv4c.runtime import capacity
from dsv4c.runtime.artifact import Artifact, ArtifactError, decode_state
from dsv4c.runtime.capacity import MemoryBudget, StateLayout
from dsv4c.runtime.plan import Plan

from dsv4c.model.config import ConfigError, ModelConfig

TOP_OPS = 8
REPORT_BATCHES = ("1", "8", "64")


def describe(artifact: Artifact, budget: MemoryBudget | None = None) -> list[str]:
    """The artifact's summary, one line a string (no trailing newlines); with a `budget`, the capacity table."""
    manifest = artifact.manifest
    lines = [f"artifact {artifact.path}", f"  versions: {_pairs(manifest.get('versions', {}))}",
             f"  model: {_model(manifest.get('config', {}))}",
             f"  numerics: {_pairs(manifest.get('numerics', {}))}",
             f"  targets: {', '.join(manifest.get('targets', [])) or 'none'}",
             *_moe_accuracy(manifest.get("moe_accuracy")),
             f"  variants: {', '.join(artifact.plans)}"]
    logs = {entry.get("variant"): entry for entry in manifest.get("pass_log", []) if isinstance(entry, dict)}
    for name, plan in artifact.plans.items():
        lines.append("")
        lines.extend(_variant(name, plan, logs.get(name)))
    lines.append("")
    lines.extend(_state(manifest, artifact.plans, budget))
    lines.append("")
    lines.extend(_kernels(manifest.get("kernels", {})))
    return lines


def export_onnx(artifact: Artifact, variant: str, path: str | os.PathLike) -> None:
    """Write `variant`'s graph to `path` as ONNX after the checker's full check (shape inference
    included) accepts it; a partial file is never left at `path`."""
    import onnx  # optional dependency (dsv4c[onnx]); describe() works without it

    from dsv4c.export.onnx_export import plan_to_onnx

    if variant not in artifact.plans:
        raise KeyError(f"artifact {artifact.path}: no variant {variant!r}; it has {', '.join(artifact.plans)}")
    plan = artifact.plans[variant]
    constants = {key: artifact.weights[key] for key in set(plan.constants.values())}
    model = plan_to_onnx(plan, constants, name=f"dsv4c_{variant}",
                         metadata={"dsv4c.variant": variant, "dsv4c.artifact": str(artifact.path)})
    onnx.checker.check_model(model, full_check=True)
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        onnx.save_model(model, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _variant(name: str, plan: Plan, log: dict[str, Any] | None) -> list[str]:
    counts = collections.Counter(op.op for op in plan.ops)
    fused = {op: n for op, n in counts.items() if op.startswith("dsv4c::")}
    lines = [f"variant {name}: {len(plan.ops)} ops, {sum(fused.values())} dsv4c ops, {len(plan.inputs)} inputs "
             f"({_batch_inputs(plan)} batched), {len(plan.outputs)} outputs, {len(plan.constants)} constants",
             f"  top ops: {_counts(counts.most_common(TOP_OPS))}",
             f"  dsv4c ops: {_counts(sorted(fused.items())) or 'none'}"]
    if log is None:
        return lines + ["  passes: not recorded"]
    records = [r for r in log.get("passes", []) if isinstance(r, dict)]
    seconds = log.get("capture_s")
    span = f"{records[0].get('nodes_before')} -> {records[-1].get('nodes_after')} nodes" if records else "none run"
    served = f"pipeline {log['pipeline']} serving {', '.join(log.get('serves', []))}; " if "pipeline" in log else ""
    lines.append(f"  passes ({served}{span}" + (f"; capture {seconds:.1f} s):" if seconds is not None else "):"))
    width = max((len(str(r.get("name", ""))) for r in records), default=0)
    lines.extend(_pass_line(r, width) for r in records)
    lines.extend(_memory_plan(r) for r in records if "peak" in (r.get("details") or {}))
    return lines


def _pass_line(record: dict[str, Any], width: int) -> str:
    description = str(record.get("description", ""))
    if len(description) > 72:
        description = description[:71] + "…"
    return (f"    {str(record.get('name', '?')):<{width}}  {record.get('matches', '?'):>5} matches  "
            f"{record.get('nodes_before', '?'):>6} -> {record.get('nodes_after', '?'):<6} nodes "
            f"{float(record.get('wall_s', 0.0)):6.2f} s  {description}")


def _memory_plan(record: dict[str, Any]) -> str:
    details = record["details"]
    at = details.get("bytes_at") or {}
    sizes = ", ".join(f"B={b}: {_bytes(at[b])}" for b in sorted(at, key=int)) if isinstance(at, dict) else ""
    slots = f", {details['slots']} slots" if "slots" in details else ""
    no_reuse = f" (without reuse {details['no_reuse']})" if "no_reuse" in details else ""
    return f"  memory plan: peak {details['peak']} bytes{no_reuse}{slots}" + (f"; {sizes}" if sizes else "")


def _moe_accuracy(record: Any) -> list[str]:
    """The `--moe w4a4` accuracy record (compiler/moe_accuracy.py) as one line; none without one."""
    if not isinstance(record, dict):
        return []
    against = record.get("against", "?")
    if "not_measured" in record:
        return [f"  moe accuracy against {against}: not measured ({record['not_measured']})"]
    return [f"  moe accuracy against {against}: top-1 agreement {record.get('top1_agreement')}, mean KL "
            f"{record.get('mean_kl')} nats over {record.get('tokens')} tokens of {record.get('text')}"]


def _state(manifest: dict[str, Any], plans: dict[str, Plan], budget: MemoryBudget | None) -> list[str]:
    """The state block: bytes per sequence, each cache stored packed with its row layout (the kv_compression
    record), the bytes a token of context adds per compressed layer kind, the fixed rings; then, with a budget,
    the capacity table."""
    try:
        specs = decode_state(manifest)
        cfg = ModelConfig.from_dict(manifest.get("config", {}))
        max_seq_len = int(manifest["max_seq_len"])
    except (ArtifactError, ConfigError, KeyError, TypeError, ValueError) as error:
        return [f"state: not readable ({error})"]
    layout = capacity.state_layout(specs, cfg)
    lines = [f"state: {_bytes(layout.bytes_per_sequence(max_seq_len))} per sequence at max_seq_len "
             f"{max_seq_len:,}, {len(specs)} tensors"]
    layouts = _cache_layouts(manifest)
    width = max((len(name) for name in layouts), default=0)
    lines.extend(f"  {name:<{width}}  {list(specs[name].shape)} {str(specs[name].dtype).removeprefix('torch.')}: "
                 f"{layout}" for name, layout in layouts.items() if name in specs)
    kinds = "; ".join(f"{k.name} {k.bytes_per_token():.1f} B ({k.layers} layer{'s' * (k.layers != 1)}, "
                      f"{k.bytes_per_token() / k.layers:.1f} B each)" for k in layout.kinds)
    lines.append(f"  context bytes per token: {kinds}; {layout.bytes_per_token():.1f} B in all" if kinds
                 else "  context bytes per token: none (window-only model)")
    lines.append(f"  fixed: {_bytes(layout.fixed)} a sequence (window and compressor rings, whatever the context)")
    if budget is not None:
        lines.extend(_capacity(manifest, plans, cfg, layout, budget))
    return lines


def _capacity(manifest: dict[str, Any], plans: dict[str, Plan], cfg: ModelConfig, layout: StateLayout,
              budget: MemoryBudget) -> list[str]:
    """Per context: one sequence's state and how many sequences fit in the budget after the weights, beside the
    pool's prefill row and the activation peaks of the per-token variants (and of the prefill variants at one
    sequence)."""
    weights = capacity.weight_bytes(plans)
    variants = [name for name in plans if name in capacity.PER_TOKEN_VARIANTS]
    prefill = [name for name in plans if name in capacity.prefill_variants(int(manifest["prefill_chunk"]))]
    max_seq_len = int(manifest["max_seq_len"])
    contexts = capacity.report_contexts(max_seq_len, cfg.max_position_embeddings)
    rows = capacity.capacity_rows(layout, manifest, variants, budget.bytes - weights, contexts, prefill)
    lines = [f"capacity in {_bytes(budget.bytes)} ({budget.source}) after {_bytes(weights)} of weights and one "
             f"sequence's prefill row, with the step activations of {', '.join(variants) or 'no variant'}:",
             f"  {'context':>9}  {'state a sequence':>16}  {'sequences':>9}"]
    for row in rows:
        note = "  this artifact (a pool row holds max_seq_len positions)" if row.context == max_seq_len else ""
        lines.append(f"  {row.context:>9,}  {_bytes(row.state_per_sequence):>16}  {row.sequences:>9,}{note}")
    if len(rows) > 1:
        lines.append("  (the other contexts: an artifact compiled with --max-seq-len CONTEXT)")
    return lines


def _cache_layouts(manifest: dict[str, Any]) -> dict[str, str]:
    """State name -> packed row layout, as the first variant's kv_compression record gives it (empty if none)."""
    for entry in manifest.get("pass_log", []):
        for record in entry.get("passes", []) if isinstance(entry, dict) else []:
            layouts = (record.get("details") or {}).get("layouts") if isinstance(record, dict) else None
            if record.get("name") == "kv_compression" and isinstance(layouts, dict):
                return {str(k): str(v) for k, v in layouts.items()}
    return {}


def _kernels(kernels: Any) -> list[str]:
    if not kernels:
        return ["kernels: none recorded (ops run through their PyTorch reference implementations)"]
    lines = ["kernels:"]
    for target, table in sorted(kernels.items()):
        if isinstance(table, dict) and table:
            width = max(len(str(k)) for k in table)
            lines.extend(f"  {target:<8} {str(op):<{width}}  {_compact(info)}" for op, info in sorted(table.items()))
        elif isinstance(table, list) and table:
            width = max(len(str(entry.get("name", "?"))) if isinstance(entry, dict) else 0 for entry in table)
            lines.extend(_kernel_line(target, entry, width) for entry in table)
        else:
            lines.append(f"  {target:<8} {_compact(table)}")
    return lines


def _kernel_line(target: str, entry: Any, width: int) -> str:
    """A built kernel: its name, target and the launches (op at N tokens) that run it. Its full metadata
    stays in the manifest and kernels/<target>/<name>.json (`dsv4c inspect --json`)."""
    if not isinstance(entry, dict):
        return f"  {target:<8} {_compact(entry)}"
    uses = [use for use in entry.get("uses", []) if isinstance(use, dict)]
    tokens_of: dict[str, list[str]] = {}
    for use in uses:
        tokens_of.setdefault(str(use.get("op", "?")), []).append(str(use.get("tokens", "?")))
    launches = "; ".join(f"{op} N={','.join(tokens)}" for op, tokens in tokens_of.items())
    count = f"{len(uses)} launch" + ("" if len(uses) == 1 else "es")
    return f"  {target:<8} {str(entry.get('name', '?')):<{width}}  {count}: {launches}"


def _model(config: dict[str, Any]) -> str:
    try:
        cfg = ModelConfig.from_dict(config)
    except (ConfigError, TypeError, ValueError) as error:
        return f"config not readable ({error})"
    layers = f"{cfg.num_hidden_layers} layer" + ("s" if cfg.num_hidden_layers != 1 else "")
    return (f"{cfg.layer_pattern()}, hidden {cfg.hidden_size}, {layers}, "
            f"{cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}")


def _batch_inputs(plan: Plan) -> int:
    return sum(1 for spec in plan.inputs if "B" in spec.shape)


def _counts(items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {count}" for name, count in items)


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "none"


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def _bytes(count: Any) -> str:
    try:
        value = float(count)
    except (TypeError, ValueError):
        return str(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)
