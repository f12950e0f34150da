"""One on-disk / on-Hub layout for every vqlib model: ``config.json`` + ``model.safetensors`` (+ ``README.md``).

Shared by the tokenizers (``vqlib.models.hub``) and compressed models (``vqlib.compress.io``):

* :func:`write_folder`: atomic folder write (staged in a hidden sibling, then renamed).
* :func:`read_json_config` / :func:`check_format_version`: parse ``config.json``; a newer ``format_version`` is
  refused with the vqlib version that wrote it.
* :func:`load_safetensors`: reads the header first, so a truncated file is named as such (size on disk vs size
  the header promises) instead of surfacing as a low-level parse error.
* :func:`resolve_folder`: a local folder, or a Hub repo id fetched with ``snapshot_download`` restricted to the
  files a vqlib load needs. ``snapshot_download`` resolves the revision to one commit and downloads every file at
  that commit; the returned folder is ``.../snapshots/<commit sha>``, which we record as the model's
  ``hub_commit``.
* :func:`refuse_pickles`: a folder or repo that holds only ``*.bin`` / ``*.pt`` / ``*.ckpt`` / ``*.pkl`` is
  refused: vqlib never unpickles.
* :func:`push_folder`: ``create_repo`` (+ branch) + ``upload_folder``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def vqlib_version() -> str:
    import vqlib

    return getattr(vqlib, "__version__", "unknown")


# -- writing ----------------------------------------------------------------------------------------------------
def state_for_safetensors(model: nn.Module) -> dict[str, Tensor]:
    """State dict with every tensor contiguous, on CPU and owning its storage (safetensors refuses shared
    memory: tied weights and views are cloned)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and (ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    import safetensors.torch

    # save_file looked up at call time: tests replace it to simulate a failing disk
    safetensors.torch.save_file(state, str(path), metadata=metadata)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder(
    folder: str | os.PathLike, writers: dict[str, Callable[[Path], None]], *, replace: str = "files"
) -> Path:
    """Write files into ``folder`` atomically: each ``writers[name](path)`` writes one file into a hidden
    staging sibling; then a new folder is renamed into place (complete or absent, never half-written).

    An existing folder: ``replace="files"`` renames each new file over the old one and keeps other files;
    ``replace="folder"`` swaps the whole folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like mkdir's
        for name, write in writers.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / name)
            os.chmod(tmp / name, 0o666 & ~umask)
            _fsync(tmp / name)
        _fsync(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif replace == "folder":
            backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.rename(folder, backup / "old")
            os.rename(tmp, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            for name in writers:
                staged = folder / f".{Path(name).name}.{uuid.uuid4().hex}.tmp"
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(tmp / name), staged)
                os.replace(staged, folder / name)
        _fsync(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def text_writer(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


# -- reading ----------------------------------------------------------------------------------------------------
def read_json_config(folder: Path, caller: str) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{caller}: {path} is missing; a vqlib model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{caller}: {path} is not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{caller}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_format_version(version: Any, supported: int, where: str, written_by: Any, caller: str) -> int:
    """Versions 1..supported load (older ones are read by the caller's upgrade path); newer ones are refused."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{caller}: {where}: format_version must be a positive integer, got {version!r}")
    if version > supported:
        raise ValueError(
            f"{caller}: {where} uses format version {version}, newer than this vqlib supports ({supported}); "
            f"it was written by vqlib {written_by or '?'}: upgrade vqlib (pip install -U vqlib) to load it"
        )
    return version


def safetensors_size(path: Path) -> tuple[int, int]:
    """(bytes on disk, bytes the header promises); raises ValueError for a header that cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, not even the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path} is truncated: its header says {n} header bytes but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a safetensors file (corrupt header: {exc})") from exc
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return size, 8 + n + max(ends, default=0)


def load_safetensors(path: Path, device: str | torch.device, caller: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{caller}: {path} is missing")
    size, expected = safetensors_size(path)
    if size < expected:
        raise ValueError(f"{caller}: {path} is truncated: {size} bytes, its header describes {expected} bytes")
    try:
        return load_file(str(path), device=str(torch.device(device)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{caller}: cannot read {path} (corrupt file): {exc}") from exc


def refuse_pickles(names: Iterable[str], where: str, caller: str) -> None:
    """Raise when ``names`` (a folder's or repo's files) hold pickle checkpoints but no safetensors weights."""
    names = list(names)
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"{caller}: {where} holds only pickle checkpoint(s) {pickles[:5]} and no {WEIGHTS_NAME}; vqlib never "
            "unpickles (a pickle can run arbitrary code). Convert it where you trust the file: load it and "
            "call save_pretrained / save_compressed, which write safetensors"
        )


# -- Hub --------------------------------------------------------------------------------------------------------
@dataclass
class Resolved:
    folder: Path
    repo_id: str | None = None  # None: a local folder
    commit: str | None = None  # the commit every file came from


def looks_like_local_path(name: str) -> bool:
    """A repo id is ``name`` or ``owner/name``; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def resolve_folder(
    name: str | os.PathLike,
    *,
    caller: str,
    files: list[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Resolved:
    """A local folder as is; otherwise download ``files`` of the Hub repo ``name`` at one commit."""
    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        if not (path / WEIGHTS_NAME).exists():
            refuse_pickles([p.name for p in path.iterdir()], str(path), caller)
        return Resolved(path)
    if path.exists():
        raise NotADirectoryError(f"{caller}: {path} is a file, expected a model folder or a Hub repo id")
    if isinstance(name, os.PathLike) or looks_like_local_path(str(name)):
        raise FileNotFoundError(f"{caller}: {path} is not a folder: it does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            str(name),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=files,
            library_name="vqlib",
            library_version=vqlib_version(),
        )
    except Exception as e:  # network, auth, not found: say which name was tried both ways
        raise OSError(
            f"{caller}: {str(name)!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"at revision {revision or 'main'} ({type(e).__name__}: {e})"
        ) from e
    folder = Path(local)
    commit = folder.name if _COMMIT_RE.match(folder.name) else None
    if not (folder / WEIGHTS_NAME).is_file() and not local_files_only:
        _refuse_remote_pickles(str(name), commit or revision, token, caller)
    return Resolved(folder, str(name), commit)


def _refuse_remote_pickles(repo_id: str, revision: str | None, token: Any, caller: str) -> None:
    from huggingface_hub import HfApi

    try:
        names = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # the missing-file error that follows still names what is absent
        return
    refuse_pickles(names, f"Hub repo {repo_id!r} at {revision}", caller)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with vqlib",
    create_pr: bool = False,
):
    """Upload ``folder`` to ``repo_id`` (created if needed; ``revision`` names a branch, created from main)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main") and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, create_pr=create_pr
    )


__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Resolved",
    "check_format_version",
    "load_safetensors",
    "push_folder",
    "read_json_config",
    "refuse_pickles",
    "resolve_folder",
    "state_for_safetensors",
    "write_folder",
]
