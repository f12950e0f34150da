"""``vqlib-train``: LightningCLI for tokenizer training, plus ``export``.

    vqlib-train fit --config training/configs/image_tiny.yaml
    vqlib-train validate --config CONFIG --ckpt_path CKPT        (also test / predict, --print_config)
    vqlib-train export --ckpt_path CKPT [--config CONFIG] --out FOLDER [--repo-id OWNER/NAME] [--push-to-hub]

Model and data are chosen by ``class_path`` (any LightningModule / LightningDataModule, e.g.
``vqlib.training.ImageTokenizerModule`` + ``vqlib.training.EmbeddedImageDataModule``). Multi-GPU and
multi-node runs use Lightning's DDP strategy: ``--trainer.strategy ddp --trainer.devices 8 --trainer.num_nodes 2``.

``export`` rebuilds the module from the run's config (default: the ``config.yaml`` Lightning saved in the run's
log folder, the parent of the ``checkpoints/`` folder), loads the checkpoint's ``state_dict`` with
``torch.load(weights_only=True)`` (no arbitrary unpickling), and writes the module's ``tokenizer`` attribute
with ``save_pretrained``: config.json + model.safetensors + README.md, loadable by
``ImageTokenizer.from_pretrained(folder)`` (or the audio tokenizer's ``from_pretrained``). The model card is filled
from the run: the final validation metrics ``fit`` wrote to ``<log_dir>/val_metrics.json`` (else the last
validation row of a CSVLogger's ``metrics.csv``) and the training config.

``fit`` ends by printing the final validation metrics, where the checkpoint, grids / WAVs and logs are, and the
exact ``export`` command.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_NAMES = ("config.yaml", "config.yml")
METRICS_NAME = "val_metrics.json"


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


def load_checkpoint(ckpt_path: Path) -> dict:
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
    return ckpt


def load_checkpoint_state(ckpt_path: Path) -> dict:
    return load_checkpoint(ckpt_path)["state_dict"]


def _number(value: Any) -> float | None:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


def run_metrics(ckpt_path: Path, config_path: Path) -> tuple[dict[str, float], int | None, Path | None]:
    """The run's final validation metrics: ``val_metrics.json`` (written by ``fit``) or the last validation row of
    ``metrics.csv``, beside the config or the checkpoints folder. Returns (metrics, step, file)."""
    for folder in dict.fromkeys((config_path.parent, ckpt_path.parent.parent, ckpt_path.parent)):
        if (folder / METRICS_NAME).is_file():
            data = json.loads((folder / METRICS_NAME).read_text())
            return data["metrics"], data.get("step"), folder / METRICS_NAME
        if (folder / "metrics.csv").is_file():
            with open(folder / "metrics.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if any(k.startswith("val/") and v for k, v in r.items())]
            if rows:
                merged: dict[str, float] = {}
                last_step = rows[-1].get("step")
                for r in rows:  # one validation's values can be spread over rows with the same step
                    if r.get("step") == last_step:
                        merged.update({k: float(v) for k, v in r.items() if k.startswith("val/") and v})
                return merged, int(float(last_step)) if last_step else None, folder / "metrics.csv"
    return {}, None, None


def write_run_summary(trainer) -> str:
    """After ``fit``: save the final validation metrics beside the logs and say what the run left behind."""
    metrics = {
        k: v
        for k, v in ((k, _number(v)) for k, v in trainer.callback_metrics.items())
        if k.startswith("val/") and v is not None
    }
    # The logger's own log_dir: Trainer.log_dir is a collective under DDP and this runs on rank 0 only.
    logger = trainer.logger
    log_dir = Path((getattr(logger, "log_dir", None) if logger is not None else None) or trainer.default_root_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / METRICS_NAME).write_text(json.dumps({"step": trainer.global_step, "metrics": metrics}, indent=2))
    ckpt_cb = getattr(trainer, "checkpoint_callback", None)
    ckpt = (getattr(ckpt_cb, "last_model_path", "") or getattr(ckpt_cb, "best_model_path", "")) if ckpt_cb else ""
    lines = [f"vqlib-train fit: finished at step {trainer.global_step}"]
    if metrics:
        lines += ["final validation metrics:", *(f"  {k:<28} {v:.6g}" for k, v in sorted(metrics.items()))]
    else:
        lines.append("no validation metrics were logged (no validation ran)")
    lines.append(f"logs and metrics: {log_dir} ({METRICS_NAME})")
    for sub, what in (("reconstructions", "reconstruction grids"), ("audio", "audio examples (WAV)")):
        if (log_dir / sub).is_dir():
            lines.append(f"{what}: {log_dir / sub}")
    if ckpt:
        lines.append(f"checkpoint: {ckpt}")
        lines.append(
            f"export it:  vqlib-train export --ckpt_path {ckpt} --out exported_tokenizer [--repo-id OWNER/NAME --push-to-hub]"
        )
    else:
        lines.append("no checkpoint was saved (add a ModelCheckpoint callback to export the tokenizer)")
    return "\n".join(lines)


def export(ckpt_path: str | Path, out: str | Path, config: str | Path | None = None, **card_options: Any) -> Path:
    """Checkpoint -> ``out`` folder (see :func:`export_with_card`); returns the folder."""
    return export_with_card(ckpt_path, out, config, **card_options)[0]


def export_with_card(
    ckpt_path: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    *,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    license: str | None = None,
    dataset: str | None = None,
    metrics_file: str | Path | None = None,
):
    """Checkpoint -> ``out`` folder with the module's ``tokenizer`` saved by ``save_pretrained``, its model card
    filled from the run's metrics and config. Returns (folder, card metrics, metrics source)."""
    ckpt_path = Path(ckpt_path)
    config_path = Path(config) if config is not None else find_run_config(ckpt_path)
    module = build_model_from_config(config_path)
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"{type(module).__name__} has no 'tokenizer' attribute with save_pretrained; export needs a vqlib "
            "tokenizer LightningModule (e.g. vqlib.training.ImageTokenizerModule)"
        )
    ckpt = load_checkpoint(ckpt_path)
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    tok_missing = [k for k in result.missing_keys if k.startswith("tokenizer.")]
    if tok_missing or result.unexpected_keys:
        raise ValueError(
            f"{ckpt_path} does not match the model built from {config_path}: missing {tok_missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if metrics_file is not None:
        metrics, step, source = json.loads(Path(metrics_file).read_text()), None, Path(metrics_file)
        metrics = metrics.get("metrics", metrics)
    else:
        metrics, step, source = run_metrics(ckpt_path, config_path)
    if step is not None and ckpt.get("global_step") not in (None, step):
        print(f"note: the metrics were measured at step {step}, the checkpoint is from step {ckpt['global_step']}")
    import yaml

    data_cfg = (yaml.safe_load(config_path.read_text()) or {}).get("data") or {}
    dataset = dataset or (data_cfg.get("class_path") if isinstance(data_cfg, dict) else None)
    folder = tokenizer.save_pretrained(
        out,
        repo_id=repo_id or str(Path(out).resolve()),
        push_to_hub=push_to_hub,
        metrics=metrics,
        train_config=config_path.read_text(encoding="utf-8"),
        dataset=dataset,
        license=license,
    )
    from vqlib.cards import tokenizer_metrics

    return folder, tokenizer_metrics(metrics, hasattr(tokenizer, "sample_rate")), source


def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vqlib-train export",
        description="Write a trained tokenizer as config.json + model.safetensors + README.md (model card with the "
        "run's validation metrics), optionally pushed to the Hugging Face Hub.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint written by vqlib-train fit")
    parser.add_argument("--config", default=None, help="training config (default: the run's saved config.yaml)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--repo-id", default=None, help="Hub repo id OWNER/NAME (used in the card's usage snippet)")
    parser.add_argument("--push-to-hub", action="store_true", help="upload the folder to --repo-id")
    parser.add_argument("--license", default=None, help="license id for the card metadata, e.g. apache-2.0")
    parser.add_argument("--dataset", default=None, help="training data set (a Hub dataset id goes into the metadata)")
    parser.add_argument("--metrics", default=None, help="JSON file of metrics (default: the run's val_metrics.json)")
    ns = parser.parse_args(list(argv))
    if ns.push_to_hub and not ns.repo_id:
        raise ValueError("--push-to-hub needs --repo-id OWNER/NAME")
    folder, metrics, source = export_with_card(
        ns.ckpt_path,
        ns.out,
        ns.config,
        repo_id=ns.repo_id,
        push_to_hub=ns.push_to_hub,
        license=ns.license,
        dataset=ns.dataset,
        metrics_file=ns.metrics,
    )
    print(f"exported tokenizer to {folder}")
    if metrics:
        print(f"model card metrics (from {source}):")
        for mtype, (name, value) in metrics.items():
            print(f"  {name:<40} {value:.6g}")
    else:
        print("the model card has no metrics: no val_metrics.json or metrics.csv found for this run (pass --metrics)")
    if ns.push_to_hub:
        print(f"pushed to https://huggingface.co/{ns.repo_id}")
    else:
        print(
            f"publish it: vqlib-train export --ckpt_path {ns.ckpt_path} --out {ns.out} --repo-id OWNER/NAME --push-to-hub"
            f"\n   or in Python: huggingface_hub.upload_folder(repo_id='OWNER/NAME', folder_path='{folder}')"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        try:
            raise SystemExit(export_main(args[1:]))
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            print(f"vqlib-train export: error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
    cli = run_cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    trainer = getattr(cli, "trainer", None)
    if getattr(cli, "subcommand", None) == "fit" and trainer is not None and trainer.is_global_zero:
        print(write_run_summary(trainer))


if __name__ == "__main__":
    main()
