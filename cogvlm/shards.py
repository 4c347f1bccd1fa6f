"""Reading and writing sharded checkpoints, one tensor at a time: the one tensor reader/writer of the project
(conversion, loading, quantized checkpoints, fine-tuning checkpoints) and its one atomic-folder helper.

The real checkpoint is 35 GB, so nothing here ever holds the whole model: readers open one shard at a time (safetensors
are memory-mapped; `.bin` shards are read with `torch.load(weights_only=True)`, which refuses any pickled object that
is not plain tensor data), and the writer flushes an output shard as soon as it is full. Output goes to a temporary
folder that is renamed into place only when complete, so an interrupted run leaves nothing that looks finished.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_SHARD_BYTES = 4 * 2**30


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the file or keys."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def list_shards(path: str | Path) -> list[tuple[Path, list[str] | None]]:
    """The shards of a checkpoint folder (or single file) in order, each with its keys (None: known after reading).

    Accepts a hub-style folder with `model.safetensors.index.json` or `pytorch_model.bin.index.json`, a folder
    with a single `model.safetensors` / `pytorch_model.bin`, or the path of one such file.
    """
    path = Path(path)
    if path.is_file():
        return [(path, None)]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for name in INDEX_FILES:
        index = path / name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid index file ({e}); re-download it") from e
            shards: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                shards.setdefault(file, []).append(key)
            missing = [f for f in shards if not (path / f).exists()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shard(s) that are not in {path}: {', '.join(sorted(missing))}; "
                    "download the missing file(s) again"
                )
            return [(path / f, keys) for f, keys in sorted(shards.items())]
    for name in SINGLE_FILES:
        if (path / name).exists():
            return [(path / name, None)]
    raise CheckpointError(
        f"no checkpoint in {path}: expected {' or '.join(INDEX_FILES)} with its shards, or {' or '.join(SINGLE_FILES)}"
    )


def check_safetensors_headers(shards: list[tuple[Path, list[str] | None]]) -> None:
    """Open every safetensors shard's header up front, so a truncated or foreign file fails before any work."""
    for file, keys in shards:
        if file.suffix != ".safetensors":
            continue
        with open_shard(file) as shard:
            if keys is not None and set(shard.keys()) != set(keys):
                extra = sorted(set(shard.keys()) ^ set(keys))[:5]
                raise CheckpointError(f"{file} does not hold the keys its index lists (first differences: {extra})")


class _BinShard:
    def __init__(self, tensors: dict):
        self._tensors = tensors

    def keys(self):
        return list(self._tensors)

    def get_tensor(self, key):
        return self._tensors[key]


@contextmanager
def open_shard(file: Path, device: str = "cpu"):
    """Yield an object with `keys()` and `get_tensor(key)` over one shard, read lazily where the format allows."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device=device) as f:
                yield f
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it may be truncated: "
                                  "download it again") from e
        return
    try:
        tensors = torch.load(file, map_location=device, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{file} could not be read as a PyTorch weights file with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Files that contain arbitrary pickled objects are refused "
            "because unpickling them can run code; convert it where you trust it, or use the safetensors files"
        ) from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of name -> tensor; it is not a model state dict")
    yield _BinShard(tensors)


class ShardWriter:
    """Collects tensors and writes `model-0000i-of-0000n.safetensors` shards plus the index into a folder."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.files):05d}.safetensors"
        save_tensors(self.pending, self.folder / name, metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Flush, give the shards their final `-of-` names and write `model.safetensors.index.json`."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILES[0]).write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def atomic_folder(dst: Path, force: bool = False):
    """Yield a temporary folder beside `dst`; on success it is renamed to `dst`, on any failure it is removed.

    A killed process cannot remove its folder (for the real model, tens of GB), so each one is marked with its host
    and pid, and the next run beside it removes those whose process is gone (`remove_stale_temp_folders`)."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; choose another destination or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(dst.parent)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / TEMP_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / TEMP_MARK).unlink()
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


TEMP_MARK = ".cogvlm-partial"  # "HOST PID" of the process writing an `atomic_folder`


def remove_stale_temp_folders(parent: Path) -> list[Path]:
    """Remove the temporary folders of `atomic_folder` in `parent` left by processes of this host that no longer
    exist; returns them. Only folders carrying our mark are considered, and a live process's folder is never touched
    (nor one from another host sharing the disk: its pid means nothing here)."""
    removed = []
    for folder in Path(parent).glob(".*.tmp-*"):
        try:
            host, pid = (folder / TEMP_MARK).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):  # not a folder of ours, or not readable: leave it
            continue
        if host == socket.gethostname() and pid != os.getpid() and not _process_exists(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_exists(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def save_tensors(tensors: dict, file: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions of any new file (0644 under the usual umask; it writes 0600)."""
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_tensors(folder: Path, stem: str, tensors, max_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write (name, tensor) pairs as `stem-00000.safetensors`, `stem-00001...` of at most `max_bytes` each (tensors
    copied to the CPU); returns the file names. For small state (optimizer, RNG, adapters) beside a model."""
    part, size, names = {}, 0, []

    def flush():
        names.append(f"{stem}-{len(names):05d}.safetensors")
        save_tensors(part, Path(folder) / names[-1])

    for name, t in tensors:
        t = t.detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if part and size + nbytes > max_bytes:
            flush()
            part, size = {}, 0
        part[name] = t
        size += nbytes
    flush()
    return names


def read_tensors(folder: Path, stem: str, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of `stem-*.safetensors` in `folder` (see `write_tensors`)."""
    files = sorted(glob.glob(str(Path(folder) / f"{stem}-*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder} has no {stem}-*.safetensors")
    out = {}
    for file in files:
        with open_shard(Path(file), device=str(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out
