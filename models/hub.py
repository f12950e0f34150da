"""Save / load / publish tokenizers as ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card).

Contract for a model class (``class MyTokenizer(HubMixin, nn.Module)``):

* ``_hub_config(self) -> dict``: the JSON-serialisable constructor arguments that rebuild the model.
  If the model has a ``quantizer`` attribute (a :class:`vqlib.Quantizer`), do *not* put it in the dict:
  the mixin stores it as ``init_args["quantizer"] = quantizer_to_config(self.quantizer)`` and rebuilds it
  with :func:`vqlib.quantizer_from_config` when loading.
* ``_from_hub_config(cls, init_args) -> instance`` (classmethod, optional): builds the model from those
  arguments (with ``init_args["quantizer"]`` already rebuilt as a Quantizer object). Default: ``cls(**init_args)``.
* ``_model_card_fields(self) -> dict[str, str]`` (optional): extra ``$placeholders`` for the model card.

``config.json`` layout::

    {"library": "vqlib", "model_type": "ImageTokenizer", "format_version": 1,
     "vqlib_version": "0.1.0", "init_args": {..., "quantizer": {"class_path": "vqlib.VectorQuantize", ...}}}

Loading reads JSON and safetensors only (no pickle). A repo id (``"user/name"``) that is not an existing
local folder is fetched with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vqlib.base import Quantizer, quantizer_from_config, quantizer_to_config

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "tokenizer_card.md"

_FALLBACK_CARD = """---
library_name: vqlib
tags:
- vqlib
- tokenizer
- vector-quantization
---
# $model_type

A vqlib `$model_type` with a `$quantizer_class` quantizer ($codebook_size codes).

```python
from vqlib.models import $model_type
tokenizer = $model_type.from_pretrained("$repo_id")
```

Config:

```json
$config_json
```
"""


def _vqlib_version() -> str:
    import vqlib

    return getattr(vqlib, "__version__", "unknown")


def _looks_like_local_path(name: str) -> bool:
    """A repo id is ``name`` or ``owner/name``; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def _detached_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Contiguous CPU copies; a tensor whose storage another entry already uses (tied weights, views) is
    cloned, because safetensors refuses shared storage."""
    state: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storages:
                t = t.clone()
            seen_storages.add(t.untyped_storage().data_ptr())
        state[name] = t
    return state


class HubMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to an ``nn.Module`` subclass."""

    # -- hooks ---------------------------------------------------------------------------------------------
    def _hub_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement _hub_config() to be saved")

    @classmethod
    def _from_hub_config(cls, init_args: dict[str, Any]):
        return cls(**init_args)

    def _model_card_fields(self) -> dict[str, str]:
        return {}

    @classmethod
    def _hub_model_type(cls) -> str:
        return cls.__name__

    # -- config ----------------------------------------------------------------------------------------------
    def hub_config(self) -> dict[str, Any]:
        """The full ``config.json`` content."""
        init_args = dict(self._hub_config())
        quantizer = getattr(self, "quantizer", None)
        if isinstance(quantizer, Quantizer):
            init_args["quantizer"] = quantizer_to_config(quantizer)
        return {
            "library": "vqlib",
            "model_type": self._hub_model_type(),
            "format_version": FORMAT_VERSION,
            "vqlib_version": _vqlib_version(),
            "init_args": init_args,
        }

    def model_card(self, repo_id: str | None = None) -> str:
        """Model card text from ``model_cards/tokenizer_card.md`` (a built-in fallback when not installed)."""
        template = CARD_TEMPLATE.read_text(encoding="utf-8") if CARD_TEMPLATE.is_file() else _FALLBACK_CARD
        cfg = self.hub_config()
        quantizer = getattr(self, "quantizer", None)
        fields = {
            "model_type": cfg["model_type"],
            "repo_id": repo_id or "path/to/folder",
            "quantizer_class": cfg["init_args"].get("quantizer", {}).get("class_path", "none"),
            "codebook_size": str(quantizer.codebook_size) if isinstance(quantizer, Quantizer) else "n/a",
            "config_json": json.dumps(cfg, indent=2),
            "vqlib_version": cfg["vqlib_version"],
            "num_parameters": f"{sum(p.numel() for p in self.parameters()):,}",  # type: ignore[attr-defined]
        }
        fields.update(self._model_card_fields())
        return string.Template(template).safe_substitute(fields)

    # -- save --------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, *, repo_id: str | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``folder``.

        A new folder appears complete or not at all (written in a temporary sibling, then renamed). Into an
        existing folder each file is written under a temporary name and renamed over the old one; other
        files there are left alone.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"save_pretrained: {folder} exists and is not a folder")
        config_text = json.dumps(self.hub_config(), indent=2, sort_keys=False)
        card_text = self.model_card(repo_id)
        state = _detached_state_dict(self)  # type: ignore[arg-type]
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
            (tmp / CARD_NAME).write_text(card_text, encoding="utf-8")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "vqlib"})
            if not folder.exists():
                try:
                    os.rename(tmp, folder)
                    return folder
                except OSError:
                    if not folder.is_dir():  # lost a race or cross-device: fall through to per-file replace
                        raise
            for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
                staged = folder / f".{name}.{uuid.uuid4().hex}.tmp"
                shutil.move(str(tmp / name), staged)
                os.replace(staged, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    # -- load --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder_or_repo_id: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ):
        """Load from a local folder written by :meth:`save_pretrained`, or download a Hub repo id first."""
        folder = cls._resolve_folder(folder_or_repo_id, revision, cache_dir, token, local_files_only)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is missing {', '.join(missing)}; a saved vqlib model folder holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by save_pretrained or `vqlib-train export`)"
            )
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        init_args = cls._check_config(cfg, config_path)
        if isinstance(init_args.get("quantizer"), dict):
            init_args["quantizer"] = quantizer_from_config(init_args["quantizer"])
        model = cls._from_hub_config(init_args)
        state = load_file(str(weights_path), device=str(map_location))
        model._load_checked_state(state, weights_path)
        return model.to(map_location).eval()

    @classmethod
    def _resolve_folder(cls, name, revision, cache_dir, token, local_files_only) -> Path:
        path = Path(os.path.expanduser(str(name)))
        if path.is_dir():
            return path
        if path.exists():
            raise NotADirectoryError(f"{cls.__name__}.from_pretrained: {path} is a file, expected a model folder")
        if isinstance(name, os.PathLike) or _looks_like_local_path(str(name)):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: folder {path} does not exist")
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                str(name),
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
                library_name="vqlib",
                library_version=_vqlib_version(),
            )
        except Exception as e:  # network, auth, not found: say which name was tried both ways
            raise OSError(
                f"{cls.__name__}.from_pretrained: {name!r} is not a local folder and could not be fetched "
                f"from the Hugging Face Hub ({type(e).__name__}: {e})"
            ) from e
        return Path(local)

    @classmethod
    def _check_config(cls, cfg: Any, config_path: Path) -> dict[str, Any]:
        if not isinstance(cfg, dict) or "init_args" not in cfg or "model_type" not in cfg:
            raise ValueError(f"{config_path} is not a vqlib model config (expected keys model_type, init_args)")
        version = cfg.get("format_version")
        if not isinstance(version, int):
            raise ValueError(f"{config_path}: format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {version}, newer than this vqlib supports ({FORMAT_VERSION}); "
                f"it was written by vqlib {cfg.get('vqlib_version', '?')}: upgrade vqlib to load it"
            )
        expected = cls._hub_model_type()
        if cfg["model_type"] != expected:
            raise ValueError(
                f"{config_path} describes a {cfg['model_type']!r}, not a {expected!r}; "
                f"load it with vqlib.models.{cfg['model_type']}.from_pretrained"
            )
        if not isinstance(cfg["init_args"], dict):
            raise ValueError(f"{config_path}: init_args must be an object, got {type(cfg['init_args']).__name__}")
        return dict(cfg["init_args"])

    def _load_checked_state(self, state: dict[str, Tensor], weights_path: Path) -> None:
        expected = self.state_dict()  # type: ignore[attr-defined]
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensors (e.g. {missing[:5]})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:5]})")
            if mismatched:
                parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:5]})")
            raise ValueError(
                f"{weights_path} does not match the model built from {CONFIG_NAME}: " + "; ".join(parts)
            )
        self.load_state_dict(state, strict=True)  # type: ignore[attr-defined]

    # -- publish -----------------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload vqlib tokenizer",
        create_pr: bool = False,
    ):
        """Save into a temporary folder (config, weights, model card) and upload it with ``HfApi.upload_folder``."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", repo_id=repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )
