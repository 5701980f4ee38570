"""One step variant compiled (capture -> the target's passes -> plan), and the variants of a compile spread over
worker processes.

A variant's compile needs the checkpoint's tensor shapes and dtypes only (capture traces shapes; no pass reads a
weight's values), so a worker (`python -m dsv4c.compiler.variant_compile`, a fresh interpreter running one torch
thread) opens the checkpoint's headers itself and receives only a JSON request on stdin: the checkpoint's path,
the options, the variant and a folder. It writes its result there the way the artifact stores it: the plan as
JSON (`Plan.to_json`), the constants its graph created as safetensors, the pass-log record as JSON; the parent
reads them with the same readers, so a compile with N jobs writes the artifact a single job writes
(tests/test_parallel_compile.py), and nothing crosses between processes but JSON and safetensors.

A worker that refuses its input (the checkpoint, a config field, the options: compiler/input_errors.py, what the
CLI reports in one line) says why on stdout as JSON and exits with status 2; the parent raises `VariantError` (a ValueError) naming
the variant, so `dsv4c compile --jobs N` reports it as a one-job compile does. Any other failure is a bug: the
parent raises RuntimeError with the tail of the worker's traceback.

Capture with torch.export dominates a compile (ten variants with three drafts), and variants are independent: N
jobs divide that time by up to N, less a worker's start (an interpreter importing torch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from dsv4c.compiler.capture import CapturedStep, StepVariant, capture
from dsv4c.compiler.compile_options import CompileOptions
from dsv4c.compiler.input_errors import INPUT_ERRORS, one_line
from dsv4c.compiler.lowering import graph_constants, plan_from_graph
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.model.config import ModelConfig
from dsv4c.model.step import CacheRounding, cache_roundings
from dsv4c.passes.manager import PassContext, dump_enabled
from dsv4c.passes.pipeline import optimise
from dsv4c.runtime.artifact_io import saveable
from dsv4c.runtime.plan import Plan

Progress = Callable[[str], None]
REFUSED = 2  # a worker's exit status when it refused its input (its stdout: {"error": message})


class VariantError(ValueError):
    """A variant's worker refused its input; the message names the variant and says why."""


@dataclasses.dataclass
class CompiledVariant:
    """A variant's plan, the constants its plan reads (names unique to the variant) and its pass-log record."""

    plan: Plan
    constants: dict[str, torch.Tensor]
    log: dict[str, Any]


def weight_shapes(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors: the shapes and dtypes capture traces, no data read."""
    return {name: torch.empty(h.shape, dtype=h.dtype, device="meta") for name, h in ckpt.headers.items()}


def compile_variant(cfg: ModelConfig, options: CompileOptions, weights: Mapping[str, torch.Tensor],
                    variant: StepVariant, pipeline_name: str, served: tuple[str, ...]) -> CompiledVariant:
    """Capture `variant` on `weights` (their shapes and dtypes), run the first target's pass pipeline on it and
    lower it to a plan whose constants are named `<variant>__<buffer>`."""
    started = time.perf_counter()
    step = capture(cfg, options.numerics, weights, variant, options.max_seq_len)
    capture_s = time.perf_counter() - started
    nodes_captured = len(step.graph_module.graph.nodes)  # the passes rewrite the graph in place
    gm, records = optimise(step.graph_module, options.targets[0], pass_context(step, options, cfg))
    _namespace_constants(gm, variant.name)
    plan = plan_from_graph(gm, step.input_names, step.output_names)
    log = {"variant": variant.name, "pipeline": pipeline_name, "serves": list(served), "capture_s": round(capture_s, 3),
           "nodes_captured": nodes_captured, "passes": [r.to_json() for r in records]}
    return CompiledVariant(plan, graph_constants(gm, plan), log)


def progress_messages(options: CompileOptions) -> int:
    """How many progress messages `compile_variants` sends for `options`: one a variant, and a first one when
    workers compile them."""
    variants = len(options.variants())
    return variants + (1 if min(options.jobs, variants) > 1 else 0)


def compile_variants(ckpt: Checkpoint, options: CompileOptions, pipeline_name: str, served: tuple[str, ...],
                     progress: Progress) -> list[CompiledVariant]:
    """Every variant of `options`, in `options.variants()` order: in this process with one job, else in
    `min(options.jobs, variants)` worker processes at a time (`python -m dsv4c.compiler.variant_compile`, one a
    variant; each reports as it finishes)."""
    variants = options.variants()
    jobs = min(options.jobs, len(variants))
    if jobs <= 1:
        weights = weight_shapes(ckpt)
        out = []
        for variant in variants:
            progress(f"capturing and optimising {variant.name}")
            out.append(compile_variant(ckpt.config, options, weights, variant, pipeline_name, served))
        return out
    progress(f"capturing and optimising {len(variants)} variants in {jobs} processes")
    workers = _Workers()
    with tempfile.TemporaryDirectory(prefix="dsv4c-variants-") as scratch, ThreadPoolExecutor(jobs) as pool:
        requests = {v.name: {"checkpoint": str(ckpt.path), "options": options.to_json(),
                             "variant": dataclasses.asdict(v), "pipeline": pipeline_name, "served": list(served),
                             "folder": str(Path(scratch) / v.name)} for v in variants}
        try:
            futures = {pool.submit(workers.run, request): name for name, request in requests.items()}
            for future in as_completed(futures):
                future.result()
                progress(f"compiled {futures[future]}")
        except BaseException:  # a failed variant, or Ctrl-C: no worker outlives the compile
            pool.shutdown(wait=False, cancel_futures=True)
            workers.stop()
            raise
        return [_read_result(Path(requests[v.name]["folder"]), v.name) for v in variants]


class _Workers:
    """The running worker processes of one `compile_variants` call, so that a failure or an interrupt stops them
    all (`stop`: running ones killed, later ones never started)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopped = False

    def run(self, request: dict[str, Any]) -> None:
        """One variant compiled by a worker process; its stderr's tail is the error when it fails."""
        with self._lock:
            if self._stopped:
                return
            proc = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.variant_compile"], text=True,
                                    errors="replace", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            self._running.add(proc)
        try:
            out, err = proc.communicate(json.dumps(request))
        finally:
            with self._lock:
                self._running.discard(proc)
        if proc.returncode == 0 and dump_enabled():  # the passes' DSV4C_DUMP lines, as a one-job compile prints them
            sys.stderr.write(err)
        if proc.returncode == 0 or self._stopped:
            return
        name = StepVariant(**request["variant"]).name
        refusal = _refusal(out) if proc.returncode == REFUSED else None
        if refusal is not None:
            raise VariantError(f"variant {name}: {refusal}")
        tail = "\n".join(err.strip().splitlines()[-12:])
        raise RuntimeError(f"compiling variant {name} of {request['checkpoint']} failed "
                           f"(worker exit status {proc.returncode}):\n{tail}")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for proc in self._running:
                proc.kill()


def pass_context(step: CapturedStep, options: CompileOptions, cfg: ModelConfig) -> PassContext:
    """Debug mode checks every pass's graph against the previous one on fresh random inputs; the caches the
    model rounds are declared to kv_compression, which stores them packed in every variant alike."""
    roundings = cache_roundings(cfg, options.numerics)
    make_inputs = (lambda batch: random_inputs(step, batch, roundings)) if options.debug else None
    return PassContext(target=options.targets[0], debug=options.debug, make_inputs=make_inputs,
                       output_names=tuple(step.output_names), moe=options.moe,
                       cache_roundings=roundings)


def random_inputs(step: CapturedStep, batch: int,
                  roundings: Mapping[str, CacheRounding] | None = None) -> list[torch.Tensor]:
    """Fresh random inputs in placeholder order: weights with healthy random values (packed formats as
    random bytes, scales near 2^-6), state as written by earlier steps (score rings hold -inf where empty; a
    cache in `roundings` holds values on its rounding's grid, as the model writes them), tokens and positions
    in range."""
    out = []
    capacity = step.max_seq_len
    for name in step.input_names:
        spec = step.input_specs[name]
        shape = spec.concrete(batch)
        if name == "start":
            out.append(torch.randint(0, capacity - step.variant.tokens, shape))
        elif spec.dtype in (torch.int64, torch.int32):
            high = 8 if name.endswith("tid2eid") else 64
            out.append(torch.randint(0, high, shape, dtype=spec.dtype))
        elif spec.dtype == torch.float8_e8m0fnu:
            out.append(torch.randint(117, 124, shape, dtype=torch.uint8).view(torch.float8_e8m0fnu))
        elif spec.dtype == torch.int8:
            out.append(torch.randint(-128, 128, shape, dtype=torch.int8))
        elif spec.dtype == torch.float8_e4m3fn:  # any byte but the NaN codes 0x7f and 0xff
            magnitude = torch.randint(0, 0x7F, shape, dtype=torch.uint8)
            out.append((magnitude | (torch.randint(0, 2, shape, dtype=torch.uint8) << 7)).view(spec.dtype))
        else:
            value = (torch.randn(shape) * 0.5).to(spec.dtype)
            rounding = (roundings or {}).get(name.removeprefix("state."))
            out.append(value if rounding is None else rounding.apply(value))
    return out


def _worker_main() -> None:
    """A worker's job (a request as JSON on stdin, from `compile_variants`): compile one variant and write it to
    the request's folder as plan.json, constants.safetensors and log.json."""
    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    _exit_with_parent(os.getppid())
    try:
        ckpt = Checkpoint.open(request["checkpoint"])
        result = compile_variant(ckpt.config, CompileOptions.from_json(request["options"]), weight_shapes(ckpt),
                                 StepVariant(**request["variant"]), request["pipeline"], tuple(request["served"]))
    except INPUT_ERRORS as error:
        print(json.dumps({"error": one_line(error)}))
        sys.exit(REFUSED)
    root = Path(request["folder"])
    root.mkdir()  # in the parent's scratch folder: gone with the parent, so no worker writes after it
    (root / "plan.json").write_text(result.plan.to_json())
    (root / "log.json").write_text(json.dumps(result.log))
    save_file(saveable(result.constants), str(root / "constants.safetensors"))


def _refusal(stdout: str) -> str | None:
    """The message of a worker's refusal (its last stdout line, `{"error": message}`); None if there is none."""
    lines = stdout.strip().splitlines()
    try:
        return str(json.loads(lines[-1])["error"]) if lines else None
    except (ValueError, KeyError, TypeError):
        return None


def _exit_with_parent(parent: int) -> None:
    """End this worker when the compile that started it is gone (killed, say, where it could not stop its
    workers): a daemon thread watching the parent's process id."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _read_result(folder: Path, name: str) -> CompiledVariant:
    plan = Plan.from_json((folder / "plan.json").read_text(), source=f"variant {name}")
    return CompiledVariant(plan, load_file(str(folder / "constants.safetensors")),
                           json.loads((folder / "log.json").read_text()))


def _namespace_constants(gm: torch.fx.GraphModule, variant: str) -> None:
    """Give every graph constant a name unique to its variant, so variants share one weights store."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not node.target.startswith(f"{variant}__"):
            name = f"{variant}__{node.target.replace('.', '_')}"
            gm.register_buffer(name, getattr(gm, node.target))
            node.target = name
    gm.recompile()


if __name__ == "__main__":
    _worker_main()
