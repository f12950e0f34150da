import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_training_cli

sf = pytest.importorskip("soundfile", reason="soundfile (train extra) reads and writes audio files")
import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from vqlib.models import AudioTokenizer  # noqa: E402
from vqlib.training.audio import AudioTokenizerModule  # noqa: E402
from vqlib.training.audio_data import AudioFolderDataModule, SynthAudioDataModule, SynthAudioDataset  # noqa: E402
from vqlib.training.audio_synth import TRAIN_SPLIT, VAL_SPLIT, synthesize_clip  # noqa: E402

from vqlib import ResidualVQ  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"


# ---- synthetic data ------------------------------------------------------------------------------------------------
def test_synth_clips_deterministic_and_splits_disjoint():
    a = synthesize_clip(3, 5, 4000, 8000)
    assert a.shape == (1, 4000) and a.dtype == np.float32
    assert np.array_equal(a, synthesize_clip(3, 5, 4000, 8000))
    assert 0.29 < np.abs(a).max() <= 0.9 + 1e-6
    assert not np.array_equal(a, synthesize_clip(3, 6, 4000, 8000))
    assert not np.array_equal(a, synthesize_clip(4, 5, 4000, 8000))
    train = [synthesize_clip(0, i, 2000, 8000, split=TRAIN_SPLIT) for i in range(8)]
    val = [synthesize_clip(0, i, 2000, 8000, split=VAL_SPLIT) for i in range(8)]
    assert not any(np.array_equal(t, v) for t in train for v in val)
    stereo = synthesize_clip(0, 1, 2000, 8000, channels=2)
    assert stereo.shape == (2, 2000) and not np.array_equal(stereo[0], stereo[1])
    with pytest.raises(ValueError, match="channels"):
        synthesize_clip(0, 0, 100, 8000, channels=3)


def test_synth_clips_have_pitched_content():
    # harmonic events dominate: the spectrum is peaky, unlike white noise
    def top_percent_share(x: np.ndarray) -> float:
        spectrum = np.sort(np.abs(np.fft.rfft(x)))[::-1]
        return spectrum[: len(spectrum) // 100].sum() / spectrum.sum()

    clip = np.concatenate([synthesize_clip(0, i, 8000, 8000)[0] for i in range(4)])
    noise = np.random.default_rng(0).standard_normal(clip.shape)
    assert top_percent_share(clip) > 3 * top_percent_share(noise)


def test_synth_datamodule():
    dm = SynthAudioDataModule(
        sample_rate=8000,
        segment_seconds=0.25,
        val_segment_seconds=0.5,
        num_train_clips=6,
        num_val_clips=3,
        batch_size=4,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 1, 2000) and batch.dtype == torch.float32
    val = next(iter(dm.val_dataloader()))
    assert val.shape == (3, 1, 4000)
    dm2 = SynthAudioDataModule(
        sample_rate=8000,
        segment_seconds=0.25,
        val_segment_seconds=0.5,
        num_train_clips=6,
        num_val_clips=3,
        batch_size=4,
    )
    dm2.setup("fit")
    assert torch.equal(next(iter(dm2.val_dataloader())), val)
    with pytest.raises(IndexError):
        SynthAudioDataset(2, 100, 8000)[2]


# ---- folder data -----------------------------------------------------------------------------------------------------
def write(path: Path, wave: np.ndarray, sample_rate: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, sample_rate, **kw)
    return path


def tone(seconds: float, sample_rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def audio_folder(tmp_path):
    root = tmp_path / "audio"
    write(root / "a_16k_mono.wav", tone(1.0, 16000), 16000)
    write(root / "b_44k_mono.wav", tone(1.0, 44100, 330), 44100)
    stereo = np.stack([np.full(8000, 0.5, np.float32), np.full(8000, -0.1, np.float32)], axis=1)
    write(root / "sub" / "c_stereo_const.wav", stereo, 16000, subtype="FLOAT")
    write(root / "d.flac", tone(0.5, 16000, 440), 16000, format="FLAC")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (root / "notes.txt").write_text("not audio")
    return root


def test_folder_skips_corrupt_files_and_logs_them(audio_folder, caplog):
    dm = AudioFolderDataModule(
        str(audio_folder), sample_rate=16000, segment_seconds=0.25, val_fraction=0.25, batch_size=2
    )
    with caplog.at_level(logging.WARNING, logger="vqlib.training.audio_data"):
        dm.setup("fit")
    assert [p.name for p, _ in dm.skipped_files] == ["broken.wav"]
    assert "skipped 1 unreadable audio files" in caplog.text and "broken.wav" in caplog.text
    assert len(dm.train_files) + len(dm.val_files) == 4 and len(dm.val_files) == 1
    with pytest.raises(ValueError, match=r"1 unreadable audio files .*broken\.wav"):
        AudioFolderDataModule(str(audio_folder), strict=True).setup("fit")


def test_folder_split_is_deterministic_and_disjoint(audio_folder):
    splits = []
    for _ in range(2):
        dm = AudioFolderDataModule(str(audio_folder), sample_rate=16000, val_fraction=0.5)
        dm.setup("fit")
        splits.append(([f.path for f in dm.train_files], [f.path for f in dm.val_files]))
    assert splits[0] == splits[1]
    train, val = splits[0]
    assert len(val) == 2 and not set(train) & set(val)


def test_folder_resamples_mixes_and_pads(audio_folder):
    dm = AudioFolderDataModule(str(audio_folder), sample_rate=16000, segment_seconds=0.25, batch_size=2)
    dm.setup("fit")
    infos = {f.path.name: f for f in dm.train_files + dm.val_files}
    ds = dm.train_dataset()
    for name in infos:  # every readable file gives (1, 4000) at 16 kHz
        ds.files = [infos[name]]
        assert ds[0].shape == (1, 4000)
    # 44.1 kHz file resampled: a 330 Hz tone stays at 330 Hz at 16 kHz
    ds.files = [infos["b_44k_mono.wav"]]
    seg = ds[0][0].numpy()
    peak_hz = np.argmax(np.abs(np.fft.rfft(seg))) * 16000 / len(seg)
    assert abs(peak_hz - 330) <= 4
    # stereo -> mono is the channel average
    ds.files = [infos["c_stereo_const.wav"]]
    assert torch.allclose(ds[0], torch.full((1, 4000), 0.2), atol=1e-6)
    # validation windows are deterministic; a file shorter than the window is zero-padded
    val = AudioFolderDataModule(str(audio_folder), sample_rate=16000, segment_seconds=0.75, batch_size=2)
    val.setup("fit")
    val.val_files = [infos["d.flac"]]  # 0.5 s file, 0.75 s windows
    item = val.val_dataset()[0]
    assert item.shape == (1, 12000)
    assert item[0, 8000:].abs().max() == 0 and item[0, :8000].abs().max() > 0.3
    assert torch.equal(val.val_dataset()[0], item)


def test_folder_stereo_model_duplicates_mono(audio_folder):
    dm = AudioFolderDataModule(str(audio_folder), sample_rate=16000, channels=2, segment_seconds=0.25)
    dm.setup("fit")
    ds = dm.train_dataset()
    ds.files = [f for f in dm.train_files + dm.val_files if f.path.name == "a_16k_mono.wav"]
    item = ds[0]
    assert item.shape == (2, 4000) and torch.equal(item[0], item[1])


def test_folder_file_failing_mid_epoch_is_replaced(audio_folder, caplog):
    dm = AudioFolderDataModule(str(audio_folder), sample_rate=16000, segment_seconds=0.25)
    dm.setup("fit")
    ds = dm.train_dataset()
    ds.files[0].path.write_bytes(b"garbage")  # breaks after setup probed it
    with caplog.at_level(logging.WARNING, logger="vqlib.training.audio_data"):
        items = [ds[0], ds[0]]
    assert all(x.shape == (1, 4000) for x in items)
    assert caplog.text.count("mid-epoch") == 1


def test_folder_mp3_when_backend_reads_it(tmp_path):
    try:
        write(tmp_path / "m" / "x.mp3", tone(1.0, 16000), 16000, format="MP3")
    except Exception as e:  # libsndfile < 1.1 has no MP3
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    write(tmp_path / "m" / "y.wav", tone(1.0, 16000), 16000)
    dm = AudioFolderDataModule(str(tmp_path / "m"), sample_rate=16000, segment_seconds=0.25, val_fraction=0.5)
    dm.setup("fit")
    assert not dm.skipped_files
    names = {f.path.name for f in dm.train_files + dm.val_files}
    assert names == {"x.mp3", "y.wav"}


def test_folder_missing_or_empty_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AudioFolderDataModule(str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty holds no audio files"):
        AudioFolderDataModule(str(tmp_path / "empty")).setup("fit")
    write(tmp_path / "one" / "a.wav", tone(0.2, 8000), 8000)
    with pytest.raises(ValueError, match="at least 2 readable"):
        AudioFolderDataModule(str(tmp_path / "one")).setup("fit")


# ---- training ----------------------------------------------------------------------------------------------------------
def tiny_module(sample_rate: int = 8000, **kw) -> AudioTokenizerModule:
    torch.manual_seed(0)
    tok = AudioTokenizer(
        ResidualVQ(8, 16, 4, quantizer_dropout=0.5, kmeans_init=True, channel_first=True),
        sample_rate=sample_rate,
        n_filters=2,
        ratios=[4, 2],
        residual_dilations=[1, 3],
        lstm_layers=0,
    )
    args = dict(
        lr=3e-3,
        disc_start_step=2,
        stft_discriminator_ffts=[128, 64],
        stft_filters=4,
        mpd_periods=[2, 3],
        mpd_widths=[4, 8],
        mel_windows=[32, 64, 128],
        mel_bands=[5, 10, 20],
        eval_num_quantizers=[1, 4],
    )
    args.update(kw)
    return AudioTokenizerModule(tok, **args)


def tiny_data(**kw) -> SynthAudioDataModule:
    args = dict(
        sample_rate=8000,
        segment_seconds=0.05,
        val_segment_seconds=0.1,
        num_train_clips=16,
        num_val_clips=4,
        batch_size=4,
    )
    args.update(kw)
    return SynthAudioDataModule(**args)


def tiny_trainer(root: Path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(root)),
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        **kw,
    )


def test_tiny_fit_logs_metrics_writes_wavs_and_resumes_exactly(tmp_path):
    L.seed_everything(0)
    module = tiny_module()
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer = tiny_trainer(tmp_path, 4, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(module, tiny_data())
    assert trainer.global_step == 4  # generator steps only, though the discriminator stepped twice
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))

    log_dir = Path(trainer.logger.log_dir)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    val = [r for r in rows if r.get("val/mel_distance")]
    assert val, "no validation row"
    last = val[-1]
    for n in (1, 4):
        assert math.isfinite(float(last[f"val/mel_distance_nq{n}"]))
        assert math.isfinite(float(last[f"val/si_sdr_nq{n}"]))
    assert float(last["val/bitrate_kbps_nq4"]) == pytest.approx(1000 * 4 * 4 / 1000)  # 1 kHz frames, 4 x 4 bits
    assert float(last["val/bitrate_kbps_nq1"]) == pytest.approx(4.0)
    for i in range(4):
        assert 0 < float(last[f"val/usage_level{i}"]) <= 1
        assert float(last[f"val/perplexity_level{i}"]) >= 1
    assert any(r.get("train/loss_d") for r in rows) and any(r.get("train/mel") for r in rows)

    wavs = sorted((log_dir / "audio" / "step_0000004").glob("*.wav"))
    assert [w.name for w in wavs] == [f"example{k}_{s}.wav" for k in (0, 1) for s in ("nq1", "nq4", "original")]
    data, sr = sf.read(str(wavs[0]))
    assert sr == 8000 and data.shape == (800,)

    # Resume: a checkpoint restores codebook EMA state (and everything else) exactly.
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = tiny_module(lr=1.0)  # different init and hyper-parameters: everything must come from the checkpoint
    resumed_trainer = tiny_trainer(tmp_path / "resume", 4, val_check_interval=4, check_val_every_n_epoch=None)
    resumed_trainer.fit(resumed, tiny_data(), ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 4
    expected = module.state_dict()
    got = resumed.state_dict()
    ema_keys = [k for k in expected if "embed_avg" in k or "cluster_size" in k]
    assert ema_keys
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_export_via_cli_round_trips(tmp_path):
    from vqlib.training.cli import export

    L.seed_everything(0)
    module = tiny_module(disc_start_step=100)
    trainer = tiny_trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(module, tiny_data())
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: vqlib.training.AudioTokenizerModule\n  init_args:\n    tokenizer:\n"
        "      class_path: vqlib.models.AudioTokenizer\n      init_args:\n        sample_rate: 8000\n"
        "        n_filters: 2\n        ratios: [4, 2]\n        residual_dilations: [1, 3]\n        lstm_layers: 0\n"
        "        quantizer:\n          class_path: vqlib.ResidualVQ\n          init_args: {dim: 8, codebook_size: 16,"
        " num_quantizers: 4, quantizer_dropout: 0.5, kmeans_init: true, channel_first: true}\n"
        "    stft_discriminator_ffts: [128, 64]\n    stft_filters: 4\n    mpd_periods: [2, 3]\n    mpd_widths: [4, 8]\n"
        "    mel_windows: [32, 64, 128]\n    mel_bands: [5, 10, 20]\n"
    )
    folder = export(ckpt, tmp_path / "exported", config)
    loaded = AudioTokenizer.from_pretrained(folder)
    x = torch.from_numpy(synthesize_clip(0, 0, 800, 8000))[None]
    module.tokenizer.eval()
    assert torch.equal(loaded.encode(x), module.tokenizer.encode(x))


def test_mismatched_data_sample_rate_is_an_error(tmp_path):
    trainer = tiny_trainer(tmp_path, 1)
    with pytest.raises(ValueError, match=r"sample_rate \(16000\) differs from the tokenizer's \(8000\)"):
        trainer.fit(tiny_module(), tiny_data(sample_rate=16000))


def test_module_argument_errors():
    with pytest.raises(ValueError, match="eval_num_quantizers"):
        tiny_module(eval_num_quantizers=[0, 4])
    with pytest.raises(ValueError, match="adversarial_loss"):
        tiny_module(adversarial_loss="wgan")
    with pytest.raises(TypeError, match="AudioTokenizer"):
        AudioTokenizerModule(torch.nn.Linear(2, 2))


def test_hyperparameters_and_weight_decay_on_matrices_only():
    module = tiny_module(lr=1e-3, weight_decay=0.05)
    assert (module.hparams.lr, module.hparams.weight_decay) == (1e-3, 0.05) and "tokenizer" not in module.hparams
    opt_g, opt_d = module.configure_optimizers()
    for opt, model in ((opt_g, module.tokenizer), (opt_d, module.discriminator)):
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        for name, p in model.named_parameters():
            assert (id(p) in decayed) == (p.ndim >= 2), name  # biases and weight-norm gains (1-D) never decay
    plain = tiny_module().configure_optimizers()[0]
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.0  # default: no decay


@pytest.mark.parametrize("name", ["audio_tiny.yaml", "audio_24khz.yaml"])
def test_configs_instantiate(name, monkeypatch):
    from vqlib.training.cli import run_cli

    monkeypatch.setattr("sys.argv", ["vqlib-train"])
    # The GPU recipe's trainer settings are swapped for CPU ones here; model and data come from the file.
    cpu = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.precision",
        "32",
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "null",
    ]
    cli = run_cli(["--config", str(CONFIGS / name), *cpu], run=False)
    module, data = cli.model, cli.datamodule
    assert isinstance(module, AudioTokenizerModule)
    tok = module.tokenizer
    assert tok.sample_rate == data.sample_rate and tok.channels == data.channels
    if name == "audio_24khz.yaml":
        assert tok.frame_rate == 75 and tok.num_quantizers == 32 and tok.codebook_size == 1024
        assert [tok.bitrate(n) for n in (2, 4, 8, 16)] == pytest.approx([1.5, 3.0, 6.0, 12.0])


def test_two_process_cpu_ddp_fit_with_discriminator(tmp_path):
    """strategy ddp (gloo on CPU), 2 processes, through the discriminator start (unused parameters before it)."""
    args = ["fit", "--config", str(CONFIGS / "audio_tiny.yaml"),
           "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
           "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false",
           "--trainer.log_every_n_steps", "1",
           "--model.init_args.disc_start_step", "2", "--data.init_args.num_train_clips", "64",
           "--data.init_args.num_val_clips", "4", "--data.init_args.segment_seconds", "0.25",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    run_training_cli(args, cwd=tmp_path)
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    assert any(r.get("train/loss_d") for r in rows) and any(r.get("val/si_sdr_nq8") for r in rows)
    assert len(list((log_dir / "audio" / "step_0000004").glob("*.wav"))) == 6
