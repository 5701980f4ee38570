"""ONNX bodies of the ops the fp8_linear passes leave in a graph: `dsv4c::fp8_linear` and `dsv4c::fp8_grouped_linear`
(hand-written, generic) and `dsv4c::fake_quant_fp8` (traced from its reference), run by onnx's ReferenceEvaluator
against the plan executor.

With an identity weight the product adds only exact zeros to each rounded value, so the rounding is compared bit
for bit; with a random weight numpy sums in another order than torch: relative norm error <= 1e-6 (fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install dsv4c[onnx])")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="feeding fp8 to onnx.reference needs ml_dtypes")
from onnx.reference import ReferenceEvaluator  # noqa: E402

from dsv4c.export.onnx_export import plan_to_onnx  # noqa: E402
from dsv4c.model import quant  # noqa: E402
from dsv4c.runtime.executor import Executor  # noqa: E402
from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref  # noqa: E402

NUMPY_VIEWS = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e8m0fnu: "float8_e8m0fnu"}
FP32_TOLERANCE = 1e-6


def onnx_and_executor(op: str, args: tuple, specs: dict[str, tuple], inputs: dict[str, torch.Tensor]):
    """(ONNX output, executor output) of a one-op plan; the model passes the full check with no opaque op."""
    plan = Plan(tuple(PlanInput(n, shape, dtype) for n, (shape, dtype) in specs.items()), {},
                (PlanOp(op, args, {}, ("y",)),), (("y", "y"),))
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["dsv4c.opaque_ops"] == ""
    assert [f.name for f in model.functions] == [op.split("::")[1].split(".")[0]]
    feeds = {n: t.contiguous().view(torch.uint8).numpy().view(getattr(ml_dtypes, NUMPY_VIEWS[t.dtype]))
             if t.dtype in NUMPY_VIEWS else t.numpy() for n, t in inputs.items()}
    (got,) = ReferenceEvaluator(model).run(None, feeds)
    return torch.from_numpy(got.copy()), Executor(plan, {}, "cpu").run(inputs)["y"]


def activations(k: int) -> torch.Tensor:
    """[25, 2, k]: 48 rows whose blocks peak at 448 * 2^j (first) and just above it (second), j = -20 .. 27,
    where the log's estimate of the power of two is one too high or one too low for some j, each block with
    values that round to e4m3 subnormals (the only ones a scale off by two would round differently); a zero
    row (the amax floor); a row of e4m3 ties among values over 12 decades."""
    x = torch.randn(25, 2, k) * torch.logspace(-6, 6, k)
    rows = x.view(50, k)
    small = torch.tensor([0.3, 0.7, 1.1, 1.37, 1.9, 2.6, 3.3, 5.1]) * 2 ** -14
    for i, j in enumerate(range(-20, 28)):
        peak = 448 * 2.0 ** j
        rows[i] = torch.rand(k) * peak
        rows[i, 0], rows[i, 128] = peak, peak * (1 + 2 ** -22)
        rows[i, 1:9], rows[i, 129:137] = small * peak, small * peak
    rows[48] = 0
    rows[49, :8] = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, 240.0, 232.0])
    return x


@pytest.mark.parametrize("act_quant", [True, False])
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last block of K
def test_fp8_linear_body_rounds_bit_exactly(k, act_quant):
    blocks = -(-k // 128)
    weight = torch.eye(k).to(torch.float8_e4m3fn)
    scale = torch.full((blocks, blocks), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^0
    specs = {"x": (("B", 2, k), "float32"), "w": ((k, k), "float8_e4m3fn"), "s": ((blocks, blocks), "float8_e8m0fnu")}
    x = activations(k)
    got, want = onnx_and_executor("dsv4c::fp8_linear.default", (Ref("x"), Ref("w"), Ref("s"), act_quant, torch.float32),
                                  specs, {"x": x, "w": weight, "s": scale})
    assert torch.equal(got, want)
    rounded = quant.fake_quant_fp8(F.pad(x, (0, -k % 128)), 128)[..., :k]  # the last block's zeros change nothing
    assert torch.equal(want, rounded if act_quant else x) and not torch.equal(rounded, x)


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_linear_body_multiplies_by_the_decoded_weight(act_quant):
    weight, scale = quant.quantize_fp8_weight(torch.randn(200, 256) * torch.logspace(-3, 1, 200).unsqueeze(1))
    specs = {"x": (("B", 2, 256), "float32"), "w": ((200, 256), "float8_e4m3fn"), "s": ((2, 2), "float8_e8m0fnu")}
    got, want = onnx_and_executor("dsv4c::fp8_linear.default", (Ref("x"), Ref("w"), Ref("s"), act_quant, torch.float32),
                                  specs, {"x": activations(256), "w": weight, "s": scale})
    assert got.shape == want.shape == (25, 2, 200) and not got.isnan().any()
    assert float((got.double() - want.double()).norm() / want.double().norm()) <= FP32_TOLERANCE


@pytest.mark.parametrize("act_quant", [True, False])
@pytest.mark.parametrize("rows", [128, 64])  # whole scale blocks a group, or two groups in one block
def test_fp8_grouped_linear_body_multiplies_each_group_by_its_rows(act_quant, rows):
    """x [B, 4, 256]: group g of the output is x's group g times weight rows [g*rows, (g+1)*rows)."""
    weight, scale = quant.quantize_fp8_weight(torch.randn(4 * rows, 256) * torch.logspace(-3, 1, 4 * rows)[:, None])
    specs = {"x": (("B", 4, 256), "float32"), "w": ((4 * rows, 256), "float8_e4m3fn"),
             "s": (tuple(scale.shape), "float8_e8m0fnu")}
    x = activations(256)[:24].reshape(12, 4, 256)
    got, want = onnx_and_executor("dsv4c::fp8_grouped_linear.default",
                                  (Ref("x"), Ref("w"), Ref("s"), act_quant, torch.float32), specs,
                                  {"x": x, "w": weight, "s": scale})
    assert got.shape == want.shape == (12, 4 * rows) and not got.isnan().any()
    assert float((got.double() - want.double()).norm() / want.double().norm()) <= FP32_TOLERANCE


def test_fake_quant_fp8_traced_body_is_bit_exact():
    x = activations(256)
    got, want = onnx_and_executor("dsv4c::fake_quant_fp8.default", (Ref("x"), 128), {"x": (("B", 2, 256), "float32")},
                                  {"x": x})
    assert torch.equal(got, want) and torch.equal(want, quant.fake_quant_fp8(x, 128))
