"""Model cards: rendered from the shipped templates with huggingface_hub's ModelCard, metrics in model-index equal
to what the run measured, and vqlib-compress writing the card from its report without any typing."""

import json
import textwrap

import pytest
from huggingface_hub import ModelCard
from image_helpers import tiny_tokenizer

from vqlib import cards
from vqlib.compress.cli import main as compress_main


def test_templates_come_from_the_package():
    for name in ("tokenizer_card.md", "compressed_card.md"):
        assert "{{ card_data }}" in cards.template(name)


def test_tokenizer_card_parses_and_holds_the_logged_metrics(tmp_path):
    logged = {"val/psnr": 23.25, "val/ssim": 0.625, "val/usage": 0.5, "val/bits_per_image": 96.0, "loss": 1.0}
    folder = tiny_tokenizer().save_pretrained(
        tmp_path / "tok",
        repo_id="me/tok",
        metrics=logged,
        train_config="trainer:\n  max_steps: 3",
        dataset="someone/images",
        license="apache-2.0",
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "vqlib" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["someone/images"] and "tokenizer" in card.data.tags
    assert cards.card_metrics(card) == {"psnr": 23.25, "ssim": 0.625, "codebook_usage": 0.5, "bits_per_image": 96.0}
    assert card.data.eval_results[0].dataset_type == "someone/images"
    assert "| PSNR (dB) | 23.25 |" in card.text and "max_steps: 3" in card.text
    import yaml
    from huggingface_hub import parse_eval_result_entries

    entries = parse_eval_result_entries(yaml.safe_load((folder / ".eval_results" / "vqlib.yaml").read_text()))
    assert {e.task_id: e.value for e in entries} == cards.card_metrics(card)
    assert {e.dataset_id for e in entries} == {"someone/images"}


def test_audio_metrics_pick_the_full_bitrate():
    picked = cards.tokenizer_metrics(
        {
            "val/si_sdr": 4.0,
            "val/mel_distance": 1.5,
            "val/usage_mean": 0.9,
            "val/bitrate_kbps_nq1": 1.5,
            "val/bitrate_kbps_nq8": 12.0,
            "val/bitrate_kbps_nq2": 3.0,
            "val/psnr": float("nan"),
        },
        audio=True,
    )
    assert {k: v for k, (_, v) in picked.items()} == {
        "mel_distance": 1.5,
        "si_sdr": 4.0,
        "codebook_usage": 0.9,
        "bitrate_kbps": 12.0,
    }


FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    """
)


def test_vqlib_compress_writes_the_card_from_its_report(tmp_path, monkeypatch, capsys):
    (tmp_path / "card_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "eval.json").write_text(json.dumps({"perplexity": 12.5}))
    out = tmp_path / "out"
    code = compress_main(
        [
            "card_factory:make_model",
            str(out),
            "--algorithm",
            "data_free",
            "--vector-dim",
            "4",
            "--codebook-bits",
            "4",
            "--kmeans-iters",
            "3",
            "--skip-modules",
            "4",
            "--quiet",
            "--report-json",
            str(tmp_path / "report.json"),
            "--metrics-json",
            str(tmp_path / "eval.json"),
            "--base-model",
            "someone/base",
            "--license",
            "mit",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((tmp_path / "report.json").read_text())
    card = ModelCard.load(out / "README.md")
    metrics = cards.card_metrics(card)
    assert metrics["bits_per_weight_compressed_layers"] == pytest.approx(report["bits_per_weight"])
    assert metrics["size_mib_original"] == pytest.approx(report["model_bytes_before"] / 2**20)
    assert metrics["compression_seconds"] == pytest.approx(report["seconds"])
    errors = [r["relative_error"] for r in report["layers"] if r["status"] == "compressed"]
    assert metrics["max_relative_error"] == pytest.approx(max(errors))
    assert metrics["perplexity"] == 12.5
    n_params = 32 * 64 + 64 + 64 * 32 + 32 + 32 * 4 + 4
    assert metrics["bits_per_parameter_whole_model"] == pytest.approx(8 * report["model_bytes_after"] / n_params)
    assert card.data.base_model == "someone/base" and card.data.license == "mit"
    assert "from card_factory import make_model" in card.text  # the snippet rebuilds the skeleton as compressed
    assert "model card metrics:" in printed.out and "publish it:" in printed.out
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["uncompressed_modules"] == ["4"] and quant["quant_method"] == "vqlib"
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), scope)  # runs as written (repo id = the local folder)
    assert type(scope["model"][0]).__name__ == "VQLinear"


def test_local_card_snippet_runs_as_written(tmp_path):
    tok = tiny_tokenizer()
    folder = tok.save_pretrained(tmp_path / "tok")  # no repo id: the snippet names the folder
    snippet = (folder / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert str(folder.resolve()) in snippet
    scope: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), scope)
    assert scope["reconstruction"].shape == scope["images"].shape and scope["tokenizer"].hub_commit is None
