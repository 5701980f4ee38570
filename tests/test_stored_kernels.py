"""The runtime's stored-kernel path (runtime/stored_kernels.py) and the launch descriptions it keys binaries by
(codegen/kernels/launcher.py), without a GPU and without Triton.

`kernel_plan` decides on a fake artifact folder (a kernel source file and a manifest naming it; nothing is
loaded: load_binaries=False). `StoredKernelLauncher` routes launches of a fake kernel (a function object with
Triton's `arg_names`) to fake compiled kernels or to a recording fallback; the tensors are small CPU tensors,
only their dtype and address matter. This process never imports Triton (see test_mhc_kernels)."""

import ast
import hashlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dsv4c.codegen.kernel_catalog import KERNEL_NAMES, KERNEL_SOURCE_FILE, kernel_source
from dsv4c.codegen.kernels.launcher import KernelSpec, KernelLaunch, triton_type
from dsv4c.runtime.artifact_io import ArtifactError
from dsv4c.runtime.stored_kernels import StoredKernelLauncher, kernel_plan

SOURCE = b"@triton.jit\ndef _mix_partials_kernel(x_ptr, N, BLOCK_T: tl.constexpr): ...\n"
SOURCE_REL = f"kernels/sm_90a/{KERNEL_SOURCE_FILE}"
NAMES = ["_mix_partials_kernel_0123456789ab", "_collapse_kernel_ba9876543210"]
CUBIN = "kernels/sm_90a/_mix_partials_kernel_0123456789ab.cubin"


# ---- kernel_plan ------------------------------------------------------------------------------------------
@pytest.fixture
def stored(tmp_path):
    """(manifest, root): two sm_90a kernels built by Triton 3.6.0 from SOURCE, which the manifest records."""
    (tmp_path / SOURCE_REL).parent.mkdir(parents=True)
    (tmp_path / SOURCE_REL).write_bytes(SOURCE)
    entries = [{"name": name, "triton": "3.6.0", "files": {"source": SOURCE_REL}} for name in NAMES]
    files = {SOURCE_REL: {"sha256": hashlib.sha256(SOURCE).hexdigest(), "bytes": len(SOURCE)}}
    return {"kernels": {"sm_90a": entries}, "files": files}, tmp_path


def test_same_triton_and_source_launch_the_stored_binaries(stored):
    """Built by the local Triton from the installed source: the stored binaries run, and the line names them."""
    manifest, root = stored
    plan = kernel_plan(manifest, root, "sm_90a", local_triton="3.6.0", source=SOURCE, load_binaries=False)
    assert plan.mode == "stored" and plan.launcher is None
    assert plan.message == (f"dsv4c: launching the 2 ahead-of-time mHC kernels of {root} for sm_90a "
                            f"(Triton 3.6.0) from their stored binaries: {NAMES[0]}, {NAMES[1]}")


def test_other_triton_recompiles_from_the_stored_source(stored):
    manifest, root = stored
    plan = kernel_plan(manifest, root, "sm_90a", local_triton="3.9.0", source=SOURCE, load_binaries=False)
    assert plan.mode == "compile" and plan.launcher is None
    assert ("holds sm_90a kernels built with Triton 3.6.0, local Triton is 3.9.0: the kernels will be "
            "compiled on first use from the installed kernel source, byte-identical to the stored one") in plan.message


def test_other_installed_source_runs_the_installed_kernels(stored):
    """Binaries of another kernel source take other arguments: the installed kernels run, even at the same
    Triton, and the stored source is not run in their place."""
    manifest, root = stored
    plan = kernel_plan(manifest, root, "sm_90a", local_triton="3.6.0", source=SOURCE + b"# edited\n",
                       load_binaries=False)
    assert plan.mode == "installed" and plan.launcher is None
    assert "built from another version of the kernel source than the installed dsv4c's" in plan.message
    assert plan.message.endswith("(the stored source is never executed)")


def test_no_kernels_for_the_target_compiles_on_first_use(stored):
    manifest, root = stored
    plan = kernel_plan(manifest, root, "sm_100a", local_triton="3.6.0", source=SOURCE, load_binaries=False)
    assert plan.mode == "none" and plan.launcher is None
    assert f"{root} holds no kernels for sm_100a; the mHC kernels will be compiled" in plan.message


def test_cpu_runs_the_reference(stored):
    manifest, root = stored
    plan = kernel_plan(manifest, root, "cpu", local_triton="3.6.0", source=SOURCE, load_binaries=False)
    assert plan.mode == "reference" and plan.launcher is None
    assert plan.message == f"dsv4c: {root} runs on cpu: the reference implementations of the mHC ops"


def test_no_triton_runs_the_reference(stored):
    """Without Triton the CUDA ops run their reference implementations (codegen/cuda_impls.py): said, and the
    kernel source (a Triton module) is not imported to compare it."""
    manifest, root = stored
    plan = kernel_plan(manifest, root, "sm_90a", local_triton=None, load_binaries=False)
    assert plan.mode == "reference" and plan.launcher is None
    assert plan.message == "dsv4c: Triton is not installed: the reference implementations of the mHC ops run on sm_90a"


def test_missing_kernel_file_is_refused(stored):
    manifest, root = stored
    (root / SOURCE_REL).unlink()
    with pytest.raises(ArtifactError, match=f"kernel file {SOURCE_REL} cannot be read"):
        kernel_plan(manifest, root, "sm_90a", local_triton="3.6.0", source=SOURCE, load_binaries=False)


def test_tampered_source_is_refused(stored):
    """The stored source is hashed again as it is read: a file changed since the manifest was written fails."""
    manifest, root = stored
    (root / SOURCE_REL).write_bytes(SOURCE + b"# tampered\n")
    with pytest.raises(ArtifactError, match=f"{SOURCE_REL} does not match its sha256 in the manifest"):
        kernel_plan(manifest, root, "sm_90a", local_triton="3.6.0", source=SOURCE, load_binaries=False)


def test_source_missing_from_the_file_table_is_refused(stored):
    manifest, root = stored
    manifest["files"].clear()
    with pytest.raises(ArtifactError, match=f"kernel file '{SOURCE_REL}' is not in the manifest's file table"):
        kernel_plan(manifest, root, "sm_90a", local_triton="3.6.0", source=SOURCE, load_binaries=False)


def test_the_installed_kernel_source_is_the_jit_kernels_file_and_imports_only_triton():
    """What an artifact stores and the runtime hashes (codegen/kernel_catalog.py) is the file defining the
    kernels the specs name, every function in it a Triton jit function and nothing imported but Triton, so
    its text alone decides the binaries; it is read without importing it (nor Triton)."""
    tree = ast.parse(kernel_source())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "triton", "triton.language"}
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert set(KERNEL_NAMES) <= {node.name for node in functions}
    assert all([ast.unparse(d) for d in node.decorator_list] == ["triton.jit"] for node in functions)
    child = subprocess.run([sys.executable, "-c", "import sys; from dsv4c.codegen.kernel_catalog import kernel_source; "
                            "kernel_source(); print('triton' in sys.modules)"], capture_output=True, text=True,
                           timeout=120, check=True)
    assert child.stdout.strip() == "False", "reading the kernel source imported Triton"


# ---- StoredKernelLauncher ---------------------------------------------------------------------------------
# A kernel whose argument order is not alphabetical, with a constexpr between runtime arguments.
KERNEL = SimpleNamespace(__name__="_axpy_kernel", arg_names=["y_ptr", "x_ptr", "BLOCK", "N", "alpha", "PDL"])


class FakeCompiled:
    """A compiled kernel as Triton's: `kernel[grid](*every argument in order)`; records its launches."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *values: self.calls.append((grid, values))


def _launch(x, y, n=8, warps=4):
    return KernelLaunch(KERNEL, (n // 4, 1), {"y_ptr": y, "x_ptr": x, "N": n, "alpha": 0.5},
                  {"BLOCK": 4, "PDL": True}, {"num_warps": warps, "num_stages": 2})


def test_held_spec_runs_its_binary_with_every_argument_in_order():
    x, y = torch.zeros(8), torch.zeros(8)
    launch, compiled, jit, lines = _launch(x, y), FakeCompiled(), [], []
    launcher = StoredKernelLauncher({launch.spec(): (compiled, CUBIN)}, jit.append, lines.append)
    launcher(launch)
    [(grid, values)] = compiled.calls
    assert grid == (2, 1, 1)  # compiled kernels take a 3-d grid (the JIT pads, CompiledKernel does not)
    assert values[0] is y and values[1] is x and values[2:] == (4, 8, 0.5, True)
    assert (jit, lines, launcher.launched_stored, launcher.launched_jit) == ([], [], 1, 0)


def test_a_failing_stored_launch_names_the_kernel_and_its_cubin():
    """A binary that cannot run (it is loaded at its first launch) fails with its specialisation and file
    named, not with Triton's bare error."""
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU")

    launch = _launch(torch.zeros(8), torch.zeros(8))
    launcher = StoredKernelLauncher({launch.spec(): (Broken(), CUBIN)}, [].append, [].append)
    with pytest.raises(RuntimeError, match=f"stored kernel {launch.spec().name} \\({CUBIN}\\) failed to launch: "
                                           "RuntimeError: CUDA_ERROR_NO_BINARY_FOR_GPU"):
        launcher(launch)


def test_spec_without_binary_falls_back_and_says_so_once():
    """Another specialisation (here: other num_warps) goes to the fallback, with one line per specialisation
    however often it is launched."""
    x, y = torch.zeros(8), torch.zeros(8)
    held, other = _launch(x, y), _launch(x, y, warps=8)
    compiled, jit, lines = FakeCompiled(), [], []
    launcher = StoredKernelLauncher({held.spec(): (compiled, CUBIN)}, jit.append, lines.append)
    launcher(other)
    launcher(other)
    assert compiled.calls == [] and jit == [other, other]
    assert lines == [f"dsv4c: compiling {other.spec().name} (_axpy_kernel) from source on first use: "
                     f"the artifact has no binary for it"]
    assert (launcher.launched_stored, launcher.launched_jit) == (0, 2)


def test_misaligned_pointer_falls_back():
    """AOT binaries assume 16-byte aligned pointers: a view one float into a tensor has the held spec but is
    not theirs to run."""
    x, y = torch.zeros(9), torch.zeros(8)
    aligned, misaligned = _launch(x[:8], y), _launch(x[1:], y)
    assert misaligned.spec() == aligned.spec()
    compiled, jit, lines = FakeCompiled(), [], []
    launcher = StoredKernelLauncher({aligned.spec(): (compiled, CUBIN)}, jit.append, lines.append)
    launcher(misaligned)
    launcher(aligned)
    assert jit == [misaligned] and len(compiled.calls) == 1
    assert lines == [f"dsv4c: compiling {aligned.spec().name} (_axpy_kernel) from source on first use: "
                     f"its pointers are not 16-byte aligned"]
    assert (launcher.launched_stored, launcher.launched_jit) == (1, 1)


# ---- KernelSpec and Triton types --------------------------------------------------------------------------
def test_spec_survives_json_with_sorted_keys():
    """The artifact's json is written with sorted keys; the spec read back (argument order restored from the
    kernel) is the launch's, name included."""
    spec = _launch(torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8)).spec()
    record = json.loads(json.dumps(spec.to_json(), sort_keys=True))
    assert list(record["signature"]) != KERNEL.arg_names  # the sort did reorder the arguments
    back = KernelSpec.from_json(record, KERNEL.arg_names)
    assert back == spec and back.name == spec.name
    assert dict(back.signature) == {"y_ptr": "*fp32", "x_ptr": "*bf16", "BLOCK": "constexpr", "N": "i32",
                                    "alpha": "fp32", "PDL": "constexpr"}


def test_spec_from_json_of_another_signature_is_refused():
    record = _launch(torch.zeros(8), torch.zeros(8)).spec().to_json()
    del record["signature"]["alpha"]
    with pytest.raises(ValueError, match="_axpy_kernel: signature names"):
        KernelSpec.from_json(record, KERNEL.arg_names)


def test_arguments_without_a_triton_type_are_refused():
    with pytest.raises(TypeError, match="argument 'flag': a bool must be a constexpr"):
        triton_type(True, "flag")
    with pytest.raises(TypeError, match="argument 'z_ptr': no Triton type for tensors of torch.complex64"):
        triton_type(torch.zeros(2, dtype=torch.complex64), "z_ptr")
