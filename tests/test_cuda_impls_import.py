"""Which module the mHC ops' CUDA implementations call (codegen/cuda_impls.py), checked on CPU tensors without
importing Triton: the kernels' host wrappers where Triton is installed, an ImportError naming the kernel module
where they fail to import (never a silent switch to the references), the PyTorch references only where Triton
is not installed (what the loader then says, runtime/stored_kernels.py). The import is simulated through the
function cuda_impls imports with (`import_module`)."""


import pytest
import torch

from dsv4c.codegen import cuda_impls, mhc_reference


@pytest.fixture(autouse=True)
def uncached_kernels():
    """`_kernels` caches the module it found: each test decides afresh, and leaves nothing cached."""
    cuda_impls._kernels.cache_clear()
    yield
    cuda_impls._kernels.cache_clear()


def _head_args(n=4, d=32):
    """hc_head's inputs with two leading dims (the CUDA implementation flattens them)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, n, d, generator=g), torch.randn(n, n * d, generator=g) * 0.1,
            torch.randn(n, generator=g), torch.rand(1, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5,
            1e-6, 1e-6)


def _reference_head(streams, *rest):
    return mhc_reference.hc_head(streams.flatten(0, 1), *rest).unflatten(0, streams.shape[:2])


def test_a_kernel_module_that_fails_to_import_is_an_error_naming_it(monkeypatch):
    def failing_import(name):
        raise ImportError("cannot import name 'gdc_wait' from 'triton.language.extra.cuda'")

    monkeypatch.setattr(cuda_impls, "triton_installed", lambda: True)
    monkeypatch.setattr(cuda_impls, "import_module", failing_import)
    with pytest.raises(ImportError, match=r"cannot load their Triton kernels: importing dsv4c\.codegen\.kernels\.mhc "
                                          r"failed \(ImportError: cannot import name 'gdc_wait'") as raised:
        cuda_impls.hc_head(*_head_args())
    assert raised.value.name == "dsv4c.codegen.kernels.mhc"


def test_with_triton_installed_the_ops_call_the_kernel_module(monkeypatch):
    """The module imported is the host wrappers' (the reference stands in for it here: same signatures)."""
    imported = []
    monkeypatch.setattr(cuda_impls, "triton_installed", lambda: True)
    monkeypatch.setattr(cuda_impls, "import_module", lambda name: imported.append(name) or mhc_reference)
    args = _head_args()
    torch.testing.assert_close(cuda_impls.hc_head(*args), _reference_head(*args), rtol=0, atol=0)
    assert imported == ["dsv4c.codegen.kernels.mhc"]


def test_without_triton_the_references_run_and_no_kernel_module_is_imported(monkeypatch):
    def no_import(name):
        pytest.fail(f"imported {name} where Triton is not installed")

    monkeypatch.setattr(cuda_impls, "triton_installed", lambda: False)
    monkeypatch.setattr(cuda_impls, "import_module", no_import)
    args = _head_args()
    torch.testing.assert_close(cuda_impls.hc_head(*args), _reference_head(*args), rtol=0, atol=0)
