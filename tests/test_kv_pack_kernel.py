"""kv_pack's Triton kernel (codegen/kernels/kv_pack.py, the CUDA kernel of `dsv4c::kv_pack`) under Triton's
interpreter, in a spawned child that sets TRITON_INTERPRET=1 before importing Triton, against the op's reference
(codegen/kv_cache.py `pack_reference`): byte for byte, for Flash's main KV layout (e4m3, 448 of 512 dims, blocks of
64), one rounding every dim, the indexer keys' (e2m1, blocks of 32) and a layout of blocks and raw bytes that are not
powers of two; in fp32, bf16 and fp16; on rows of zeros, below the amax floor, at the format's maximum and just past
it, at rounding ties, of random magnitudes from 2^-30 to 2^60, with NaN and inf; on leading dims, strided rows and
no rows. The kernel's NaN codes are 0x7F where the CPU reference's may be 0xFF (the kernel module's docstring says
why): the comparison clears that one bit of the reference's NaN codes, and checks the kernel writes 0x7F. Unpacked,
the kernel's rows are the model's rounding (model/quant.py) bit for bit. A second child, without the interpreter,
builds the kernel for sm_90a (no GPU needed)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.codegen import ops  # noqa: F401  (registers the ops and their CUDA kernels)
from dsv4c.codegen.kv_cache import PackedLayout, pack_reference, unpack_reference
from dsv4c.model import quant

TRITON = importlib.util.find_spec("triton") is not None
MAIN_KV, ALL_ROUNDED, INDEXER_KEY, ODD = ("e4m3", 512, 448, 64), ("e4m3", 512, 512, 64), ("e2m1", 128, 128, 32), \
    ("e4m3", 100, 48, 48)
LAYOUTS = [MAIN_KV, ALL_ROUNDED, INDEXER_KEY, ODD]
FMT_MAX = {"e4m3": quant.FP8_MAX, "e2m1": quant.FP4_MAX}
FLOOR = {"e4m3": quant.FP8_AMAX_FLOOR, "e2m1": quant.FP4_AMAX_FLOOR}


def _kernel(x, fmt, rounded, block):
    from dsv4c.codegen.kernels.kv_pack import kv_pack

    return kv_pack(x, fmt, rounded, block)


@pytest.fixture(scope="module")
def kernel(interpreter_pool):
    return run_in(interpreter_pool, _kernel)


def finite_rows(lead: tuple[int, ...], fmt: str, width: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of random blocks of magnitudes 2^-30 .. 2^60, but row 0 zeros (one -0), row 1 below the amax floor, row
    2 blocks at the format's maximum (its largest value, then ties between neighbours) and just past it."""
    x = torch.randn(*lead, -(-width // block), block)
    x = (x * 2.0 ** torch.randint(-30, 60, (*x.shape[:-1], 1)).float()).flatten(-2)[..., :width].contiguous()
    flat = x.view(-1, width)
    flat[0] = 0.0
    flat[0, 1] = -0.0
    flat[1] = torch.randn(width) * FLOOR[fmt] / 16
    ties = {"e4m3": [1.0625, 3.25, 0.75, 5.0, 13.0, 0.25, 2.5, 104.0], "e2m1": [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]}
    flat[2, ::2] = FMT_MAX[fmt]
    flat[2, 1::2] = torch.tensor(ties[fmt]).repeat(width)[: width // 2] * torch.tensor([1.0, -1.0]).repeat(width)[
        : width // 2]
    flat[2, block:2 * block] *= 1 + 2.0 ** -6  # amax just past the maximum (in bf16 too): the next power of two
    return x.to(dtype)


def nonfinite_rows(fmt: str, width: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows with a NaN (positive, negative), an inf, a -inf, an inf beside a NaN, in one block each."""
    x = torch.randn(5, width)
    x[0, 3], x[1, block + 1], x[2, 5], x[3, 2], x[4, 0], x[4, 7] = (
        float("nan"), -float("nan"), float("inf"), -float("inf"), float("inf"), float("nan"))
    return x.to(dtype)


def nan_codes_positive(packed: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """packed with its e4m3 NaN codes (0x7F, 0xFF) as 0x7F: their sign is the reference's NaN propagation's."""
    if layout.format != "e4m3":
        return packed
    codes = packed[..., :layout.code_bytes]
    return torch.cat((torch.where(codes == 0xFF, 0x7F, codes).to(torch.uint8), packed[..., layout.code_bytes:]), -1)


@pytest.mark.parametrize("fmt, width, rounded, block, dtype", [
    (*layout, dtype) for layout in LAYOUTS for dtype in (torch.float32, torch.bfloat16)] + [(*MAIN_KV, torch.float16)])
def test_the_kernel_equals_the_reference_byte_for_byte(kernel, fmt, width, rounded, block, dtype):
    x = finite_rows((3, 7), fmt, width, block, dtype)  # 21 rows: the last program's rows run past the end
    if dtype == torch.float16:
        x = x.float().clamp(-60000.0, 60000.0).half()  # no inf from the magnitudes fp16 cannot hold
    want = pack_reference(x, fmt, rounded, block)
    got = kernel(x, fmt, rounded, block)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (3, 7, PackedLayout(
        fmt, width, rounded, block, dtype).row_bytes)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt, width, rounded, block", [MAIN_KV, INDEXER_KEY])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_blocks_are_packed_as_the_reference_packs_them(kernel, fmt, width, rounded, block, dtype):
    """Scale byte 255 (e8m0's NaN); e2m1 codes 0; e4m3 codes NaN (0x7F from the kernel) but signed zeros for the finite values of
    a block with an inf and no NaN; the other blocks of those rows as usual."""
    layout = PackedLayout(fmt, width, rounded, block, dtype)
    x = nonfinite_rows(fmt, width, block, dtype)
    want = pack_reference(x, fmt, rounded, block)
    got = kernel(x, fmt, rounded, block)
    scales = got[:, layout.scale_offset:layout.scale_offset + layout.scale_bytes]
    assert scales[0, 0] == scales[1, 1] == scales[2, 0] == scales[3, 0] == scales[4, 0] == 255
    assert torch.equal(got, nan_codes_positive(want, layout))
    if fmt == "e4m3":
        assert not (got[:, :layout.code_bytes] == 0xFF).any() and (want[:, :layout.code_bytes] == 0xFF).any()
        assert (got[0, :block] == 0x7F).all() and got[2, 5] == got[3, 2] == 0x7F
        assert set(got[2, :block].tolist()) == {0x00, 0x80, 0x7F}  # the inf block: signed zeros but the inf
    else:
        assert not got[[0, 2, 3, 4], :block // 2].any() and not got[1, block // 2:block].any()


@pytest.mark.parametrize("fmt, width, rounded, block", [MAIN_KV, INDEXER_KEY, ODD])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_rows_are_the_models_rounding(kernel, fmt, width, rounded, block, dtype):
    x = finite_rows((2, 5), fmt, width, block, dtype)
    rows = unpack_reference(kernel(x, fmt, rounded, block), fmt, width, rounded, block, dtype)
    round_ = quant.fake_quant_fp8 if fmt == "e4m3" else quant.fake_quant_fp4
    want = torch.cat((round_(x[..., :rounded], block), x[..., rounded:]), dim=-1)
    assert rows.dtype == dtype and torch.equal(rows.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("fmt, width, rounded, block", [MAIN_KV, INDEXER_KEY])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_block_with_a_nan_or_an_inf_unpacks_to_nan_as_the_models_rounding_makes_it(kernel, fmt, width, rounded,
                                                                                    block, dtype):
    """NaN never passes: a non-finite value in a cached row leaves its whole block NaN, not zeros."""
    x = nonfinite_rows(fmt, width, block, dtype)
    round_ = quant.fake_quant_fp8 if fmt == "e4m3" else quant.fake_quant_fp4
    want = torch.cat((round_(x[..., :rounded], block), x[..., rounded:]), dim=-1)
    for packed in (kernel(x, fmt, rounded, block), pack_reference(x, fmt, rounded, block)):
        rows = unpack_reference(packed, fmt, width, rounded, block, dtype)
        assert torch.equal(rows.isnan(), want.isnan()) and want.isnan().sum() >= 5 * block
        finite = ~want.isnan()
        assert torch.equal(rows[finite], want[finite])


def test_strided_rows_and_no_rows(kernel):
    fmt, width, rounded, block = MAIN_KV
    wide = finite_rows((6,), fmt, width + 40, block, torch.bfloat16)
    columns = wide[:, 8:8 + width]  # rows 552 apart, the last dim contiguous: no copy
    transposed = finite_rows((width,), fmt, 6, 2, torch.bfloat16).t()  # a strided last dim: copied
    for x in (columns, transposed, columns.unflatten(0, (2, 3))[:, ::2]):
        assert torch.equal(kernel(x, fmt, rounded, block), pack_reference(x, fmt, rounded, block))
    empty = kernel(torch.zeros(0, 3, width, dtype=torch.bfloat16), fmt, rounded, block)
    assert empty.shape == (0, 3, 584) and empty.dtype == torch.uint8


def test_the_op_has_its_cuda_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dsv4c::kv_pack", "CUDA")


# ---- ahead of time, for the H100 (a compiling child) ---------------------------------------------------------
def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _h100_ptx(fmt: str, width: int, rounded: int, block: int) -> str:
    """The kernel's PTX for sm_90a, bf16 rows of the layout, at its launch."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import kv_pack as kernels
    from dsv4c.codegen.targets import target, triton_gpu_target

    layout = PackedLayout(fmt, width, rounded, block, torch.bfloat16)
    launch, pad = kernels.kv_pack_launch(layout), layout.row_bytes - layout.scale_offset - layout.scale_bytes
    fn = kernels._kv_pack_kernel
    types = {"x_ptr": "*bf16", "x_bytes_ptr": "*u8", "out_ptr": "*u8", "n_rows": "i32", "x_row_stride": "i32"}
    constexprs = dict(ROWS=launch.rows, BLOCKS=rounded // block, BLOCKS_P2=triton.next_power_of_2(rounded // block),
                      BLOCK=block, BLOCK_P2=block, FP4=fmt == "e2m1", FMT_MAX=FMT_MAX[fmt], AMAX_FLOOR=FLOOR[fmt],
                      ROW_BYTES=layout.row_bytes, CODE_BYTES=layout.code_bytes, RAW_BYTES=layout.raw_bytes,
                      RAW_P2=triton.next_power_of_2(layout.raw_bytes), ITEM=2, SCALE_OFF=layout.scale_offset,
                      PAD=pad, PAD_P2=triton.next_power_of_2(pad), PDL=True)
    assert list(types) + list(constexprs) == fn.arg_names
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
    source = ASTSource(fn, {**types, **dict.fromkeys(constexprs, "constexpr")}, constexprs, attrs)
    return triton.compile(source, target=triton_gpu_target(target("h100")),
                          options={"num_warps": launch.num_warps}).asm["ptx"]


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_kernel_builds_for_h100_at_flash_layouts():
    """What the interpreter cannot check: the kernel compiles (main KV and indexer keys, bf16 rows)."""
    with child_pool(_start_compiler) as pool:
        for layout in (MAIN_KV, INDEXER_KEY):
            ptx = pool.submit(_h100_ptx, *layout).result()
            assert ".target sm_90a" in ptx and ".entry _kv_pack_kernel" in ptx, layout
            assert "griddepcontrol.wait" in ptx, layout  # launched as its predecessor's programmatic dependent
