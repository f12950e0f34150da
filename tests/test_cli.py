"""vqlib-train: a tiny fit through the CLI with the shipped image_tiny config (shrunk by overrides) writing
PNG grids and metrics, export -> from_pretrained, validate, --print_config of every image config, export
errors, and a 2-process CPU DDP fit in a subprocess with a timeout (so a hang fails instead of stalling)."""

import contextlib
import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_training_cli
from vqlib.models import ImageTokenizer
from vqlib.training.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
TINY = CONFIGS / "image_tiny.yaml"
SHRINK = [
    "--model.init_args.tokenizer.init_args.ch", "8",
    "--model.init_args.tokenizer.init_args.z_channels", "8",
    "--model.init_args.tokenizer.init_args.norm_groups", "4",
    "--model.init_args.tokenizer.init_args.quantizer.init_args.dim", "8",
    "--model.init_args.tokenizer.init_args.quantizer.init_args.codebook_size", "64",
    "--data.init_args.crop_size", "16",
    "--data.init_args.batch_size", "4",
    "--data.init_args.train_samples", "12",
    "--data.init_args.val_samples", "8",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vqlib-train"])  # LightningCLI must see only the args we pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    argv, sys.argv = sys.argv, ["vqlib-train"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["fit", "--config", str(TINY), *SHRINK, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
              "--trainer.default_root_dir", str(root),
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(root)])  # fmt: skip
    torch.set_num_threads(threads)
    sys.argv = argv
    (log_dir,) = (root / "lightning_logs").iterdir()
    (log_dir / "fit_stdout.txt").write_text(printed.getvalue())
    return log_dir


def test_fit_ends_with_what_the_run_left_behind(fitted):
    out = (fitted / "fit_stdout.txt").read_text()
    summary = out[out.index("vqlib-train fit: finished at step 3") :]
    saved = json.loads((fitted / "val_metrics.json").read_text())
    assert saved["step"] == 3 and 0 < saved["metrics"]["val/usage"] <= 1
    assert "  val/psnr" in summary and f"{saved['metrics']['val/psnr']:.6g}" in summary
    assert f"reconstruction grids: {fitted / 'reconstructions'}" in summary
    ckpt = fitted / "checkpoints" / "last.ckpt"
    assert f"export it:  vqlib-train export --ckpt_path {ckpt} --out" in summary


def test_fit_writes_metrics_grids_config_and_checkpoint(fitted):
    grids = sorted((fitted / "reconstructions").glob("*.png"))
    assert [g.name for g in grids] == ["val_step_0000003.png"]
    from PIL import Image

    with Image.open(grids[0]) as img:
        assert img.size[0] > 16 * 4 and img.size[1] >= 2 * 16  # originals + reconstructions
    with open(fitted / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r.get("val/psnr")]
    assert len(val) == 1
    for key in ("val/psnr", "val/ssim", "val/usage", "val/perplexity", "val/tokens_per_image", "val/bits_per_image"):
        assert val[0][key] != "", key
    assert float(val[0]["val/tokens_per_image"]) == 16  # 16x16 crops, f4
    assert float(val[0]["val/bits_per_image"]) == 16 * 6  # 64 codes = 6 bits
    assert 0 < float(val[0]["val/usage"]) <= 1
    assert (fitted / "config.yaml").is_file()
    ckpt = fitted / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3


def test_export_then_from_pretrained(fitted, tmp_path, capsys):
    ckpt = fitted / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "tok")])  # config.yaml found beside the run
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "exported tokenizer to" in out and "publish it: vqlib-train export" in out and "--push-to-hub" in out
    tok = ImageTokenizer.from_pretrained(tmp_path / "tok")
    logged = json.loads((fitted / "val_metrics.json").read_text())["metrics"]
    assert tok.hub_metrics["psnr"] == pytest.approx(logged["val/psnr"])  # the card holds the run's numbers
    assert tok.hub_metrics["ssim"] == pytest.approx(logged["val/ssim"])
    assert tok.hub_metrics["bits_per_image"] == 16 * 6
    assert f"{logged['val/psnr']:.6g}" in out
    card = (tmp_path / "tok" / "README.md").read_text()
    assert "vqlib.training.EmbeddedImageDataModule" in card and "max_steps" in card  # data set and training config
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in tok.state_dict().items():
        assert torch.equal(v, state[f"tokenizer.{k}"]), k
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tok.decode(tok.encode(x)).shape == x.shape


def test_export_errors(fitted, tmp_path, capsys):
    for args, message in [
        (["--ckpt_path", str(tmp_path / "none.ckpt"), "--config", str(fitted / "config.yaml")], "does not exist"),
        (["--ckpt_path", str(tmp_path / "x.ckpt")], "no --config given and no config.yaml found"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validate_subcommand_from_checkpoint(fitted, tmp_path):
    ckpt = fitted / "checkpoints" / "last.ckpt"
    main(["validate", "--config", str(fitted / "config.yaml"), "--ckpt_path", str(ckpt),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])  # fmt: skip


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("image_*.yaml")))
def test_every_image_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "vqlib.models.ImageTokenizer" in out and "class_path: vqlib." in out


def test_two_process_cpu_ddp_fit(tmp_path):
    """strategy ddp (gloo on CPU), devices=2, with the discriminator on from step 1 (unused parameters).

    A required check, so it is not marked slow although it takes ~25 s: two fresh processes import Lightning."""
    args = ["fit", "--config", str(TINY), *SHRINK,
           "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
           "--data.init_args.train_samples", "24",  # 12 per rank: 3 batches of 4
           "--trainer.max_steps", "3", "--trainer.max_epochs", "1",
           "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
           "--model.init_args.loss.init_args.disc_weight", "0.5",
           "--model.init_args.loss.init_args.disc_start", "1",
           "--model.init_args.loss.init_args.disc_ndf", "8",
           "--model.init_args.loss.init_args.disc_layers", "2",
           "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    run_training_cli(args, cwd=tmp_path)
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    assert list((log_dir / "reconstructions").glob("*.png"))


@pytest.mark.parametrize("config,tokens", [("image_f16_simvq65k.yaml", 256), ("image_f8_frozen100k.yaml", 1024)])
def test_gpu_recipes_build_their_tokenizers(config, tokens, tmp_path):
    """The full-size recipes' tokenizer sections instantiate (with a small stand-in for the frozen codebook file)."""
    import yaml
    from jsonargparse import ArgumentParser
    from safetensors.torch import save_file

    cfg = yaml.safe_load((CONFIGS / config).read_text())
    tok_cfg = cfg["model"]["init_args"]["tokenizer"]
    q_args = tok_cfg["init_args"]["quantizer"]["init_args"]
    if "codebook_path" in q_args:
        save_file({"codebook": torch.randn(512, 16)}, tmp_path / "frozen.safetensors")
        q_args["codebook_path"] = str(tmp_path / "frozen.safetensors")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--tokenizer", type=ImageTokenizer)
    tok = parser.instantiate(parser.parse_object({"tokenizer": tok_cfg})).tokenizer
    assert tok.tokens_per_image(256) == tokens
    tok.eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert tok(x).reconstruction.shape == x.shape
