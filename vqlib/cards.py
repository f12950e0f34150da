"""Model cards with the metrics a run measured, rendered with huggingface_hub's ``ModelCard`` / ``ModelCardData``.

Templates live in ``model_cards/`` (installed as ``vqlib.model_cards``). Metrics go into the card twice: the
YAML ``model-index`` (huggingface_hub's ``EvalResult``; the Hub shows it on the model page) and a Markdown table.
:func:`card_metrics` reads them back from a card (``ModelCard.load``).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

# (logged key, metric type in model-index, readable name)
IMAGE_METRICS = [
    ("val/psnr", "psnr", "PSNR (dB)"),
    ("val/ssim", "ssim", "SSIM"),
    ("val/usage", "codebook_usage", "codebook usage (fraction of codes used)"),
    ("val/perplexity", "codebook_perplexity", "codebook perplexity"),
    ("val/tokens_per_image", "tokens_per_image", "tokens per image"),
    ("val/bits_per_image", "bits_per_image", "bits per image"),
    ("val/rec_loss", "reconstruction_loss", "reconstruction loss"),
]
AUDIO_METRICS = [
    ("val/mel_distance", "mel_distance", "mel distance"),
    ("val/si_sdr", "si_sdr", "SI-SDR (dB)"),
    ("val/usage_mean", "codebook_usage", "codebook usage (mean over levels)"),
    ("val/bitrate_kbps", "bitrate_kbps", "bitrate (kbps, all levels)"),
]
COMPRESSED_METRICS = {
    "bits_per_weight_compressed_layers": "bits per weight, compressed layers",
    "bits_per_parameter_whole_model": "bits per parameter, whole model",
    "size_mib_original": "size before (MiB)",
    "size_mib_compressed": "size after (MiB)",
    "mean_relative_error": "mean relative layer error",
    "max_relative_error": "max relative layer error",
    "compression_seconds": "compression time (s)",
    "perplexity": "perplexity (user's evaluation)",
    "perplexity_original": "perplexity of the original (user's evaluation)",
    "embedding_cosine": "embedding cosine vs original (user's evaluation)",
}


def template(name: str) -> str:
    """A card template shipped in the package (``vqlib/model_cards/<name>``)."""
    return resources.files("vqlib.model_cards").joinpath(name).read_text(encoding="utf-8")


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def tokenizer_metrics(logged: dict[str, Any], audio: bool) -> dict[str, tuple[str, float]]:
    """Pick the card's metrics from a run's logged values: {metric type: (readable name, value)}.

    Audio runs log the bitrate per level count (``val/bitrate_kbps_nq{n}``); the card shows the largest n."""
    logged = dict(logged)
    if audio:
        levels = [k for k in logged if k.startswith("val/bitrate_kbps_nq")]
        if levels:
            logged["val/bitrate_kbps"] = logged[max(levels, key=lambda k: int(k.rpartition("nq")[2]))]
    out = {}
    for key, mtype, name in AUDIO_METRICS if audio else IMAGE_METRICS:
        value = _finite(logged.get(key))
        if value is not None:
            out[mtype] = (name, value)
    return out


def _eval_results(metrics: dict[str, tuple[str, float]], task_type: str, dataset: str, dataset_name: str):
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset,
            dataset_name=dataset_name,
            metric_type=mtype,
            metric_name=name,
            metric_value=value,
        )
        for mtype, (name, value) in metrics.items()
    ]


def _table(metrics: dict[str, tuple[str, float]]) -> str:
    return "\n".join(f"| {name} | {value:.6g} |" for name, value in metrics.values())


def render(
    template_name: str,
    *,
    model_name: str,
    metrics: dict[str, tuple[str, float]],
    task_type: str,
    dataset: str | None,
    license: str | None,
    tags: list[str],
    pipeline_tag: str | None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    **fields: Any,
):
    """A ``ModelCard``: YAML metadata (+ model-index when there are metrics) and the template's body."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="vqlib",
        license=license,
        tags=["vqlib", *tags],
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        datasets=[dataset] if dataset and "/" in dataset else None,  # only Hub dataset ids are metadata
        model_name=model_name,
        eval_results=_eval_results(
            metrics, task_type, dataset or "custom", dataset_name or dataset or "validation split"
        )
        if metrics
        else None,
    )
    return ModelCard.from_template(
        data,
        template_str=template(template_name),
        model_name=model_name,
        metrics_table=_table(metrics),
        base_model=base_model,
        **fields,
    )


def eval_results_yaml(metrics: dict[str, tuple[str, float]], dataset: str | None) -> str | None:
    """The newer ``.eval_results/*.yaml`` format (huggingface_hub's ``EvalResultEntry``). It scores a model on a
    Hub *dataset*, so it is written only when the run names one (``owner/name``); else None."""
    if not metrics or not dataset or "/" not in dataset:
        return None
    import yaml
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    entries = [
        EvalResultEntry(dataset_id=dataset, task_id=mtype, value=value, notes=f"{name}, vqlib validation")
        for mtype, (name, value) in metrics.items()
    ]
    return yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False)


def card_metrics(card) -> dict[str, float]:
    """{metric type: value} from a card's model-index (what the Hub shows)."""
    return {r.metric_type: r.metric_value for r in (card.data.eval_results or [])}


def compressed_metrics(report: Any, whole_model_params: int | None, extra: dict[str, Any] | None):
    """Card metrics from a ``CompressionReport`` (or its ``to_dict()``) plus the user's own evaluation."""
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    layers = [r for r in rep.get("layers", []) if r.get("status") == "compressed"]
    errors = [r["relative_error"] for r in layers if r.get("relative_error") is not None]
    values = {
        "bits_per_weight_compressed_layers": rep.get("bits_per_weight"),
        "bits_per_parameter_whole_model": 8.0 * rep["model_bytes_after"] / whole_model_params
        if whole_model_params and rep.get("model_bytes_after")
        else None,
        "size_mib_original": rep.get("model_bytes_before", 0) / 2**20 or None,
        "size_mib_compressed": rep.get("model_bytes_after", 0) / 2**20 or None,
        "mean_relative_error": sum(errors) / len(errors) if errors else None,
        "max_relative_error": max(errors) if errors else None,
        "compression_seconds": rep.get("seconds"),
    }
    for key, value in (extra or {}).items():
        values[key] = value
    out = {}
    for key, value in values.items():
        v = _finite(value)
        if v is not None:
            out[key] = (COMPRESSED_METRICS.get(key, key.replace("_", " ")), v)
    kinds = sorted({r.get("error_kind") for r in layers if r.get("error_kind")})
    return out, kinds, rep


def error_note(kinds: list[str]) -> str:
    notes = {
        "output": "||(W - Q) X|| / ||W X|| on the calibration inputs X (output error)",
        "weight": "||W - Q|| / ||W|| (weight error; no calibration data)",
    }
    return "; ".join(notes.get(k, k) for k in kinds) or "not recorded"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
