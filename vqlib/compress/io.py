"""Saving and loading compressed models: one ``model.safetensors`` plus ``config.json`` (+ ``README.md`` card).

``config.json`` follows the transformers convention: the model's own config (when it has a
``config.to_dict()``) with a ``quantization_config`` entry:

    {"quant_method": "vqlib", "format_version": 1, "vqlib_version": "...",
     "modules": {"<qualified name>": {"layer_type": "VQLinear" | "ScalarLinear", ...constructor args}},
     "uncompressed_modules": ["<nn.Linear layers left as they were>", ...],
     "files": {"model.safetensors": {"bytes": N, "sha256": "..."}},
     "compress_config": {...VQConfig fields, when given}}

Only safetensors and JSON are ever read. Files are written and read through :mod:`vqlib.serialization`
(shared with the tokenizers): a temporary sibling folder renamed into place, so a failure never leaves a
half-written output folder behind. ``load_compressed`` also takes a Hub repo id (all files at one commit,
recorded as ``model.hub_commit``); ``save_compressed(..., push_to_hub=True)`` / :func:`push_to_hub` publish.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vqlib import cards
from vqlib import serialization as ser

from .config import VQConfig
from .format import FORMAT_VERSION, VQLinear, unpack_codes
from .scalar import ScalarLinear

WEIGHTS_NAME = ser.WEIGHTS_NAME
CONFIG_NAME = ser.CONFIG_NAME
CARD_NAME = ser.CARD_NAME
_LAYER_TYPES: dict[str, type[nn.Module]] = {"VQLinear": VQLinear, "ScalarLinear": ScalarLinear}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, (VQLinear, ScalarLinear))}


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


def _model_config_dict(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[dict[str, Any], bool]:
    """The model's own config (transformers convention), fixed up for loading; (dict, has_config)."""
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
    return data, model_config is not None


def _quantization_config(model: nn.Module, modules: dict[str, nn.Module], weights: Path, config: VQConfig | None):
    import vqlib

    quant: dict[str, Any] = {
        "quant_method": "vqlib",
        "format_version": FORMAT_VERSION,
        "vqlib_version": vqlib.__version__,
        "modules": {name: m.format_spec() for name, m in modules.items()},
        "uncompressed_modules": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear),
        "files": {WEIGHTS_NAME: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}},
    }
    if config is not None:
        quant["compress_config"] = config.to_dict()
    return quant


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: VQConfig | None = None,
    overwrite: bool = False,
    report: Any = None,
    card: bool | None = None,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    usage: str | None = None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    **push_kwargs: Any,
) -> Path:
    """Write ``model`` (with its VQLinear / ScalarLinear layers) to the folder ``path`` atomically.

    A ``README.md`` model card is written when ``card=True``, when ``report`` (the ``CompressionReport`` of
    ``compress``) or ``metrics`` (the user's own evaluation, e.g. ``{"perplexity": 6.1}``) is given, and
    always with ``push_to_hub=True``, which then uploads the folder to ``repo_id`` (``push_kwargs``:
    ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``). ``base_model``: the Hub id of
    the original (default: the model config's ``_name_or_path`` when that is a repo id)."""
    path = Path(path)
    modules = _compressed_modules(model)
    if not modules:
        raise ValueError("save_compressed: the model has no VQLinear/ScalarLinear layers; run vqlib.compress first")
    if push_to_hub and not repo_id:
        raise ValueError("save_compressed(push_to_hub=True) needs repo_id='owner/name'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_compressed: {path} already exists (pass overwrite=True to replace it)")
    data, _ = _model_config_dict(model, modules)
    state = ser.state_for_safetensors(model)

    def write_config(target: Path) -> None:
        data["quantization_config"] = _quantization_config(model, modules, target.parent / WEIGHTS_NAME, config)
        target.write_text(json.dumps(data, indent=2, sort_keys=True))

    writers = {
        WEIGHTS_NAME: lambda p: ser.save_safetensors(state, p, {"format": "pt", "quant_method": "vqlib"}),
        CONFIG_NAME: write_config,
    }
    if card or report is not None or metrics or push_to_hub:
        writers[CARD_NAME] = lambda p: p.write_text(
            str(
                compressed_card(
                    model, data, repo_id or str(path.resolve()), report, base_model, metrics, license, usage
                )
            ),
            encoding="utf-8",
        )
    out = ser.write_folder(path, writers, replace="folder")
    if push_to_hub:
        ser.push_folder(out, repo_id, **push_kwargs)  # type: ignore[arg-type]
    return out


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    config: VQConfig | None = None,
    report: Any = None,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    usage: str | None = None,
    revision: str | None = None,
    branch: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload vqlib compressed model",
    create_pr: bool = False,
):
    """Save ``model`` with its card into a temporary folder and upload it; returns huggingface_hub's CommitInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_compressed(
            model,
            Path(tmp) / "model",
            config=config,
            report=report,
            card=True,
            base_model=base_model,
            metrics=metrics,
            license=license,
            usage=usage,
            repo_id=repo_id,
        )
        return ser.push_folder(
            folder,
            repo_id,
            token=token,
            private=private,
            revision=revision or branch,
            commit_message=commit_message,
            create_pr=create_pr,
        )


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``config.json`` of a saved folder; return its ``quantization_config``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_compressed: {path} is not a folder written by save_compressed")
    data = ser.read_json_config(path, "load_compressed")
    cfg_file = path / CONFIG_NAME
    quant = data.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "vqlib":
        raise ValueError(f"load_compressed: {cfg_file} has no quantization_config with quant_method 'vqlib'")
    ser.check_format_version(
        quant.get("format_version"), FORMAT_VERSION, str(path), quant.get("vqlib_version"), "load_compressed"
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
            raise ValueError(
                f"load_compressed: {prefix}codes has values >= codebook size {module.codebook_size} (corrupt)"
            )
    elif isinstance(module, ScalarLinear):
        zeros = state[prefix + "zeros"]
        if zeros.numel() and int(zeros.max()) >= 2**module.bits:
            raise ValueError(f"load_compressed: {prefix}zeros has values >= 2**{module.bits} (corrupt)")


def _check_skeleton_linear(name: str, old: nn.Module, spec: dict[str, Any], caller: str) -> None:
    """The skeleton's layer must be the nn.Linear the saved layer was made from."""
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
        _check_skeleton_linear(name, old, spec, caller)
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
    repo_id_or_path: str | os.PathLike,
    skeleton_or_factory: nn.Module | Callable[[], nn.Module],
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Rebuild a compressed model saved by ``save_compressed`` from a folder or a Hub repo id.

    A repo id is downloaded with every file at the one commit ``revision`` resolves to (huggingface_hub's
    cache, ``local_files_only`` / ``HF_HUB_OFFLINE=1`` read only the cache); the model records it as
    ``model.hub_commit`` (None for a local folder).

    ``skeleton_or_factory``: the uncompressed architecture (any weights, may live on the meta
    device) or a callable returning it. Its nn.Linear layers named in the saved config are replaced
    by compressed layers and every tensor is loaded from the safetensors file (the saved dtypes
    win); the skeleton must match the saved model exactly, or a ValueError says where it differs.
    """
    res = ser.resolve_folder(
        repo_id_or_path,
        caller="load_compressed",
        files=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        token=token,
        local_files_only=local_files_only,
    )
    quant = read_quantization_config(res.folder)
    weights = res.folder / WEIGHTS_NAME
    _check_file(weights, quant["files"].get(WEIGHTS_NAME, {}))
    model = _resolve_skeleton(skeleton_or_factory)
    tied = _tied_parameters(model)  # before the swap: loading by assignment unties them
    model, built = replace_with_compressed_layers(model, quant["modules"])
    state = ser.load_safetensors(weights, device, "load_compressed")
    _check_state(model.state_dict(), built, state)
    model.load_state_dict(state, strict=True, assign=True)
    _restore_ties(model, tied)
    _check_no_meta_tensors(model)
    model = model.to(device).eval()
    model.hub_repo_id, model.hub_commit = res.repo_id, res.commit
    return model


def _resolve_skeleton(skeleton_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The skeleton module itself, or what the factory returns."""
    if isinstance(skeleton_or_factory, nn.Module):
        return skeleton_or_factory
    if not callable(skeleton_or_factory):
        raise TypeError(
            f"load_compressed: expected an nn.Module skeleton or a factory, got {type(skeleton_or_factory).__name__}"
        )
    model = skeleton_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_compressed: the factory returned {type(model).__name__}, expected an nn.Module")
    return model


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Every parameter's names (several for a tied one), so the ties survive loading by assignment."""
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    return list(tied.values())


def _check_state(expected: dict[str, Tensor], built: dict[str, nn.Module], state: dict[str, Tensor]) -> None:
    """The file's tensors must be the skeleton's (after the swap) by name and shape, hold the dtypes
    the compressed format needs, and codes that address existing entries."""
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
        owner, _, leaf = key.rpartition(".")
        if owner in built and t.dtype != expected[key].dtype and leaf != "bias":
            raise ValueError(
                f"load_compressed: tensor {key!r} has dtype {t.dtype}, the format needs {expected[key].dtype}"
            )
    for name, module in built.items():
        _check_layer_tensors(name, module, state)


def _restore_ties(model: nn.Module, tied: list[list[str]]) -> None:
    """Point every name of a parameter that was tied in the skeleton at one loaded tensor again."""
    existing = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for names in tied:
        names = [n for n in names if n in existing]  # a swapped-out layer's weight is gone
        if len(names) > 1:
            first = model.get_parameter(names[0])
            for other in names[1:]:
                parent_name, _, attr = other.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, first)


def _check_no_meta_tensors(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(
            f"load_compressed: {left[:5]} are not in the saved file and the skeleton holds them on the meta "
            "device (non-persistent buffers?); build the skeleton on a real device instead"
        )


def compressed_card(
    model: nn.Module,
    config_data: dict[str, Any],
    repo_id: str | None,
    report: Any = None,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    usage: str | None = None,
):
    """The ``ModelCard`` of a compressed model from ``model_cards/compressed_card.md`` and the report."""
    quant = config_data["quantization_config"]
    modules = quant["modules"]
    base_model = base_model or _hub_name(config_data.get("_name_or_path"))
    params = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[0] not in modules) + sum(
        s["in_features"] * s["out_features"] + (s["out_features"] if s.get("bias") else 0) for s in modules.values()
    )
    picked, kinds, rep = cards.compressed_metrics(report or {}, params, metrics)
    repo = repo_id or "path/to/folder"
    arch = (config_data.get("architectures") or [None])[0]
    formats = sorted({_format_name(s) for s in modules.values()})
    skipped = quant.get("uncompressed_modules", [])
    return cards.render(
        "compressed_card.md",
        model_name=repo.rpartition("/")[2],
        metrics=picked,
        task_type="text-generation" if arch and arch.endswith("ForCausalLM") else "other",
        dataset=None,
        dataset_name="calibration data" if "output" in kinds else "weights (data-free)",
        license=license,
        tags=["quantized", "vector-quantization"],
        pipeline_tag="text-generation" if arch and arch.endswith("ForCausalLM") else None,
        base_model=base_model,
        n_compressed=len(modules),
        formats=", ".join(formats),
        n_skipped=len(skipped),
        skipped_note=f" ({', '.join(skipped[:8])}{', ...' if len(skipped) > 8 else ''})" if skipped else "",
        bpw_layers=_fmt(picked, "bits_per_weight_compressed_layers"),
        bpw_model=_fmt(picked, "bits_per_parameter_whole_model"),
        size_before=_fmt(picked, "size_mib_original", " MiB"),
        size_after=_fmt(picked, "size_mib_compressed", " MiB"),
        vqlib_version=quant["vqlib_version"],
        usage=usage or _usage(repo, arch),
        error_note=cards.error_note(kinds),
        eval_note=" and in the user's evaluation listed" if metrics else "",
        compress_config=cards.dumps(quant.get("compress_config") or rep.get("config") or {}),
    )


def _hub_name(name: Any) -> str | None:
    """``_name_or_path`` when it names a Hub repo (not a local folder)."""
    if not isinstance(name, str) or not name or os.path.exists(name) or ser.looks_like_local_path(name):
        return None
    return name if "/" in name else None


def _format_name(spec: dict[str, Any]) -> str:
    if spec["layer_type"] == "VQLinear":
        return f"VQ d{spec['vector_dim']} {spec['num_codebooks']}x{spec['codebook_bits']} bits"
    return f"int{spec.get('bits', '?')}"


def _fmt(picked: dict[str, tuple[str, float]], key: str, unit: str = "") -> str:
    return f"{picked[key][1]:.4g}{unit}" if key in picked else "not measured"


def _usage(repo: str, arch: str | None) -> str:
    if arch:
        return (
            f"import vqlib  # registers quant_method 'vqlib' with transformers\nimport transformers\n\n"
            f"model = transformers.{arch}.from_pretrained({repo!r})"
        )
    return (
        "import vqlib\n\n# make_skeleton(): returns the uncompressed architecture (any weights, may be on 'meta')\n"
        f"model = vqlib.load_compressed({repo!r}, make_skeleton)"
    )
