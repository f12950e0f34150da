"""Saving and loading compressed models: one ``model.safetensors`` plus ``config.json``.

``config.json`` follows the transformers convention: the model's own config (when it has a
``config.to_dict()``) with a ``quantization_config`` entry:

    {"quant_method": "vqlib", "format_version": 1, "vqlib_version": "...",
     "modules": {"<qualified name>": {"layer_type": "VQLinear" | "ScalarLinear", ...constructor args}},
     "files": {"model.safetensors": {"bytes": N, "sha256": "..."}},
     "compress_config": {...VQConfig fields, when given}}

Only safetensors and JSON are ever read. Saving writes a temporary sibling folder and renames it,
so a failure never leaves a half-written output folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import VQConfig
from .format import FORMAT_VERSION, VQLinear, unpack_codes
from .scalar import ScalarLinear

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_LAYER_TYPES: dict[str, type[nn.Module]] = {"VQLinear": VQLinear, "ScalarLinear": ScalarLinear}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def _compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, (VQLinear, ScalarLinear))}


def _state_for_safetensors(model: nn.Module) -> dict[str, Tensor]:
    """State dict with every tensor contiguous, on CPU and owning its storage (safetensors refuses shared memory)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _output_layer_compressed(model: nn.Module) -> bool:
    """Whether a transformers model's output embedding (``lm_head``) is a compressed layer."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        out = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return False
    return isinstance(out, (VQLinear, ScalarLinear))


def _uncompressed_dtype(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Dtype name of the first floating parameter outside the compressed layers (e.g. the embedding)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and name.rpartition(".")[0] not in modules:
            return str(p.dtype).removeprefix("torch.")
    return None


def save_compressed(
    model: nn.Module, path: str | os.PathLike, *, config: VQConfig | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` (with its VQLinear / ScalarLinear layers) to the folder ``path`` atomically."""
    from safetensors.torch import save_file

    import vqlib

    path = Path(path)
    modules = _compressed_modules(model)
    if not modules:
        raise ValueError("save_compressed: the model has no VQLinear/ScalarLinear layers; run vqlib.compress first")
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_compressed: {path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like mkdir's
        weights = tmp / WEIGHTS_NAME
        save_file(_state_for_safetensors(model), str(weights), metadata={"format": "pt", "quant_method": "vqlib"})
        quant = {
            "quant_method": "vqlib",
            "format_version": FORMAT_VERSION,
            "vqlib_version": vqlib.__version__,
            "modules": {name: m.format_spec() for name, m in modules.items()},
            "files": {WEIGHTS_NAME: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}},
        }
        if config is not None:
            quant["compress_config"] = config.to_dict()
        model_config = getattr(model, "config", None)
        data: dict[str, Any] = {}
        if model_config is not None and callable(getattr(model_config, "to_dict", None)):
            data.update(json.loads(json.dumps(model_config.to_dict(), default=str)))
        if data.get("tie_word_embeddings") and _output_layer_compressed(model):
            # compress replaced the output layer and left the input embedding as it was: the tie is
            # broken, and transformers must not re-tie them when it loads this folder.
            data["tie_word_embeddings"] = False
        if model_config is not None and data.get("dtype") is None and data.get("torch_dtype") is None:
            # Without it transformers' dtype="auto" takes the first float tensor in the file, which can be
            # an fp16 codebook, and would load the rest of an fp32 model in fp16.
            data["dtype"] = _uncompressed_dtype(model, modules)
        data["quantization_config"] = quant
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        for f in (weights, tmp / CONFIG_NAME):
            os.chmod(f, 0o666 & ~umask)
        _fsync_dir(tmp)
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, backup / "old")
            os.rename(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``config.json`` of a saved folder; return its ``quantization_config``."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"load_compressed: {path} is not a folder written by save_compressed")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"load_compressed: {cfg_file} is missing")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_compressed: {cfg_file} is not valid JSON (truncated or corrupt?): {exc}") from exc
    quant = data.get("quantization_config") if isinstance(data, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "vqlib":
        raise ValueError(f"load_compressed: {cfg_file} has no quantization_config with quant_method 'vqlib'")
    version = quant.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"load_compressed: invalid format_version {version!r} in {cfg_file}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"load_compressed: {path} uses format version {version}, newer than the version this vqlib "
            f"reads ({FORMAT_VERSION}); upgrade vqlib (saved by vqlib {quant.get('vqlib_version', '?')})"
        )
    for key in ("modules", "files"):
        if not isinstance(quant.get(key), dict):
            raise ValueError(f"load_compressed: quantization_config.{key} is missing or not a mapping in {cfg_file}")
    return quant


def _check_file(path: Path, expected: dict[str, Any]) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"load_compressed: {path} is missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise ValueError(
            f"load_compressed: {path} has {size} bytes, expected {expected.get('bytes')} (truncated or corrupt file)"
        )
    if _sha256(path) != expected.get("sha256"):
        raise ValueError(f"load_compressed: {path} does not match its recorded sha256 (corrupt file)")


def _check_layer_tensors(name: str, module: nn.Module, state: dict[str, Tensor]) -> None:
    """Code values must address existing codebook entries / levels."""
    prefix = f"{name}." if name else ""
    if isinstance(module, VQLinear):
        codes = state[prefix + "codes"]
        if codes.numel() and int(unpack_codes(codes).max()) >= module.codebook_size:
            raise ValueError(f"load_compressed: {prefix}codes has values >= codebook size {module.codebook_size} (corrupt)")
    elif isinstance(module, ScalarLinear):
        zeros = state[prefix + "zeros"]
        if zeros.numel() and int(zeros.max()) >= 2**module.bits:
            raise ValueError(f"load_compressed: {prefix}zeros has values >= 2**{module.bits} (corrupt)")


def replace_with_compressed_layers(
    model: nn.Module, modules: dict[str, Any], caller: str = "load_compressed"
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Swap the nn.Linear layers named in ``modules`` (the saved per-module specs) for empty
    compressed layers on the meta device; return (model, {name: new layer}). Shared by
    ``load_compressed`` and the transformers quantizer (``vqlib.compress.hf_quantizer``)."""
    built: dict[str, nn.Module] = {}
    for name, spec in modules.items():
        if not isinstance(spec, dict) or spec.get("layer_type") not in _LAYER_TYPES:
            raise ValueError(f"{caller}: module {name!r} has an unknown layer_type in the saved config")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{caller}: the skeleton has no module {name!r} (mismatched skeleton)") from None
        if isinstance(old, (VQLinear, ScalarLinear)) and old.format_spec() == spec:
            built[name] = old
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(
                f"{caller}: skeleton module {name!r} is a {type(old).__name__}, expected nn.Linear (mismatched skeleton)"
            )
        if (old.out_features, old.in_features, old.bias is not None) != (
            spec.get("out_features"),
            spec.get("in_features"),
            spec.get("bias"),
        ):
            raise ValueError(
                f"{caller}: skeleton module {name!r} is Linear({old.in_features}, {old.out_features}, "
                f"bias={old.bias is not None}) but the saved layer is ({spec.get('in_features')}, "
                f"{spec.get('out_features')}, bias={spec.get('bias')}) (mismatched skeleton)"
            )
        try:
            new = _LAYER_TYPES[spec["layer_type"]].from_spec(spec, device="meta")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{caller}: invalid saved spec for module {name!r}: {exc}") from exc
        built[name] = new
        if name == "":
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model, built


def load_compressed(
    path: str | os.PathLike,
    skeleton_or_factory: nn.Module | Callable[[], nn.Module],
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a compressed model saved by ``save_compressed``.

    ``skeleton_or_factory``: the uncompressed architecture (any weights, may live on the meta
    device) or a callable returning it. Its nn.Linear layers named in the saved config are replaced
    by compressed layers and every tensor is loaded from the safetensors file (the saved dtypes
    win); the skeleton must match the saved model exactly, or a ValueError says where it differs.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    quant = read_quantization_config(path)
    weights = path / WEIGHTS_NAME
    _check_file(weights, quant["files"].get(WEIGHTS_NAME, {}))
    if isinstance(skeleton_or_factory, nn.Module):
        model = skeleton_or_factory
    elif callable(skeleton_or_factory):
        model = skeleton_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_compressed: the factory returned {type(model).__name__}, expected an nn.Module")
    else:
        raise TypeError(
            f"load_compressed: expected an nn.Module skeleton or a factory, got {type(skeleton_or_factory).__name__}"
        )
    # Remember tied parameters so the ties survive loading by assignment.
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)

    model, built = replace_with_compressed_layers(model, quant["modules"])

    try:
        state = load_file(str(weights), device=str(torch.device(device)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"load_compressed: cannot read {weights} (corrupt file): {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"load_compressed: the skeleton does not match the saved model (mismatched skeleton): "
            f"missing from file {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"not in skeleton {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"load_compressed: tensor {key!r} has shape {tuple(t.shape)} in the file but "
                f"{tuple(expected[key].shape)} in the skeleton (mismatched skeleton)"
            )
        if key.rpartition(".")[0] in built and t.dtype != expected[key].dtype and key.rpartition(".")[2] != "bias":
            raise ValueError(f"load_compressed: tensor {key!r} has dtype {t.dtype}, the format needs {expected[key].dtype}")
    for name, module in built.items():
        _check_layer_tensors(name, module, state)
    model.load_state_dict(state, strict=True, assign=True)
    existing = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for names in tied.values():
        names = [n for n in names if n in existing]
        if len(names) > 1:
            first = model.get_parameter(names[0])
            for other in names[1:]:
                parent_name, _, attr = other.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, first)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(
            f"load_compressed: {left[:5]} are not in the saved file and the skeleton holds them on the meta "
            "device (non-persistent buffers?); build the skeleton on a real device instead"
        )
    return model.to(device).eval()
