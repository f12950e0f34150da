"""``vqlib-train``: LightningCLI for tokenizer training, plus ``export``.

    vqlib-train fit --config training/configs/image_tiny.yaml
    vqlib-train validate --config CONFIG --ckpt_path CKPT        (also test / predict, --print_config)
    vqlib-train export --ckpt_path CKPT [--config CONFIG] --out FOLDER

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule, e.g.
``vqlib.training.ImageTokenizerModule`` + ``vqlib.training.EmbeddedImageDataModule``). Multi-GPU and
multi-node runs use Lightning's DDP strategy: ``--trainer.strategy ddp --trainer.devices 8 --trainer.num_nodes 2``.

``export`` rebuilds the module from the run's config (default: the ``config.yaml`` Lightning saved in the run's
log folder, the parent of the ``checkpoints/`` folder), loads the checkpoint's ``state_dict`` with
``torch.load(weights_only=True)`` (no arbitrary unpickling), and writes the module's ``tokenizer`` attribute
with ``save_pretrained``: config.json + model.safetensors + README.md, loadable by
``ImageTokenizer.from_pretrained(folder)`` (or the audio tokenizer's ``from_pretrained``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

CONFIG_NAMES = ("config.yaml", "config.yml")


def run_cli(args: Sequence[str] | None = None, *, run: bool = True):
    """The LightningCLI (returns it; ``run=False`` only instantiates model, data and trainer)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "Train vqlib tokenizers (LightningCLI). Also: `vqlib-train export --ckpt_path CKPT "
            "[--config CONFIG] --out FOLDER` writes a trained tokenizer for from_pretrained."
        },
        args=None if args is None else list(args),
        run=run,
    )


def find_run_config(ckpt_path: Path) -> Path:
    """The config.yaml LightningCLI saved for the run that wrote ``ckpt_path`` (``<log_dir>/checkpoints/x.ckpt``)."""
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"no --config given and no config.yaml found beside {ckpt_path} or in {ckpt_path.parent.parent}; "
        "pass the training config with --config"
    )


def build_model_from_config(config_path: Path):
    """Instantiate only the ``model`` section of a LightningCLI config (no trainer, no data)."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    if not config_path.is_file():
        raise FileNotFoundError(f"config {config_path} does not exist")
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if "model" not in cfg:
        raise ValueError(f"{config_path} has no 'model' section (expected a vqlib-train / LightningCLI config)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=LightningModule, required=True)
    parsed = parser.parse_object({"model": cfg["model"]})
    return parser.instantiate_classes(parsed).model


def load_checkpoint_state(ckpt_path: Path) -> dict:
    import pickle

    import torch

    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{ckpt_path} holds objects beyond tensors and plain containers, which export refuses to unpickle "
            f"(weights_only loading): {e}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt["state_dict"]


def export(ckpt_path: str | Path, out: str | Path, config: str | Path | None = None) -> Path:
    """Checkpoint -> ``out`` folder with the module's ``tokenizer`` saved by ``save_pretrained``."""
    ckpt_path = Path(ckpt_path)
    config_path = Path(config) if config is not None else find_run_config(ckpt_path)
    module = build_model_from_config(config_path)
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"{type(module).__name__} has no 'tokenizer' attribute with save_pretrained; export needs a vqlib "
            "tokenizer LightningModule (e.g. vqlib.training.ImageTokenizerModule)"
        )
    state = load_checkpoint_state(ckpt_path)
    result = module.load_state_dict(state, strict=False)
    tok_missing = [k for k in result.missing_keys if k.startswith("tokenizer.")]
    if tok_missing or result.unexpected_keys:
        raise ValueError(
            f"{ckpt_path} does not match the model built from {config_path}: missing {tok_missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return tokenizer.save_pretrained(out)


def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vqlib-train export",
        description="Write a trained tokenizer as config.json + model.safetensors (+ README.md model card).",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint written by vqlib-train fit")
    parser.add_argument("--config", default=None, help="training config (default: the run's saved config.yaml)")
    parser.add_argument("--out", required=True, help="output folder")
    ns = parser.parse_args(list(argv))
    folder = export(ns.ckpt_path, ns.out, ns.config)
    print(f"exported tokenizer to {folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        try:
            raise SystemExit(export_main(args[1:]))
        except (FileNotFoundError, ValueError, TypeError) as e:
            print(f"vqlib-train export: error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
    run_cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
