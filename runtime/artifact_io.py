"""The file-level pieces of an artifact: safe relative paths, streaming hashes, durable writes, the atomic
staging directory, and the weight shards (safetensors only: no pickle on either side).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"
WEIGHTS_DIR = "weights"
HASH_CHUNK = 1 << 20
DEFAULT_SHARD_BYTES = 4 << 30
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


class ArtifactError(ValueError):
    """An artifact cannot be written or loaded; the message names the file, field or tensor."""


def check_relpath(rel: object, where: str) -> str:
    """`rel` if it is a plain relative POSIX path inside the artifact (no '..', no absolute, no
    backslashes, no hidden or odd names), else `ArtifactError`."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or not all(_PART.match(p) and p not in (".", "..") for p in parts):
        raise ArtifactError(f"{where}: {rel!r} is not a plain relative path inside the artifact")
    if rel == MANIFEST:
        raise ArtifactError(f"{where}: {MANIFEST} is written by dsv4c itself")
    return rel


def sha256_file(path: Path) -> str:
    """The file's sha256, read in chunks of `HASH_CHUNK` bytes (big weight files never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, object]:
    """The manifest entry of a written file: its sha256 and size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_durable(path: Path, data: bytes) -> None:
    """Write `data` to `path` (creating parent folders) and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden folder beside `target`, published to `target` by rename when the block ends.

    Nothing appears at `target` unless the block completes: an exception (KeyboardInterrupt included)
    removes the staging folder; a hard kill leaves only a hidden `.<name>.partial-*` folder beside it.
    """
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise ArtifactError(f"{target}: already exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        for folder, _, _ in os.walk(staging):
            fsync_path(Path(folder))
        _publish(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename `staging` to `target`; an existing target (with `overwrite`) is swapped out, then removed."""
    backup = None
    if overwrite and (target.exists() or target.is_symlink()):
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    fsync_path(target.parent)
    if backup is not None:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink()


def write_weight_shards(root: Path, tensors: Mapping[str, torch.Tensor], shard_bytes: int) -> list[str]:
    """Write `tensors` as `weights/model-<i>-of-<n>.safetensors` shards of about `shard_bytes` each;
    returns the relative paths written (none for no tensors)."""
    groups = _shard_groups(tensors, shard_bytes)
    written = []
    for index, group in enumerate(groups, start=1):
        rel = f"{WEIGHTS_DIR}/model-{index:05d}-of-{len(groups):05d}.safetensors"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(saveable(group), str(path), metadata={"format": "pt"})
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        written.append(rel)
    return written


def _shard_groups(tensors: Mapping[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    groups: list[dict[str, torch.Tensor]] = []
    size = 0
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"tensor {key!r}: weights must map string names to tensors")
        nbytes = tensor.numel() * tensor.element_size()
        if not groups or (size + nbytes > shard_bytes and groups[-1]):
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    return groups


def saveable(group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in group.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


class WeightStore(Mapping[str, torch.Tensor]):
    """The artifact's tensors by name, read lazily from its safetensors files (never unpickled)."""

    def __init__(self, root: Path, files: list[str]):
        self.root = root
        self._file_of: dict[str, str] = {}
        for rel in files:
            for key in _keys(root / rel, rel):
                if key in self._file_of:
                    raise ArtifactError(f"tensor {key!r} is in both {self._file_of[key]} and {rel}")
                self._file_of[key] = rel

    def file_of(self, key: str) -> str:
        """The relative path of the file holding `key`."""
        if key not in self._file_of:
            raise KeyError(key)
        return self._file_of[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        rel = self.file_of(key)
        try:
            with safe_open(str(self.root / rel), framework="pt", device="cpu") as f:
                return _aligned(f.get_tensor(key))
        except SafetensorError as error:
            raise ArtifactError(f"{rel}: cannot read tensor {key!r} ({error})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def by_file(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """`keys` grouped by the file holding each (files in name order, keys in the given order); KeyError for a
        key the store does not hold."""
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(self.file_of(key), []).append(key)
        return {rel: groups[rel] for rel in sorted(groups)}

    def load_all(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor, on `device`."""
        return self.read(self, device)

    def read(self, keys: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors named by `keys`, each read once and put on `device` as it is read: file by file, one open
        of each file (a Flash-size file's header lists thousands of tensors, too many to parse again for each).
        KeyError for a key the store does not hold."""
        device = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        for rel, group in self.by_file(keys).items():
            try:
                with safe_open(str(self.root / rel), framework="pt", device="cpu") as f:
                    for key in group:
                        tensor = f.get_tensor(key)
                        out[key] = _aligned(tensor) if device.type == "cpu" else tensor.to(device)
            except SafetensorError as error:
                raise ArtifactError(f"{rel}: cannot read its tensors ({error})") from None
        return out


def _keys(path: Path, rel: str) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{rel}: not a readable safetensors file ({error})") from None


ALIGNMENT = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` at an address that is a multiple of 64 bytes (a copy where it is not): CPU matmul libraries pick
    their summation order by the operands' alignment, so a weight read at an odd offset would make one-row
    products differ in the last bits from the same weight anywhere else."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()

