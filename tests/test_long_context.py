"""Long context: an artifact compiled with `--max-seq-len 1048576` (the released models' max_position_embeddings),
its state and what fits (runtime/capacity.py, the loader's pool, `dsv4c inspect`).

The compile is tiny cut to its C4 layer (with the Lightning Indexer: the layer kind whose state grows most) with
max_position_embeddings raised to 2^20, through the CLI: its two compressed caches hold 262,145 packed rows a
sequence. What must hold there:
- the state specs are the packed layouts at that length, and `StateLayout` splits them exactly (fixed rings plus
  rows per layer kind);
- no intermediate of any step grows with the cache length: every plan buffer as long as a cache is that cache's
  in-place write, and the memory plan's per-sequence peak is under one byte a cache entry;
- a decode step at the last positions (2^20 - 1) over full caches equals the eager reference model's, on the same
  state (bit-identical expected; the bound is test_faithful_artifact.py's TOL, for its reason: a wrong position,
  an overflowing index or a lost entry moves tiny's logits by far more);
- the loader gives the pool fewer rows than max_batch when the memory left does not hold them, and refuses an
  artifact of which not one sequence fits.
The Flash slice's figures come from shapes alone (no weights): the state a kv_compression artifact would hold.
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.codegen.kv_cache import PackedLayout, pack_reference, unpack_reference
from dsv4c.compiler.cli import main
from dsv4c.compiler.cli_args import memory_size
from dsv4c.export.inspect_artifact import describe
from dsv4c.export.onnx_export import trace_shapes
from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import flash_slice, tiny
from dsv4c.model.step import cache_roundings, dequantize_weights, forward
from dsv4c.runtime import capacity
from dsv4c.runtime.artifact import decode_state, load_artifact
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.capacity import MemoryBudget
from dsv4c.runtime.eager_runner import state_specs
from dsv4c.runtime.executor import resolve_op
from dsv4c.runtime.loader import load
from dsv4c.runtime.plan import PlanOp, Ref
from dsv4c.runtime.state_pool import StateSpec

MAX = 2 ** 20
CFG = tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0, max_position_embeddings=MAX)
NUM = Numerics()
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def packed_specs(cfg, max_seq_len: int, num: Numerics) -> dict[str, StateSpec]:
    """The state a kv_compression artifact holds, from shapes alone: each rounded cache as uint8 rows of its
    `PackedLayout` (passes/kv_compression.py), every other state as the model's."""
    specs = state_specs(cfg, max_seq_len, num)
    for name, r in cache_roundings(cfg, num).items():
        spec = specs[name]
        row = PackedLayout(r.format, spec.shape[-1], r.rounded, r.block, spec.dtype).row_bytes
        specs[name] = StateSpec((*spec.shape[:-1], row), torch.uint8, 0.0)
    return specs


# ---- shapes only ---------------------------------------------------------------------------------------
def test_flash_slice_state_at_1m_positions_by_layer_kind():
    """Hand counts: rows of 584 B (main KV) and 68 B (indexer keys); window rings of 128 + 2 slots in every layer;
    compressor rings in fp32 (C4: 8 + 2 slots of 2 x 512 and 2 x 128 dims, kv and score; C128: 128 + 2 of 512)."""
    cfg = flash_slice()
    layout = capacity.state_layout(packed_specs(cfg, MAX, NUM), cfg)
    c4, c128 = layout.kinds
    assert (c4.name, c4.layers, c4.row_bytes, c4.bytes_per_token()) == ("C4", 1, 584 + 68, 163.0)
    assert (c128.name, c128.layers, c128.row_bytes, c128.bytes_per_token()) == ("C128", 1, 584, 4.5625)
    windows = 5 * 130 * 584
    rings = 2 * 10 * 1024 * 4 + 2 * 10 * 256 * 4 + 2 * 130 * 512 * 4
    assert layout.fixed == windows + rings
    assert layout.bytes_per_sequence(MAX) == windows + rings + (MAX // 4 + 1) * 652 + (MAX // 128 + 1) * 584
    specs = packed_specs(cfg, MAX, NUM)
    assert layout.bytes_per_sequence(MAX) == sum(s.bytes_per_sequence() for s in specs.values())


def manifest_with_peak(coefficients: list[int]) -> dict:
    return {"pass_log": [{"variant": "main_t1", "passes": [{"name": "memory_planning",
                                                            "details": {"peak_polynomial": coefficients}}]}]}


@pytest.mark.parametrize("coefficients", [[0], [1000, 300], [5000, 10, 3]])
def test_max_sequences_is_the_largest_count_that_fits(coefficients):
    manifest = manifest_with_peak(coefficients)
    for state, free in ((1000, 0), (1000, 999), (1000, 7 * 1000 + 10**4), (4096, 10**6), (1, 12345)):
        counts = range(1, free // state + 2)
        want = max((n for n in counts if capacity.step_bytes(manifest, ["main_t1"], n, state) <= free), default=0)
        assert capacity.max_sequences(manifest, ["main_t1"], state, free) == want


def test_report_contexts_stop_at_the_models_limit():
    assert capacity.report_contexts(MAX, MAX) == (4096, 65536, 262144, MAX)
    assert capacity.report_contexts(5000, 2 ** 17) == (4096, 5000, 65536)


@pytest.mark.parametrize("text,value", [("80GiB", 80 * 2 ** 30), ("512 MiB", 512 * 2 ** 20), ("2TB", 2 * 10 ** 12),
                                        ("1000", 1000), ("1.5GiB", 3 * 2 ** 29)])
def test_memory_sizes(text, value):
    assert memory_size(text) == value


def test_compile_refuses_a_max_seq_len_beyond_the_model_in_one_line(tmp_path, capsys):
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0), max_position_embeddings=64)
    ckpt = write_synthetic(cfg, tmp_path / "ckpt", seed=1)
    code = main(["compile", str(ckpt), "-o", str(tmp_path / "art"), "--max-seq-len", "65", "--prefill-chunk", "2",
                 "--no-mtp"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--max-seq-len 65" in lines[0] and "64" in lines[0], lines
    assert not (tmp_path / "art").exists()


# ---- an artifact of 2^20 positions -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic(CFG, tmp_path_factory.mktemp("long") / "ckpt", seed=5)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "art"
    assert main(["compile", str(checkpoint), "-o", str(out), "--max-seq-len", str(MAX), "--prefill-chunk", "2",
                 "--no-mtp"]) == 0
    return load_artifact(out)


def test_state_is_the_packed_layouts_at_1m(artifact):
    specs = decode_state(artifact.manifest)
    assert specs == packed_specs(CFG, MAX, NUM)
    assert specs["layers.0.compressed_kv"].shape == (MAX // 4 + 1, 130)
    assert specs["layers.0.indexer_kv"].shape == (MAX // 4 + 1, 34)
    layout = capacity.state_layout(specs, CFG)
    assert [(k.name, k.layers, k.bytes_per_token()) for k in layout.kinds] == [("C4", 1, (130 + 34) / 4)]
    assert layout.bytes_per_sequence(MAX) == sum(s.bytes_per_sequence() for s in specs.values())


def written_in_place(op: PlanOp, output: int) -> str | None:
    """The buffer an in-place op writes and returns as its output `output` (schema alias `a!`), or None."""
    returned = resolve_op(op.op)._schema.returns[output].alias_info
    if returned is None or not returned.is_write:
        return None
    for argument, value in zip(resolve_op(op.op)._schema.arguments, op.args):
        if argument.alias_info is not None and argument.alias_info.before_set == returned.before_set:
            return value.name if isinstance(value, Ref) else None
    return None


def test_no_intermediate_grows_with_the_cache(artifact):
    """Every buffer as long as a cache (262,145 rows) is a cache written in place in its state input."""
    entries = MAX // 4 + 1
    for name, plan in artifact.plans.items():
        constants = {key: artifact.weights[key] for key in set(plan.constants.values())}
        values = trace_shapes(plan, constants)
        state = set(plan.input_names)  # and, below, what writes them in place
        for op in plan.ops:
            for i, out in enumerate(op.outputs):
                if out and any(isinstance(d, int) and d >= entries for d in values[out].dims):
                    assert written_in_place(op, i) in state, f"{name}: {op.op} -> {out} {values[out].dims}"
                    state.add(out)
        per_sequence = capacity.activation_bytes(artifact.manifest, name, 2) - capacity.activation_bytes(
            artifact.manifest, name, 1)
        assert 0 < per_sequence < entries, name


def random_state(gen: torch.Generator) -> tuple[dict, dict]:
    """(the artifact's state, the eager model's) for two sequences: each cache full of random rows, packed where the
    artifact stores it packed (the eager model reads the same values unpacked); random fp32 compressor rings."""
    roundings = cache_roundings(CFG, NUM)
    packed, eager = {}, {}
    for name, spec in state_specs(CFG, MAX, NUM).items():
        value = torch.randn((2, *spec.shape), generator=gen).to(spec.dtype)
        packed[name] = eager[name] = value
        if name in roundings:
            packed[name] = pack_reference(value, roundings[name].format, roundings[name].rounded, roundings[name].block)
            eager[name] = unpack(packed[name], name)
    return packed, eager


def unpack(rows: torch.Tensor, name: str) -> torch.Tensor:
    r = cache_roundings(CFG, NUM)[name]
    width = state_specs(CFG, MAX, NUM)[name].shape[-1]
    return unpack_reference(rows, r.format, width, r.rounded, r.block, NUM.dtype)


def test_a_decode_step_at_the_last_positions_equals_eager(artifact, checkpoint):
    """Starts 2^20 - 1 (the last position: it completes entry 262,143) and 2^20 - 6 (it writes the spill row), over
    caches full of random entries: the logits, and each cache's last entry and spill row hold eager's values while
    every other row keeps its bytes."""
    gen = torch.Generator().manual_seed(11)
    packed, state = random_state(gen)
    assert {k: (v.shape[1:], v.dtype) for k, v in packed.items()} == {
        k: (s.shape, s.dtype) for k, s in decode_state(artifact.manifest).items()}
    tokens, start = torch.randint(0, CFG.vocab_size, (2, 1), generator=gen), torch.tensor([MAX - 1, MAX - 6])
    engine = load(artifact.path, max_batch=2)
    out = engine.runner.run("main_t1", {"tokens": tokens, "start": start,  # clones: the step writes in place
                                        **{f"state.{k}": v.clone() for k, v in packed.items()}})
    ckpt = Checkpoint.open(checkpoint)
    weights = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, NUM)
    with batch_invariant():  # as the runtime runs every step
        logits, _, new_state = forward(weights, state, tokens, start, CFG, NUM)
    assert rel_err(out["logits"].float(), logits.float()) <= TOL
    for name in ("layers.0.compressed_kv", "layers.0.indexer_kv"):
        got, last = out[f"state.{name}"], MAX // 4 - 1
        assert torch.equal(got[:, :last], packed[name][:, :last]), name
        assert torch.equal(unpack(got[:, last:], name), new_state[name][:, last:]), name
        assert not torch.equal(new_state[name][0, last], state[name][0, last]) and not new_state[name][1, -1].any()


def test_the_loader_gives_the_pool_the_rows_that_fit(artifact, capsys):
    """Room for 3.5 sequences and their activations: max_batch 8 gets the bucket of 2 rows, and says so; room for
    less than one refuses the artifact, naming the flag that makes it smaller."""
    manifest = artifact.manifest
    state = sum(s.bytes_per_sequence() for s in decode_state(manifest).values())
    variants = [v for v in artifact.plans if v in capacity.PER_TOKEN_VARIANTS]
    room = capacity.step_bytes(manifest, variants, 3, state) + state // 2
    engine = load(artifact.path, max_batch=8, free_bytes=room)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert engine.pool.capacity == 2 and "2 sequences, not max_batch 8" in line and "3 fit" in line, line
    assert load(artifact.path, max_batch=2, free_bytes=room).pool.capacity == 2
    with pytest.raises(ValueError, match="--max-seq-len"):
        load(artifact.path, max_batch=1, free_bytes=state - 1)


def test_inspect_states_the_capacity_per_context(artifact, capsys):
    """A budget of the weights plus three sequences of 2^20 positions and their activations: the artifact's row says
    3, every row is `max_sequences` of what the weights leave, and the CLI prints the table for `--memory`."""
    manifest, variants = artifact.manifest, ["main_t1", "main_t2"]
    layout = capacity.state_layout(decode_state(manifest), CFG)
    weights = capacity.weight_bytes(artifact.plans)
    assert weights == sum(t.numel() * t.element_size() for name, t in artifact.weights.items()
                          if any(f"weights.{name}" in plan.input_names for plan in artifact.plans.values()))
    free = capacity.step_bytes(manifest, variants, 3, layout.bytes_per_sequence(MAX))
    text = "\n".join(describe(artifact, MemoryBudget(weights + free, "a test")))
    assert "state: 41.0 MiB per sequence at max_seq_len 1,048,576" in text
    assert "context bytes per token: C4 41.0 B (1 layer, 41.0 B each); 41.0 B in all" in text
    table = {int(line.split()[0].replace(",", "")): line for line in text.splitlines()
             if line.startswith("  ") and line.split()[0].replace(",", "").isdigit()}
    assert sorted(table) == [4096, 65536, 262144, MAX]
    assert table[MAX].split()[3] == "3" and "this artifact" in table[MAX]
    for context in (4096, 65536, 262144):
        n = capacity.max_sequences(manifest, variants, layout.bytes_per_sequence(context), free)
        assert table[context].split()[-1] == f"{n:,}" and n > 3, table[context]
    assert main(["inspect", str(artifact.path), "--memory", "80GiB"]) == 0
    assert "capacity in 80.0 GiB (--memory)" in capsys.readouterr().out
