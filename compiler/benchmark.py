"""`dsv4c bench ART`: the whole decode step of a compiled artifact on a GPU, against its byte floor and baselines.

Per ../shared/docs/performance.md. One sequence's context is filled to `context` tokens (the compiled prefill
variant, then copied to every row of the state pool: each row reads the same bytes a distinct context would),
and each row then decodes its own token (`row_tokens`: distinct ids, so the rows' routing spreads over the
experts as a real batch's does, and the bytes the step reads match the floor's count of distinct experts);
then for each batch and MTP setting:
- correctness first: a few greedy steps on the compiled path, their logits against the eager reference's from
  the same state and the same token histories (compiler/token_check.py); a variant whose clear selections
  differ is reported as not matching; the rows of each batch are also compared with the same rows of the
  largest batch (batch invariance);
- the step time: median of many steps (CUDA-graph replays where the runner captured them), CUDA events;
- tok/s/user = 1000 / ms per output token (with MTP of k drafts: (1 + accepted drafts) tokens per round of one
  verify step and k MTP steps, the accepted drafts per round measured by greedy generation at that k),
  tok/s/GPU = batch x tok/s/user; the bytes the step must read (model/step_bytes.py), the bandwidth that implies,
  and measured / floor against a device-to-device copy bandwidth measured in the same run.
Baselines in the same run: `eager` (the reference model, weights dequantised to bf16 once, no graphs),
`inductor` (torch.compile of the same step, mode max-autotune) and `transformers` (its `DeepseekV4ForCausalLM`
on the same bf16 weights, its own cache filled with the same context; decode rows only, since transformers
builds no MTP module).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tokenizers import Tokenizer

from dsv4c.compiler.profile_attribution import aten_by_caller
from dsv4c.compiler.token_check import check_logits
from dsv4c.model.config import ModelConfig
from dsv4c.model.demo import DEMO_PROMPTS
from dsv4c.model.numerics import Numerics
from dsv4c.model.step import dequantize_weights
from dsv4c.model.step_bytes import step_bytes
from dsv4c.model.tokenizer import encode
from dsv4c.runtime.artifact import distribution_version, load_artifact
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine, StepRunner
from dsv4c.runtime.loader import load, load_tokenizer
from dsv4c.runtime.step_runner import BUCKETS

BASELINES = ("eager", "inductor", "transformers")
# torch.compile modes of the Inductor baseline: max-autotune (autotuned kernels, CUDA graphs) by default; its
# autotuning takes minutes at Flash size, reduce-overhead (CUDA graphs, Inductor's default kernels) does not
INDUCTOR_MODES = ("max-autotune", "reduce-overhead", "default")
TRANSFORMERS_PREFILL_CHUNK = 256
EAGER_PREFILL_CHUNK = 256  # the eager baselines fill their context in chunks this long (any length runs eagerly)
Progress = Callable[[str], None]


class BenchError(ValueError):
    """A bench request that cannot run; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    context: int = 4096
    batches: tuple[int, ...] = (1, 8, 32, 64)
    mtp: tuple[int, ...] = (0, 1)
    baselines: tuple[str, ...] = ("eager",)
    steps: int = 30
    check_steps: int = 4
    inductor_modes: tuple[str, ...] = ("max-autotune",)


@dataclasses.dataclass
class Row:
    runner: str
    batch: int
    mtp: int
    step_ms: float
    tokens_per_step: float
    floor_bytes: float
    tokens_match: bool | None
    host_ms: float = 0.0
    check: dict | None = None  # compiler/token_check.TokenCheck's fields and summary, where it ran

    @property
    def ms_per_token(self) -> float:
        return self.step_ms / self.tokens_per_step

    @property
    def tok_s_user(self) -> float:
        return 1000.0 / self.ms_per_token

    @property
    def tok_s_gpu(self) -> float:
        return self.batch * self.tok_s_user

    def bandwidth(self) -> float:
        """Bytes of the floor over the measured step time (bytes/s)."""
        return self.floor_bytes / (self.step_ms * 1e-3)

    def to_json(self, copy_bandwidth: float) -> dict:
        return {**dataclasses.asdict(self), "ms_per_token": self.ms_per_token, "tok_s_user": self.tok_s_user,
                "tok_s_gpu": self.tok_s_gpu, "bandwidth_gb_s": self.bandwidth() / 1e9,
                "floor_ms": self.floor_bytes / copy_bandwidth * 1e3,
                "measured_over_floor": self.step_ms / (self.floor_bytes / copy_bandwidth * 1e3)}


def validate(manifest: Mapping, options: BenchOptions) -> None:
    """Refuse what the artifact cannot run, one line naming the flag."""
    if max(options.batches) > BUCKETS[-1] or min(options.batches) < 1:
        raise BenchError(f"--batch: each batch must lie in 1..{BUCKETS[-1]} (the largest batch bucket)")
    capacity = manifest["max_seq_len"]
    need = options.context + options.check_steps * 2 + (options.steps + 3) * (1 + max(options.mtp)) + 2
    if need > capacity:
        raise BenchError(f"--context: {options.context} plus the timed steps needs {need} positions; the artifact "
                         f"holds {capacity} (compile with a larger --max-seq-len)")
    drafts = manifest.get("max_drafts", 1 if manifest.get("mtp") else 0)  # artifacts before the field: one
    if any(m > drafts or m < 0 for m in options.mtp):
        raise BenchError(f"--mtp: this artifact drafts at most {drafts} token(s) a step; got {max(options.mtp)}")
    unknown = set(options.baselines) - set(BASELINES)
    if unknown:
        raise BenchError(f"--baselines: unknown {sorted(unknown)}; available: {', '.join(BASELINES)}")
    modes = set(options.inductor_modes) - set(INDUCTOR_MODES)
    if modes or not options.inductor_modes:
        raise BenchError(f"--inductor-mode: unknown {sorted(modes) or 'none given'}; available: "
                         f"{', '.join(INDUCTOR_MODES)}")
    if "transformers" in options.baselines and importlib.util.find_spec("transformers") is None:
        raise BenchError("--baselines transformers: transformers is not installed (pip install transformers)")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (median of 10)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1e-3)
    return 2 * nbytes / statistics.median(times[2:])


def context_tokens(vocab_size: int, context: int, seed: int) -> torch.Tensor:
    """The bench's context: `[1, context]` random token ids in [2, vocab_size), the same for every runner."""
    return torch.randint(2, vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))


def row_tokens(vocab_size: int, rows: int, seed: int) -> torch.Tensor:
    """[rows] distinct random token ids in [2, vocab_size): the token each row decodes first after the shared
    context, the same for every runner (row r's token does not depend on how many rows there are)."""
    if rows > vocab_size - 2:
        raise BenchError(f"--batch: {rows} rows need {rows} distinct tokens; the vocabulary has {vocab_size - 2}")
    return torch.randperm(vocab_size - 2, generator=torch.Generator().manual_seed(seed + 1))[:rows] + 2


def filled_state(engine: Engine, runner: StepRunner, rows: int, context: int, seed: int,
                 chunk: int | None = None) -> dict:
    """State of `rows` sequences whose first `context` positions hold one random context (prefilled once in the
    pool's prefill row, in chunks of `chunk` tokens, by default the engine's prefill variant's, as the engine
    prefills a prompt, then copied to every row)."""
    tokens = context_tokens(engine.vocab_size, context, seed).to(engine.device)
    state = engine.new_state(rows)
    one = engine.prefill_row()
    chunk = chunk or engine.prefill_chunk
    for start in range(0, context - context % chunk, chunk):
        one = _step(runner, f"main_t{chunk}", one, tokens[:, start:start + chunk], start)[1]
    for start in range(context - context % chunk, context):
        one = _step(runner, "main_t1", one, tokens[:, start:start + 1], start)[1]
    for k, v in state.items():
        v.copy_(one[k].expand_as(v))
    return state


def timed_fill(engine: Engine, runner: StepRunner, rows: int, context: int, seed: int,
               chunk: int | None = None) -> tuple[dict, dict]:
    """`filled_state` and what its prefill took: (state, {"tokens", "chunk", "ms"}), ms on the host clock with the
    device synchronised before and after (the context's prefill in one sequence, then its copy to every row)."""
    torch.cuda.synchronize()
    begin = time.perf_counter()
    state = filled_state(engine, runner, rows, context, seed, chunk)
    torch.cuda.synchronize()
    return state, {"tokens": context, "chunk": chunk or engine.prefill_chunk,
                   "ms": (time.perf_counter() - begin) * 1e3}


def _step(runner: StepRunner, variant: str, state: dict, tokens: torch.Tensor, start: int,
          hidden: torch.Tensor | None = None) -> tuple[dict, dict]:
    inputs = {"tokens": tokens, "start": torch.full((tokens.shape[0],), start, device=tokens.device),
              **{f"state.{k}": v for k, v in state.items()}}
    if hidden is not None:
        inputs["hidden"] = hidden
    out = runner.run(variant, inputs)
    return out, {k: out[f"state.{k}"] for k in state}


def decode_logits(runner: StepRunner, state: dict, first: torch.Tensor, start: int, steps: int,
                  forced: torch.Tensor | None = None, in_place: bool = False) -> torch.Tensor:
    """The next-token logits [steps, rows, vocab] (fp32, on the CPU) of `steps` decode steps from `state`, row r
    fed first[r], then its greedy token, or with `forced` ([steps, rows]) the tokens given (another runner's
    greedy tokens: both then step through the same histories). On a copy of `state`, or with `in_place` on
    `state` itself (rows of the runner's state pool, so that the steps replay the CUDA graphs a timed step
    replays; the caller restores the pool after, padding rows included)."""
    if not in_place:
        state = {k: v.clone() for k, v in state.items()}
    token = first.view(-1, 1)
    logits = []
    for i in range(steps):
        out, state = _step(runner, "main_t1", state, token, start + i)
        logits.append(out["logits"][:, -1].float().cpu())
        token = (forced[i].to(token.device) if forced is not None else logits[-1].argmax(-1)).view(-1, 1)
    return torch.stack(logits)


def time_steps(runner: StepRunner, state: dict, first: torch.Tensor, start: int, steps: int,
               mtp: int) -> tuple[float, float]:
    """Median ms of one decode step (mtp 0) or one MTP round (mtp k: the verify step over 1 + k tokens, the MTP
    step after it, and the k - 1 MTP steps drafting on the MTP layer's own output) at the state's batch, on the
    device (CUDA events) and on the host (the runner calls until they return, before the synchronisation). Row r
    steps on first[r]."""
    token = first.view(-1, 1).expand(-1, 1 + mtp).contiguous()

    def one_step(i: int) -> None:
        nonlocal state
        out, state = _step(runner, f"main_t{1 + mtp}", state, token, start + i * (1 + mtp))
        if mtp:
            out, state = _step(runner, f"mtp_t{1 + mtp}", state, token, start + i * (1 + mtp), out["hidden"])
            for j in range(mtp - 1):
                out, state = _step(runner, "mtp_t1", state, token[:, :1], start + i * (1 + mtp) + j,
                                   out["hidden"][:, -1:])
    return timed(one_step, steps)


def timed(one_step: Callable[[int], None], steps: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of `one_step(i)` over `steps` calls after `warmup`: on the device (CUDA events around it) and
    on the host (until the call returns, before the synchronisation)."""
    times, host = [], []
    for i in range(steps + warmup):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        host_begin = time.perf_counter()
        one_step(i)
        host_ms = (time.perf_counter() - host_begin) * 1e3
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(begin.elapsed_time(end))
            host.append(host_ms)
    return statistics.median(times), statistics.median(host)


def bench(artifact: str | Path, options: BenchOptions, progress: Progress = lambda m: None) -> dict:
    """Run the sweep; returns the JSON-ready report (rows, card, versions, copy bandwidth)."""
    if not torch.cuda.is_available():
        raise BenchError("bench: needs a CUDA GPU (this torch sees none); the compiled step is timed on the GPU")
    manifest = load_artifact(artifact).manifest
    validate(manifest, options)
    device = torch.device("cuda")
    cfg = ModelConfig.from_dict(manifest["config"], "manifest config")
    bandwidth = copy_bandwidth(device)
    rows: list[Row] = []
    reference_logits: dict[int, torch.Tensor] = {}
    start, most = options.context, max(options.batches)
    first = row_tokens(cfg.vocab_size, most, seed=0).to(device)
    progress("loading the artifact and capturing CUDA graphs")
    engine = load(artifact, device, max_batch=most, progress=progress)
    accepted = _acceptance(engine, options, load_tokenizer(artifact))  # before the fill: it resets the pool
    progress(f"filling a {options.context}-token context")
    state, fill = timed_fill(engine, engine.runner, most, options.context, seed=0)
    prefill = {"dsv4c": fill}
    # every check before any timing (a timed step writes its rows' caches in place, window ring slots that a
    # later check's steps would read included), each on the pool's rows through the CUDA graphs the timing
    # replays, the pool restored after it (a bucket's padding rows included)
    filled = {k: v.clone() for k, v in state.items()}
    compiled_logits = {}
    for batch in options.batches:
        compiled_logits[batch] = decode_logits(engine.runner, engine.pool.rows(batch), first[:batch], start,
                                               options.check_steps, in_place=True)
        for k, v in state.items():
            v.copy_(filled[k])
    del filled
    compiled_tokens = {b: logits.argmax(-1) for b, logits in compiled_logits.items()}
    invariant = all(torch.equal(compiled_logits[b], compiled_logits[most][:, :b]) for b in options.batches)
    for batch in options.batches:
        rows_state = engine.pool.rows(batch)  # the pool's rows (its own views): steps replay CUDA graphs
        for mtp in options.mtp:
            progress(f"timing dsv4c at batch {batch}, mtp {mtp}")
            ms, host_ms = time_steps(engine.runner, rows_state, first[:batch], start, options.steps, mtp)
            rows.append(Row("dsv4c", batch, mtp, ms, 1.0 + accepted[mtp],
                            step_bytes(cfg, batch, options.context, bool(mtp)).total, None, host_ms))
    del engine, state, rows_state  # the pool goes before the baselines take their memory
    _release()
    if "eager" in options.baselines or "inductor" in options.baselines:
        prefill["eager"] = _baselines(artifact, manifest, cfg, options, rows, first, compiled_tokens,
                                      reference_logits, accepted, progress)
    if "transformers" in options.baselines:
        _transformers_rows(artifact, manifest, cfg, options, rows, first, compiled_tokens, reference_logits, progress)
    for row in rows:
        if row.runner == "dsv4c" and row.batch in reference_logits:
            _record_check(row, compiled_logits[row.batch], reference_logits[row.batch])
    return {"artifact": Path(artifact).name, "device": torch.cuda.get_device_name(), "versions": _versions(),
            "context": options.context,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": [r.to_json(bandwidth) for r in rows],
            "rows_equal_across_batches": invariant, "prefill": prefill,
            "tokens": {"dsv4c": {b: t.tolist() for b, t in compiled_tokens.items()}}}


def _record_check(row: Row, logits: torch.Tensor, reference: torch.Tensor) -> None:
    """The row's tokens_match and check from its runner's logits against the reference's (same histories)."""
    check = check_logits(logits, reference)
    row.tokens_match = check.passed
    row.check = {**dataclasses.asdict(check), "summary": check.summary()}


def _acceptance(engine: Engine, options: BenchOptions, tokenizer: Tokenizer | None) -> dict[int, float]:
    """Drafts accepted per verify step for each draft count in `options.mtp` (0 for 0), measured by greedy
    generation with MTP: on the demo prompts (model/demo.py) where the artifact carries a tokenizer (a trained
    model's acceptance shows on text), else on random ids (0 when no draft is accepted: random weights draft at
    random)."""
    if tokenizer is not None:
        prompts = [encode(tokenizer, text) for text in DEMO_PROMPTS]
    else:
        prompts = [[int(t) for t in torch.randint(2, engine.vocab_size, (16,),
                                                  generator=torch.Generator().manual_seed(s))]
                   for s in range(min(4, max(options.batches)))]
    rows = max(options.batches)  # the engine's pool holds this many sequences at once
    accepted = {0: 0.0}
    for k in sorted(set(options.mtp) - {0}):
        results = [engine.generate(prompts[i:i + rows], 32, mtp=k) for i in range(0, len(prompts), rows)]
        drafted = sum(r.drafted for r in results)
        accepted[k] = k * sum(r.accepted for r in results) / drafted if drafted else 0.0
    return accepted


def _baselines(artifact, manifest, cfg, options, rows, first, compiled_tokens, reference_logits, accepted,
               progress) -> dict | None:
    """The eager reference (and Inductor of it) on bf16 weights dequantised once, from the same context and row
    tokens; the eager reference's logits, fed the compiled path's greedy tokens, go to `reference_logits`.
    Returns what the eager reference's prefill of the context took (`timed_fill`), or None if neither runs."""
    num = _numerics(manifest)
    store = load_artifact(artifact).weights
    ours = [b for b in options.baselines if b in ("eager", "inductor")]
    if ours:
        progress("dequantising the weights for the eager baseline")
        weights = dequantised_weights(store, num, "cuda")
        specs = state_specs(cfg, manifest["max_seq_len"], num)
        engine = Engine(EagerRunner(weights, cfg, num, invariant=False), specs, manifest["prefill_chunk"],
                        manifest["max_seq_len"], "cuda", vocab_size=cfg.vocab_size)
        progress("filling the context for the eager baselines")  # PyTorch's own kernels, long chunks
        state, fill = timed_fill(engine, engine.runner, max(options.batches), options.context, 0,
                                 chunk=EAGER_PREFILL_CHUNK)
    runs = [(kind, mode) for kind in ours for mode in ((None,) if kind == "eager" else options.inductor_modes)]
    for kind, mode in runs:
        runner = engine.runner if kind == "eager" else _InductorRunner(weights, cfg, num, mode)
        name = inductor_runner_name(mode) if mode else kind
        for batch in options.batches:
            rows_state = {k: v[:batch] for k, v in state.items()}
            if kind == "eager":
                reference_logits[batch] = decode_logits(runner, rows_state, first[:batch], options.context,
                                                        options.check_steps, forced=compiled_tokens[batch])
            for mtp in options.mtp:
                progress(f"timing {name} at batch {batch}, mtp {mtp}")
                ms, host_ms = time_steps(runner, {k: v.clone() for k, v in rows_state.items()}, first[:batch],
                                         options.context, max(5, options.steps // 3), mtp)
                rows.append(Row(name, batch, mtp, ms, 1.0 + accepted[mtp],
                                step_bytes(cfg, batch, options.context, bool(mtp)).total, None, host_ms))
        del runner
        _release()
    if not ours:
        return None
    del weights, state, engine
    _release()
    return fill


def dequantised_weights(store, num: Numerics, keep_on: str, decode_on: str = "cuda") -> dict[str, torch.Tensor]:
    """Every checkpoint weight of the artifact's store decoded to the activation dtype on `decode_on`, a file's
    weights at a time (with their scales, wherever those are stored), and kept on `keep_on`."""
    weights = {}
    names = [n for n in store if not n.startswith("constants.") and not n.endswith(".scale")]
    for group in store.by_file(names).values():
        scales = [s for s in (n[: -len("weight")] + "scale" for n in group if n.endswith(".weight")) if s in store]
        raw = store.read(group + scales, decode_on)
        weights.update({k: v.to(keep_on) for k, v in dequantize_weights(raw, num).items()})
        del raw
    return weights


def _transformers_rows(artifact, manifest, cfg, options, rows, first, compiled_tokens, reference_logits,
                       progress) -> None:
    """transformers' `DeepseekV4ForCausalLM` on the artifact's weights dequantised to the activation dtype, on
    the GPU: per batch, its cache filled with the bench's context (chunks of `TRANSFORMERS_PREFILL_CHUNK`), its
    logits over the compiled path's token histories checked against the eager reference's (where it ran), then
    decode steps timed. No MTP rows: transformers builds no MTP module."""
    from dsv4c.compiler.transformers_model import new_cache, step_logits, transformers_model

    num = _numerics(manifest)
    progress("dequantising the weights for transformers' model")
    model = transformers_model(cfg, dequantised_weights(load_artifact(artifact).weights, num, "cpu"),
                               dtype=num.dtype, device="cuda")
    _release()
    tokens = context_tokens(cfg.vocab_size, options.context, seed=0).cuda()
    for batch in options.batches:
        progress(f"filling transformers' cache at batch {batch}")
        cache = new_cache(model)
        rows_tokens = tokens.expand(batch, -1)
        for begin in range(0, options.context, TRANSFORMERS_PREFILL_CHUNK):
            step_logits(model, rows_tokens[:, begin:begin + TRANSFORMERS_PREFILL_CHUNK], cache)
        token, logits = first[:batch].view(-1, 1), []
        for i in range(options.check_steps):
            logits.append(step_logits(model, token, cache)[:, -1].float().cpu())
            token = compiled_tokens[batch][i].to(token.device).view(-1, 1)
        progress(f"timing transformers at batch {batch}, mtp 0")
        ms, host_ms = timed(lambda _, c=cache, t=token: step_logits(model, t, c), max(5, options.steps // 3))
        row = Row("transformers", batch, 0, ms, 1.0, step_bytes(cfg, batch, options.context, False).total, None,
                  host_ms)
        if batch in reference_logits:
            _record_check(row, torch.stack(logits), reference_logits[batch])
        rows.append(row)
        del cache
        _release()


def inductor_runner_name(mode: str) -> str:
    """The report's runner name of the Inductor baseline in torch.compile `mode`: "inductor" for max-autotune."""
    return "inductor" if mode == "max-autotune" else f"inductor {mode}"


class _InductorRunner(EagerRunner):
    """The eager reference step through torch.compile (Inductor in `mode`: max-autotune and reduce-overhead run
    CUDA graphs where they can)."""

    def __init__(self, weights, cfg, num, mode: str):
        super().__init__(weights, cfg, num, invariant=False)
        self._compiled = torch.compile(super().run, mode=mode, dynamic=False)

    def run(self, variant, inputs):
        return self._compiled(variant, dict(inputs))


def _numerics(manifest: Mapping) -> Numerics:
    return Numerics(**{k: (getattr(torch, v) if k == "dtype" else v) for k, v in manifest["numerics"].items()})


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _versions() -> dict:
    return {"dsv4c": distribution_version("dsv4c"), "torch": torch.__version__,
            "triton": distribution_version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
            "driver": _driver()}


def _driver() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


REPORT_FIELDS = ("device", "context", "copy_bandwidth_gb_s", "rows")
ROW_FIELDS = ("runner", "batch", "mtp", "step_ms", "host_ms", "tok_s_user", "tok_s_gpu", "floor_bytes",
              "bandwidth_gb_s", "measured_over_floor", "tokens_match")


def read_report(path: str | Path) -> dict:
    """A report `write_json` wrote, checked for the fields the table and the plot read; BenchError naming the
    file and the field otherwise."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchError(f"--report {path}: not a readable JSON report ({error})") from None
    if not isinstance(report, dict):
        raise BenchError(f"--report {path}: not a bench report (a JSON object)")
    missing = [f for f in REPORT_FIELDS if f not in report]
    if missing or not isinstance(report["rows"], list):
        raise BenchError(f"--report {path}: not a bench report (missing {', '.join(missing) or 'a list of rows'})")
    for i, row in enumerate(report["rows"]):
        absent = [f for f in ROW_FIELDS if not isinstance(row, dict) or f not in row]
        if absent:
            raise BenchError(f"--report {path}: row {i} lacks {', '.join(absent)}")
        numbers = [f for f in ROW_FIELDS[1:-1] if not isinstance(row[f], (int, float))]
        if numbers or row["tokens_match"] not in (True, False, None):
            raise BenchError(f"--report {path}: row {i}: {', '.join(numbers) or 'tokens_match'} of the wrong type")
    return report


def plot(report: dict, path: str | Path) -> None:
    """tok/s/GPU against tok/s/user over the batch sweep, one line per runner and MTP setting (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    series: dict[tuple[str, int], list] = {}
    for row in report["rows"]:
        series.setdefault((row["runner"], row["mtp"]), []).append(row)
    for (runner, mtp), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["batch"])
        ax.plot([r["tok_s_user"] for r in rows], [r["tok_s_gpu"] for r in rows], marker="o",
                label=f"{runner}" + (f", MTP {mtp}" if mtp else ""))
        for r in rows:
            ax.annotate(str(r["batch"]), (r["tok_s_user"], r["tok_s_gpu"]), fontsize=7)
    ax.set_xlabel("tok/s/user")
    ax.set_ylabel("tok/s/GPU")
    ax.set_title(report_title(report, copy=False))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report_title(report: dict, copy: bool = True) -> str:
    """The artifact (reports before it was recorded have none), the card, the context and (`copy`) the measured
    copy bandwidth."""
    parts = (report.get("artifact"), report["device"], f"context {report['context']}",
             f"copy {report['copy_bandwidth_gb_s']:.0f} GB/s" if copy else None)
    return ", ".join(p for p in parts if p)


def table_rows(report: dict) -> list[Sequence[str]]:
    """The printed table: one row per (runner, batch, mtp)."""
    out = []
    for r in report["rows"]:
        match = {None: "-", True: "yes", False: "NO"}[r["tokens_match"]]
        out.append((r["runner"], str(r["batch"]), str(r["mtp"]), f"{r['step_ms']:.3f}", f"{r['host_ms']:.3f}",
                    f"{r['tok_s_user']:.1f}",
                    f"{r['tok_s_gpu']:.0f}", f"{r['floor_bytes'] / 1e9:.3f}", f"{r['bandwidth_gb_s']:.0f}",
                    f"{r['measured_over_floor']:.2f}", match))
    return out


def check_lines(report: dict) -> list[str]:
    """The token checks behind the table's last column (one line per checked row) and the batch-invariance
    comparison of the compiled rows, where the report has them."""
    lines = [f"{r['runner']} batch {r['batch']} mtp {r['mtp']}: {r['check']['summary']}"
             for r in report["rows"] if r.get("check")]
    if "rows_equal_across_batches" in report:
        lines.append("dsv4c rows equal the same rows of the largest batch (logits, bit for bit): "
                     + ("yes" if report["rows_equal_across_batches"] else "NO"))
    fills = [f"{runner} {fill['ms']:,.1f} ms in chunks of {fill['chunk']} ({fill['tokens'] / fill['ms'] * 1e3:,.0f} "
             "tok/s)" for runner, fill in (report.get("prefill") or {}).items() if fill]
    if fills:
        lines.append(f"prefill of the {report['context']}-token context (one sequence, copied to every row): "
                     + "; ".join(fills))
    return lines


TABLE_COLUMNS = ("runner", "batch", "mtp", "step ms", "host ms", "tok/s/user", "tok/s/GPU", "floor GB", "GB/s",
                 "measured/floor", "tokens = eager")


def profile_lines(artifact: str | Path, batch: int, top: int = 15) -> list[str]:
    """The top kernels of one decode step at `batch` (torch.profiler over graph-free steps, so each kernel is
    seen by name), then the aten ops outside the fused ops' kernels by the op or graph that called them."""
    from torch.profiler import ProfilerActivity, profile

    engine = load(artifact, "cuda", max_batch=batch, cuda_graphs=False)
    state = engine.new_state(batch)
    token = torch.ones(batch, 1, dtype=torch.long, device="cuda")
    for i in range(3):
        _, state = _step(engine.runner, "main_t1", state, token, i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, state = _step(engine.runner, "main_t1", state, token, 3)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    events.sort(key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
    lines = [f"top kernels of one graph-free decode step at batch {batch} (device us, calls):"]
    for e in events[:top]:
        lines.append(f"  {getattr(e, 'self_device_time_total', 0):10.1f}  {e.count:5d}  {e.key[:100]}")
    lines.append("aten ops of the step by caller (device us, calls; compiler/profile_attribution.py):")
    return lines + aten_by_caller(prof.events(), lambda e: getattr(e, "device_time_total", 0))
