"""Save / load / publish tokenizers as ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card).

Contract for a model class (``class MyTokenizer(HubMixin, nn.Module)``):

* ``_hub_config(self) -> dict``: the JSON-serialisable constructor arguments that rebuild the model.
  If the model has a ``quantizer`` attribute (a :class:`vqlib.Quantizer`), do *not* put it in the dict:
  the mixin stores it as ``init_args["quantizer"] = quantizer_to_config(self.quantizer)`` and rebuilds it
  with :func:`vqlib.quantizer_from_config` when loading.
* ``_from_hub_config(cls, init_args) -> instance`` (classmethod, optional): builds the model from those
  arguments (with ``init_args["quantizer"]`` already rebuilt as a Quantizer object). Default: ``cls(**init_args)``.
* ``_model_card_fields(self) -> dict[str, str]`` (optional): extra facts for the model card.

``config.json`` layout::

    {"library": "vqlib", "model_type": "ImageTokenizer", "format_version": 1,
     "vqlib_version": "0.1.0", "init_args": {..., "quantizer": {"class_path": "vqlib.VectorQuantize", ...}}}

The signatures follow huggingface_hub's ``ModelHubMixin`` (``from_pretrained(repo_id_or_path, *, revision,
cache_dir, force_download, token, local_files_only)``, ``save_pretrained(dir, *, push_to_hub, repo_id)``,
``push_to_hub(repo_id, *, ...)``) but the mixin is not used: its ``from_pretrained`` downloads config and
weights with two separately resolved requests, while here one ``snapshot_download`` fetches every file at one
commit (recorded as ``model.hub_commit``). Files are written and read by :mod:`vqlib.serialization` (shared
with compressed models); loading reads JSON and safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqlib import cards
from vqlib import serialization as ser
from vqlib.base import Quantizer, quantizer_from_config, quantizer_to_config

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = ser.CONFIG_NAME, ser.WEIGHTS_NAME, ser.CARD_NAME
EVAL_RESULTS_NAME = ".eval_results/vqlib.yaml"  # written when the run names a Hub dataset
_UPGRADES: dict[int, Any] = {}  # format_version -> function(config) giving the next version's config


class HubMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to an ``nn.Module`` subclass.

    A loaded model carries ``hub_repo_id`` / ``hub_commit`` (None for a local folder) and ``hub_metrics``
    (the card's evaluation results, kept when the model is saved or pushed again)."""

    hub_repo_id: str | None = None
    hub_commit: str | None = None
    hub_metrics: dict[str, float] | None = None

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
            "vqlib_version": ser.vqlib_version(),
            "init_args": init_args,
        }

    def _usage_snippet(self, repo_id: str) -> str:
        """Code that runs as written: load, encode a random input of the right shape, decode."""
        name = self._hub_model_type()
        if hasattr(self, "sample_rate"):
            make = f"torch.randn(1, {getattr(self, 'channels', 1)}, {self.sample_rate})  # (batch, channels, time): 1 s"
            use = "codes = tokenizer.encode(wave)            # (batch, frames, levels)\nreconstruction = tokenizer.decode(codes)"
            var = "wave"
        else:
            side = 4 * getattr(self, "downsample_factor", 8)
            ch = getattr(self, "in_channels", 3)
            make = f"torch.rand(1, {ch}, {side}, {side}) * 2 - 1  # (batch, channels, H, W) in [-1, 1]"
            use = (
                "indices = tokenizer.encode(images)        # integer codes\nreconstruction = tokenizer.decode(indices)"
            )
            var = "images"
        return (
            f"import torch\nfrom vqlib.models import {name}\n\ntokenizer = {name}.from_pretrained({repo_id!r})\n"
            f"{var} = {make}\n{use}"
        )

    def model_card(
        self,
        repo_id: str | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        train_config: str | None = None,
        dataset: str | None = None,
        license: str | None = None,
    ):
        """The ``ModelCard`` (huggingface_hub) from ``model_cards/tokenizer_card.md``.

        ``metrics``: the run's logged values (``{"val/psnr": 27.1, ...}``) or the card's own metric types
        (``{"psnr": 27.1}``, e.g. ``hub_metrics`` of a loaded model)."""
        cfg = self.hub_config()
        audio = hasattr(self, "sample_rate")
        picked = self._picked_metrics(metrics)
        quantizer = getattr(self, "quantizer", None)
        repo_id = repo_id or "path/to/folder"
        facts = self._model_card_fields()
        return cards.render(
            "tokenizer_card.md",
            model_name=repo_id.rpartition("/")[2],
            metrics=picked,
            task_type="audio-to-audio" if audio else "image-to-image",
            dataset=dataset,
            license=license,
            tags=["tokenizer", "vector-quantization", "audio" if audio else "image"],
            pipeline_tag="audio-to-audio" if audio else None,
            model_type=cfg["model_type"],
            modality="audio" if audio else "images",
            kind="audio" if audio else "image",
            quantizer_class=cfg["init_args"].get("quantizer", {}).get("class_path", "none"),
            codebook_size=str(quantizer.codebook_size) if isinstance(quantizer, Quantizer) else "n/a",
            size_facts="".join(f"{k.replace('_', ' ').capitalize()}: {v}. " for k, v in facts.items()).strip(),
            num_parameters=f"{sum(p.numel() for p in self.parameters()):,}",  # type: ignore[attr-defined]
            vqlib_version=cfg["vqlib_version"],
            usage=self._usage_snippet(repo_id),
            dataset_note=f" ({dataset})" if dataset else "",
            train_config=(train_config or "").strip(),
            config_json=json.dumps(cfg, indent=2),
        )

    def _picked_metrics(self, metrics: dict[str, Any] | None) -> dict[str, tuple[str, float]]:
        """{metric type: (name, value)} from logged values, or from a loaded card's ``hub_metrics``."""
        audio = hasattr(self, "sample_rate")
        logged = metrics if metrics is not None else (self.hub_metrics or {})
        picked = cards.tokenizer_metrics(logged, audio)
        if not picked and logged:  # already metric types (a card read back)
            names = {m: n for _, m, n in (cards.AUDIO_METRICS if audio else cards.IMAGE_METRICS)}
            picked = {k: (names.get(k, k), float(v)) for k, v in logged.items()}
        return picked

    # -- save --------------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        metrics: dict[str, Any] | None = None,
        train_config: str | None = None,
        dataset: str | None = None,
        license: str | None = None,
        **push_kwargs: Any,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` (the model card) into the folder, and
        ``.eval_results/vqlib.yaml`` (the Hub's newer evaluation format) when ``dataset`` is a Hub dataset id.

        A new folder appears complete or not at all; into an existing folder each file is renamed over the old
        one and other files are left alone. ``push_to_hub=True`` then uploads the folder to ``repo_id``
        (``push_kwargs``: ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``)."""
        if push_to_hub and not repo_id:
            raise ValueError("save_pretrained(push_to_hub=True) needs repo_id='owner/name'")
        config_text = json.dumps(self.hub_config(), indent=2)
        # Without a repo id the snippet names the folder itself, so it still runs as written.
        where = repo_id or str(Path(save_directory).resolve())
        card = self.model_card(where, metrics=metrics, train_config=train_config, dataset=dataset, license=license)
        state = ser.state_for_safetensors(self)  # type: ignore[arg-type]
        eval_yaml = cards.eval_results_yaml(self._picked_metrics(metrics), dataset)
        folder = ser.write_folder(
            save_directory,
            {
                WEIGHTS_NAME: lambda p: ser.save_safetensors(state, p, {"format": "pt", "library": "vqlib"}),
                CONFIG_NAME: ser.text_writer(config_text),
                CARD_NAME: ser.text_writer(str(card)),
                **({EVAL_RESULTS_NAME: ser.text_writer(eval_yaml)} if eval_yaml else {}),
            },
        )
        if push_to_hub:
            ser.push_folder(folder, repo_id, **push_kwargs)  # type: ignore[arg-type]
        return folder

    # -- load --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str | torch.device = "cpu",
        **kwargs: Any,
    ):
        """Load from a local folder written by :meth:`save_pretrained`, or from a Hub repo id (every file at the
        one commit ``revision`` resolves to; recorded as ``model.hub_commit``)."""
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained: unexpected arguments {sorted(kwargs)}")
        caller = f"{cls.__name__}.from_pretrained"
        res = ser.resolve_folder(
            repo_id_or_path,
            caller=caller,
            files=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        folder = res.folder
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
        if missing:
            where = f"Hub repo {res.repo_id!r} (commit {res.commit})" if res.repo_id else str(folder)
            raise FileNotFoundError(
                f"{caller}: {where} is missing {', '.join(missing)}; a saved vqlib model folder holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by save_pretrained or `vqlib-train export`)"
            )
        cfg = ser.read_json_config(folder, caller)
        init_args = cls._check_config(cfg, folder / CONFIG_NAME)
        if isinstance(init_args.get("quantizer"), dict):
            init_args["quantizer"] = quantizer_from_config(init_args["quantizer"])
        model = cls._from_hub_config(init_args)
        state = ser.load_safetensors(folder / WEIGHTS_NAME, map_location, caller)
        model._load_checked_state(state, folder / WEIGHTS_NAME)
        model.hub_repo_id, model.hub_commit = res.repo_id, res.commit
        model.hub_metrics = _card_metrics(folder / CARD_NAME)
        return model.to(map_location).eval()

    @classmethod
    def _check_config(cls, cfg: Any, config_path: Path) -> dict[str, Any]:
        if not isinstance(cfg, dict) or "init_args" not in cfg or "model_type" not in cfg:
            raise ValueError(f"{config_path} is not a vqlib model config (expected keys model_type, init_args)")
        version = cfg.get("format_version")
        ser.check_format_version(version, FORMAT_VERSION, str(config_path), cfg.get("vqlib_version"), cls.__name__)
        while cfg["format_version"] < FORMAT_VERSION:  # older files: upgrade step by step
            cfg = _UPGRADES[cfg["format_version"]](cfg)
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
            raise ValueError(f"{weights_path} does not match the model built from {CONFIG_NAME}: " + "; ".join(parts))
        self.load_state_dict(state, strict=True)  # type: ignore[attr-defined]

    # -- publish -----------------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        branch: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload vqlib tokenizer",
        create_pr: bool = False,
        **card_kwargs: Any,
    ):
        """Save into a temporary folder (config, weights, model card) and upload it (``HfApi.upload_folder``);
        ``branch`` is another name for ``revision``. ``card_kwargs``: ``metrics``, ``train_config``, ``dataset``,
        ``license`` as in :meth:`save_pretrained`."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", repo_id=repo_id, **card_kwargs)
            return ser.push_folder(
                folder,
                repo_id,
                token=token,
                private=private,
                revision=revision or branch,
                commit_message=commit_message,
                create_pr=create_pr,
            )


def _card_metrics(path: Path) -> dict[str, float] | None:
    """The model-index metrics of a saved card (None when there is no card or it has none)."""
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return cards.card_metrics(ModelCard.load(path)) or None
    except Exception:  # a hand-edited card that no longer parses: the model still loads
        return None
