"""Where a checkpoint comes from: a hub id or a local folder, converted once into a cache of our layout.

    resolve("THUDM/cogvlm-chat-hf")      # download (safetensors, index, config, tokenizer only), convert, cache
    resolve("/data/cogvlm-chat-hf")      # a local hub-layout folder: converted into the same cache
    resolve("/data/cogvlm-chat")         # already converted: used as it is

The cache lives in $COGVLM_CACHE (default ~/.cache/cogvlm): `ORG--NAME--REVISION` for hub ids, `local--NAME--HASH`
for local folders, where HASH covers the folder's resolved path and the size and mtime of its index, so an edited
checkpoint is converted again. A converted folder is self-contained (weights, config, tokenizer.model) and works
offline. Downloads go through huggingface_hub (progress bars, resumable, HF_HOME / HF_HUB_OFFLINE / tokens as
usual) and never fetch code: nothing is ever executed from the hub.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from .config import CONFIG_FILE
from .convert import TOKENIZER_FILE, convert
from .shards import INDEX_FILES, SINGLE_FILES, CheckpointError, remove_stale_temp_folders

__all__ = ["resolve", "cache_root", "download", "ALLOW_PATTERNS", "TOKENIZER_REPO"]

# Weights, their index, the config and a tokenizer if the repository has one; never *.py or pickles.
ALLOW_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", TOKENIZER_FILE]
# The THUDM repositories ship no tokenizer; their code loads this one.
TOKENIZER_REPO = "lmsys/vicuna-7b-v1.5"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_root() -> Path:
    return Path(os.environ.get("COGVLM_CACHE") or Path.home() / ".cache" / "cogvlm").expanduser()


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, tokenizer=None) -> Path:
    """A converted checkpoint folder for a hub id or a local folder (hub layout or converted), converting once."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / CONFIG_FILE).exists():
            return path
        if (path / "config.json").exists():
            return _cached_conversion(path, _in_cache(_local_key(path)), tokenizer)
        raise CheckpointError(
            f"{path} is neither a converted cogvlm folder (no {CONFIG_FILE}) nor a hub-layout one (no config.json)"
        )
    name = str(name_or_path)
    if path.exists() or not _REPO_ID.match(name) or name.startswith("."):
        raise CheckpointError(f"{name} is not a checkpoint folder, and not a hub id like THUDM/cogvlm-chat-hf")
    dst = _in_cache(f"{name.replace('/', '--')}--{(revision or 'main').replace('/', '--')}")
    if (dst / CONFIG_FILE).exists():  # converted before: no network needed
        _add_tokenizer(dst, tokenizer)
        return dst
    return _cached_conversion(download(name, revision), dst, tokenizer)


def _in_cache(key: str) -> Path:
    """The cache entry `key`; first clears the cache of what killed conversions left behind (see atomic_folder)."""
    if cache_root().is_dir():
        remove_stale_temp_folders(cache_root())
    return cache_root() / key


def download(repo_id: str, revision: str | None = None) -> Path:
    """The hub repository's weights, config and tokenizer in the Hugging Face cache (downloaded if needed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id} is not (completely) in the local Hugging Face cache and the hub cannot be reached "
            f"(offline or no connection: {e.__class__.__name__}). Go online once to download it (unset "
            "HF_HUB_OFFLINE), or pass a local folder: the hub layout or one made by `cogvlm convert`"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"no repository {repo_id} on the hub (or it is private or gated: log in with `hf auth login`)"
        ) from e


def _local_key(path: Path) -> str:
    path = path.resolve()
    index = next((path / n for n in INDEX_FILES + SINGLE_FILES if (path / n).exists()), path / "config.json")
    stat = index.stat()
    digest = hashlib.sha256(f"{path}\0{index.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return f"local--{path.name}--{digest[:16]}"


def _cached_conversion(src: Path, dst: Path, tokenizer) -> Path:
    if (dst / CONFIG_FILE).exists():
        _add_tokenizer(dst, tokenizer)
        return dst
    if tokenizer is None and not (src / TOKENIZER_FILE).exists():
        tokenizer = _fetch_tokenizer(src)
    print(f"cogvlm: converting {src} into {dst} (once; later loads reuse it)", file=sys.stderr)
    # convert() writes into a temporary folder and renames it into place only when complete.
    return convert(src, dst, tokenizer=tokenizer, force=True)


def _fetch_tokenizer(src: Path) -> Path:
    """The Vicuna tokenizer the THUDM checkpoints use, for a conversion of `src`, which has none: from the local
    Hugging Face cache, else downloaded. Offline (HF_HUB_OFFLINE) or with the hub out of reach this fails at once,
    in one line, instead of spending half a minute in huggingface_hub's retries and loading a model that cannot chat."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    cached = _cached_tokenizer()
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        why = "HF_HUB_OFFLINE is set"
    else:
        try:  # one request, no retries: is the hub there at all?
            get_hf_file_metadata(hf_hub_url(TOKENIZER_REPO, TOKENIZER_FILE))
            return Path(hf_hub_download(TOKENIZER_REPO, TOKENIZER_FILE))
        except Exception as e:  # no connection, DNS, proxy, hub down, gated...
            why = f"the hub cannot be reached: {e.__class__.__name__}"
    raise CheckpointError(
        f"{src} has no {TOKENIZER_FILE}, and {TOKENIZER_REPO}'s is not in the local Hugging Face cache ({why}); "
        f"pass --tokenizer PATH/{TOKENIZER_FILE} (tokenizer=PATH in Python)"
    )


def _cached_tokenizer() -> Path | None:
    """The Vicuna tokenizer if the local Hugging Face cache holds it (instant, no network), else None."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(TOKENIZER_REPO, TOKENIZER_FILE, local_files_only=True))
    except Exception:  # not cached (the exact error class differs between huggingface_hub versions)
        return None


def _add_tokenizer(folder: Path, tokenizer) -> None:
    """Give a cached conversion made without a tokenizer one: the given file, or one the HF cache holds by now."""
    if (folder / TOKENIZER_FILE).exists():
        return
    tokenizer = Path(tokenizer) if tokenizer else _cached_tokenizer()  # no network on reuse
    if tokenizer is None:
        return
    if not tokenizer.exists():
        raise CheckpointError(f"tokenizer file {tokenizer} does not exist")
    tmp = folder / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
    shutil.copyfile(tokenizer, tmp)
    os.replace(tmp, folder / TOKENIZER_FILE)  # atomic: readers never see half a file
