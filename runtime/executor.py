"""Run a `Plan` op by op: the reference executor (eager PyTorch calls; kernel launches come later).

Contract: `Executor(plan, constants, device)` resolves every op name to its callable once, at load, and
fails there (naming the op) if one is unknown; `run(inputs)` checks the inputs against the plan (names,
dtypes, shapes with one consistent batch size, device), calls the ops in order and drops each buffer after
its last use, so peak memory follows the plan's free lists. The ops and their arguments are exactly the
graph's, so the outputs equal the fx graph's outputs bit for bit on the same device.

Devices: a plan is device-agnostic. Every `torch.device` argument in it (the capture device baked into
`arange`, `zeros`, `to`, ...) is replaced by the executor's device.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Callable, Mapping

import torch

from dsv4c.runtime.plan import BATCH, OPERATORS, Plan, PlanError, PlanInput, PlanOp, Ref, parse_op_name

WEIGHT_PREFIX = "weights."
# The module whose import registers a namespace's custom ops; imported only when a plan names one.
OP_MODULES: Mapping[str, str] = types.MappingProxyType({"dsv4c": "dsv4c.codegen.ops"})


class ExecutorError(RuntimeError):
    """A plan cannot be loaded or run; the message names the op, input or constant."""


def resolve_op(name: str) -> Callable[..., Any]:
    """The callable of a plan op name (`aten::add.Tensor` -> torch.ops.aten.add.Tensor)."""
    try:
        namespace, base, overload = parse_op_name(name)
    except PlanError as error:
        raise ExecutorError(str(error)) from None
    if namespace == "operator":
        return OPERATORS[base]
    if namespace in OP_MODULES:
        try:
            importlib.import_module(OP_MODULES[namespace])
        except ImportError as error:
            raise ExecutorError(f"op {name!r} is not registered: {OP_MODULES[namespace]} cannot be "
                                f"imported ({error})") from None
    try:
        return getattr(getattr(getattr(torch.ops, namespace), base), overload)
    except (AttributeError, RuntimeError):
        raise ExecutorError(f"op {name!r} is not registered in this torch ({torch.__version__})") from None


def weight_inputs(plan: Plan, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plan's `weights.<name>` inputs taken from a weights mapping keyed by `<name>`."""
    out = {}
    for spec in plan.inputs:
        if spec.name.startswith(WEIGHT_PREFIX):
            key = spec.name[len(WEIGHT_PREFIX):]
            if key not in weights:
                raise ExecutorError(f"input {spec.name!r}: weight {key!r} is missing")
            out[spec.name] = weights[key]
    return out


@dataclasses.dataclass(frozen=True)
class _Step:
    """An op ready to call: resolved callable, arguments with `Ref`s still to bind."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: tuple[str | None, ...]
    free: tuple[str, ...]
    label: str


class Executor:
    """Executes one plan on one device; holds the constants (and any bound inputs) on that device."""

    def __init__(self, plan: Plan, constants: Mapping[str, torch.Tensor], device: str | torch.device,
                 bound_inputs: Mapping[str, torch.Tensor] | None = None,
                 implementations: Mapping[str, Callable[..., Any]] | None = None):
        """`constants`: weight key -> tensor for every key in `plan.constants`. `bound_inputs`: inputs
        fixed for every run (the weights, see `weight_inputs`); they are checked and moved once.
        `implementations`: op name (`dsv4c::hc_pre`, any overload) -> the callable to run instead of the
        registered op (the runtime's CUDA implementations bound to the artifact's stored kernels)."""
        self.plan = plan
        self.device = torch.device(device)
        self._implementations = dict(implementations or {})
        self._specs = {spec.name: spec for spec in plan.inputs}
        self._steps = tuple(self._compile(index, op) for index, op in enumerate(plan.ops))
        self._constants = self._load_constants(constants)
        bound = dict(bound_inputs or {})
        self._check_inputs(bound, expected=set(bound), batch=None, device=None)
        self._bound = {name: tensor.to(self.device) for name, tensor in bound.items()}
        self._run_inputs = set(self._specs) - set(bound)

    @property
    def bound_inputs(self) -> Mapping[str, torch.Tensor]:
        """The inputs bound at load (the weights), on the executor's device; read-only."""
        return types.MappingProxyType(self._bound)

    @property
    def run_inputs(self) -> frozenset[str]:
        """The plan inputs each `run` takes (those not bound at load)."""
        return frozenset(self._run_inputs)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Output name -> value for one call of the step; `inputs` are the plan inputs not bound at load."""
        self._check_inputs(inputs, expected=self._run_inputs, batch=self._bound_batch(), device=self.device)
        env: dict[str, Any] = {**self._constants, **self._bound, **inputs}
        index = 0
        try:
            for index, step in enumerate(self._steps):
                _execute(step, env)
        except Exception as error:
            step = self._steps[index]
            raise ExecutorError(f"op {index} ({step.label}) failed: {type(error).__name__}: {error}") from error
        return {name: env[buf] for name, buf in self.plan.outputs}

    def _compile(self, index: int, op: PlanOp) -> _Step:
        label = f"{op.op} -> {', '.join(str(o) for o in op.outputs) or 'nothing'}"
        try:
            fn = resolve_op(op.op)
        except ExecutorError as error:
            raise ExecutorError(f"op {index}: {error}") from None
        fn = self._implementations.get(op.op.split(".", 1)[0], fn)
        args = tuple(self._on_device(a) for a in op.args)
        kwargs = {k: self._on_device(v) for k, v in op.kwargs.items()}
        return _Step(fn, args, kwargs, op.outputs, op.free, label)

    def _on_device(self, value: Any) -> Any:
        if isinstance(value, torch.device):
            return self.device
        if isinstance(value, list):
            return [self._on_device(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._on_device(v) for v in value)
        return value

    def _load_constants(self, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for buf, key in self.plan.constants.items():
            if key not in constants:
                raise ExecutorError(f"constant {buf!r}: tensor {key!r} is missing from the given constants")
            out[buf] = constants[key].to(self.device)
        return out

    def _bound_batch(self) -> int | None:
        for name, tensor in self._bound.items():
            batch = _batch_of(self._specs[name], tensor)
            if batch is not None:
                return batch
        return None

    def _check_inputs(self, inputs: Mapping[str, Any], expected: set[str], batch: int | None,
                      device: torch.device | None) -> None:
        """Names, dtypes and shapes as planned, one batch size, and (unless `device` is None) the device."""
        missing, unknown = expected - inputs.keys(), inputs.keys() - expected
        if missing or unknown:
            raise ExecutorError(f"inputs: missing {sorted(missing)}, unexpected {sorted(unknown)}")
        for name, value in inputs.items():
            spec = self._specs[name]
            _check_tensor(spec, value, device)
            found = _batch_of(spec, value)
            if batch is None:
                batch = found
            elif found is not None and found != batch:
                raise ExecutorError(f"input {name!r}: batch size {found}, but other inputs have {batch}")


def _execute(step: _Step, env: dict[str, Any]) -> None:
    result = step.fn(*_bind(step.args, env), **{k: _bind(v, env) for k, v in step.kwargs.items()})
    outputs = step.outputs
    if len(outputs) == 1:
        env[outputs[0]] = result
    elif outputs:
        if len(result) != len(outputs):
            raise ExecutorError(f"returned {len(result)} values for {len(outputs)} outputs")
        for name, value in zip(outputs, result):
            if name is not None:
                env[name] = value
    for name in step.free:
        del env[name]


def _bind(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return tuple(_bind(v, env) for v in value)
    if isinstance(value, list):
        return [_bind(v, env) for v in value]
    return value


def _check_tensor(spec: PlanInput, value: Any, device: torch.device | None) -> None:
    if not isinstance(value, torch.Tensor):
        raise ExecutorError(f"input {spec.name!r}: expected a tensor, got {type(value).__name__}")
    if value.dtype != spec.torch_dtype():
        raise ExecutorError(f"input {spec.name!r}: dtype {value.dtype}, plan expects {spec.dtype}")
    ok = len(value.shape) == len(spec.shape) and all(
        d == BATCH or d == s for d, s in zip(spec.shape, value.shape))
    if not ok:
        raise ExecutorError(f"input {spec.name!r}: shape {tuple(value.shape)}, plan expects {spec.shape}")
    if device is None:
        return
    if value.device.type != device.type or (device.index is not None and value.device.index != device.index):
        raise ExecutorError(f"input {spec.name!r}: on {value.device}, executor runs on {device}")


def _batch_of(spec: PlanInput, value: torch.Tensor) -> int | None:
    for dim, size in zip(spec.shape, value.shape):
        if dim == BATCH:
            return int(size)
    return None
