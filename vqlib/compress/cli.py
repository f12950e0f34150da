"""``vqlib-compress``: compress a model's linear layers from the command line.

    vqlib-compress MODEL OUTPUT [--config cfg.yaml] [--algorithm calibrated] [--vector-dim 4] ...
        [--calibration-text sentences.txt | --calibration pkg.module:make_batches]

MODEL is a Hugging Face model folder (loaded with transformers' AutoModel) or an importable
factory ``pkg.module:function`` returning an nn.Module. Every VQConfig field is a flag
(``--vector-dim``, ``--skip-modules lm_head 'encoder.*.output*'``, ``--group-size none`` ...);
flags override the config file. Prints a per-layer progress bar on stderr and the summary table
on stdout, then writes OUTPUT with ``save_compressed``: config.json + model.safetensors + README.md, a model card
filled from the compression report (bits per weight, sizes, layer errors, time) and, with ``--metrics-json``, the
user's own evaluation (e.g. ``{"perplexity": 6.1}``). ``--repo-id OWNER/NAME --push-to-hub`` uploads it.
Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import compress
from .config import VQConfig, saved_fields
from .io import save_compressed

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _import_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} from {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def load_model(spec: str) -> nn.Module:
    """A Hugging Face model folder, or ``pkg.module:factory``."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec}: a model folder must hold a Hugging Face config.json")
        try:
            from transformers import AutoModel
        except ImportError as exc:
            raise ValueError(f"loading a model folder needs transformers (pip install 'vqlib[bench]'): {exc}") from exc
        return AutoModel.from_pretrained(str(path))
    if ":" not in spec:
        raise ValueError(f"MODEL {spec!r} is neither an existing folder nor 'package.module:factory'")
    model = _import_object(spec)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def text_batches(model_path: str, text_file: str, batch_size: int) -> list[dict]:
    """Tokenized batches (with attention masks) from a text file, one sample per non-empty line."""
    if not Path(model_path).is_dir():
        raise ValueError("--calibration-text needs MODEL to be a Hugging Face folder with a tokenizer")
    from transformers import AutoTokenizer

    lines = [line.strip() for line in Path(text_file).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calibration-text {text_file}: no non-empty lines")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [
        dict(tokenizer(lines[i : i + batch_size], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(lines), batch_size)
    ]


def _field_parser(f: dataclasses.Field, hint: Any):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if "choices" in f.metadata:  # looked up when the parser is built (e.g. the registered algorithms)
        return dict(choices=list(f.metadata["choices"]()))
    if hint is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if origin is typing.Literal:
        return dict(choices=list(args))
    if origin in (list, typing.Union) or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if inner and typing.get_origin(inner[0]) is list or origin is list:
            return dict(nargs="*", metavar="PATTERN")
        base = inner[0]

        def optional(text: str, base=base):
            return None if text.lower() == "none" else base(text)

        return dict(type=optional, metavar=f"{base.__name__.upper()}|none")
    return dict(type=hint, metavar=hint.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqlib-compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="Hugging Face model folder or 'package.module:factory'")
    parser.add_argument("output", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--config", help="VQConfig as .json or .yaml (flags override it)")
    parser.add_argument("--calibration", help="'package.module:function' returning a list of batches")
    parser.add_argument("--calibration-text", help="text file, one calibration sample per line (HF models)")
    parser.add_argument("--calibration-batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto", help="cast the model first")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--report-json", help="also write the report as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    card = parser.add_argument_group("model card and Hub")
    card.add_argument("--base-model", help="Hub id of the original model (card metadata base_model)")
    card.add_argument("--metrics-json", help='JSON file of your own evaluation, e.g. {"perplexity": 6.1}')
    card.add_argument("--license", help="license id for the card metadata, e.g. apache-2.0")
    card.add_argument("--repo-id", help="Hub repo id OWNER/NAME (used in the card's usage snippet)")
    card.add_argument("--push-to-hub", action="store_true", help="upload OUTPUT to --repo-id")
    group = parser.add_argument_group("VQConfig fields (see vqlib.compress.VQConfig)")
    hints = typing.get_type_hints(VQConfig)
    for f in saved_fields():
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg_{f.name}",
            default=argparse.SUPPRESS,
            **_field_parser(f, hints[f.name]),
        )
    return parser


def config_from_args(args: argparse.Namespace) -> VQConfig:
    data: dict[str, Any] = VQConfig.from_file(args.config).to_dict() if args.config else {}
    for f in saved_fields():
        if hasattr(args, f"cfg_{f.name}"):  # given on the command line (defaults are suppressed)
            data[f.name] = getattr(args, f"cfg_{f.name}")
    return VQConfig.from_dict(data)


def _read_metrics(path: str | None) -> dict[str, float] | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--metrics-json {path}: expected a JSON object of numbers: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"--metrics-json {path}: expected a JSON object of numbers, got {data!r:.200}")
    return data


def _factory_usage(spec: str, repo: str) -> str | None:
    """For ``pkg.module:factory`` models, a snippet that rebuilds the skeleton with the same factory."""
    if Path(spec).is_dir() or ":" not in spec:
        return None  # a transformers folder: the card's default snippet uses transformers
    module, _, fn = spec.partition(":")
    return f"import vqlib\nfrom {module} import {fn}\n\nmodel = vqlib.load_compressed({repo!r}, {fn})"


def _print_card_metrics(card_path: Path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    print("model card metrics:")
    for r in card.data.eval_results or []:
        print(f"  {r.metric_name or r.metric_type:<40} {r.metric_value:.6g}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.calibration and args.calibration_text:
            raise ValueError("give either --calibration or --calibration-text, not both")
        if Path(args.output).exists() and not args.overwrite:
            raise ValueError(f"{args.output} already exists (pass --overwrite to replace it)")
        model = load_model(args.model)
        if args.dtype != "auto":
            model = model.to(_DTYPES[args.dtype])
        calibration = None
        if args.calibration:
            calibration = _import_object(args.calibration)()
        elif args.calibration_text:
            calibration = text_batches(args.model, args.calibration_text, args.calibration_batch_size)
        user_metrics = _read_metrics(args.metrics_json)
        if args.push_to_hub and not args.repo_id:
            raise ValueError("--push-to-hub needs --repo-id OWNER/NAME")
        model, report = compress(model, cfg, calibration=calibration, progress=not args.quiet)
        repo = args.repo_id or str(Path(args.output).resolve())
        out = save_compressed(
            model,
            args.output,
            config=cfg,
            overwrite=args.overwrite,
            report=report,
            base_model=args.base_model,
            metrics=user_metrics,
            license=args.license,
            repo_id=repo,
            usage=_factory_usage(args.model, repo),
            push_to_hub=args.push_to_hub,
        )
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"vqlib-compress: error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"saved to {out} (config.json, model.safetensors, README.md model card)")
    _print_card_metrics(out / "README.md")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.repo_id}")
    else:
        print(
            f"publish it: huggingface_hub.upload_folder(repo_id='OWNER/NAME', folder_path='{out}')  "
            "(or rerun with --repo-id OWNER/NAME --push-to-hub)"
        )
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
