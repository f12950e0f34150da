"""Image training: data rules (grayscale, RGBA, small, corrupt, empty), the embedded photo set, metrics,
generator-step counting with a discriminator, and resuming that restores codebook EMA state exactly."""

import logging
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from image_helpers import tiny_tokenizer
from PIL import Image
from vqlib.models.image_losses import ImageTokenizerLoss
from vqlib.training import EmbeddedImageDataModule, ImageFolderDataModule, ImageTokenizerModule
from vqlib.training.image_data import EpochShuffleSampler, to_rgb
from vqlib.training.metrics import CodebookUsageTracker, psnr, ssim

from vqlib import VectorQuantize


# ---------------------------------------------------------------------------------------------------------------
# Decoding rules
# ---------------------------------------------------------------------------------------------------------------
def test_grayscale_is_replicated_to_rgb():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    rgb = np.asarray(to_rgb(gray))
    assert rgb.shape == (8, 8, 3) and (rgb == np.asarray(gray)[..., None]).all()
    deep = Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8))  # 16-bit: scaled, not clipped
    out = np.asarray(to_rgb(deep))
    assert out.shape == (8, 8, 3) and out.max() == round(63000 / 65535 * 255) and out[0, 1, 0] == 4


def test_transparency_on_white_or_dropped():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red-ish colour under the alpha
    arr[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    rgba = Image.fromarray(arr, mode="RGBA")
    white = np.asarray(to_rgb(rgba, "white"))
    assert (white[:2] == [200, 0, 0]).all() and (white[2:] == 255).all()
    dropped = np.asarray(to_rgb(rgba, "drop"))
    assert (dropped == [200, 0, 0]).all()
    la = Image.fromarray(arr[..., [0, 3]], mode="LA")
    assert (np.asarray(to_rgb(la))[2:] == 255).all()


# ---------------------------------------------------------------------------------------------------------------
# Folder data module
# ---------------------------------------------------------------------------------------------------------------
def make_folder(root, *, corrupt=True):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 36, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8), mode="L").save(root / "small_gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA").save(root / "sub" / "alpha.png")
    (root / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        good = (root / "a.png").read_bytes()
        (root / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_folder_rules_and_corrupt_files_are_skipped_and_reported(tmp_path, caplog):
    make_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), crop_size=16, batch_size=2, val_fraction=0.25, seed=1)
    with caplog.at_level(logging.WARNING), pytest.warns(RuntimeWarning, match="skipped 2 unreadable"):
        dm.setup("fit")
    assert sorted(p.name for p, _ in dm.skipped) == ["broken.png", "truncated.png"]
    assert "skipped 2 unreadable" in caplog.text and "broken.png" in caplog.text and "truncated.png" in caplog.text
    names = sorted(p.name for p in dm.train_files + dm.val_files)
    assert names == ["a.png", "alpha.png", "b.jpg", "small_gray.png"]  # recursive, non-images ignored
    assert len(dm.val_files) == 1 and not set(dm.val_files) & set(dm.train_files)
    again = ImageFolderDataModule(str(tmp_path), crop_size=16, val_fraction=0.25, seed=1)
    with pytest.warns(RuntimeWarning):
        again.setup("fit")
    assert again.val_files == dm.val_files  # deterministic split
    train = dm.train_dataloader().dataset
    for i in range(len(train)):
        x = train[i]
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    small = train.files.index(tmp_path / "small_gray.png") if tmp_path / "small_gray.png" in train.files else None
    if small is not None:  # a 10x12 grayscale image is upscaled to the crop and replicated to 3 channels
        x = train[small]
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape[1:] == (3, 16, 16)


def test_strict_mode_raises_naming_files(tmp_path):
    make_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), crop_size=16, strict=True)
    with pytest.raises(ValueError, match="2 unreadable image file.*broken.png.*truncated.png"):
        dm.setup("fit")


def test_corrupt_file_found_mid_epoch_is_replaced_not_fatal(tmp_path):
    make_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), crop_size=16, val_fraction=0.0, check_files="none")
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    broken = ds.files.index(tmp_path / "broken.png")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image .*broken.png"):
        x = ds[broken]
    assert x.shape == (3, 16, 16)


def test_empty_and_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path / 'missing'} does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup("fit")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"image folder {tmp_path / 'empty'} contains no images"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# Embedded photographs
# ---------------------------------------------------------------------------------------------------------------
def test_embedded_photos_are_deterministic_and_split_by_photo():
    a = EmbeddedImageDataModule(crop_size=32, batch_size=4, train_samples=16, val_samples=8, seed=3)
    b = EmbeddedImageDataModule(crop_size=32, batch_size=4, train_samples=16, val_samples=8, seed=3)
    a.setup(), b.setup()
    assert a.train_set.crops == b.train_set.crops
    assert not set(a.train_photos) & set(a.val_photos)
    assert len(a.val_set) == 8
    x = a.train_set[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and x.std() > 0.01  # a real photo crop
    assert torch.equal(next(iter(a.train_dataloader())), next(iter(b.train_dataloader())))
    with pytest.raises(ValueError, match="must not overlap"):
        EmbeddedImageDataModule(train_photos=["astronaut", "china"], val_photos=["china"])
    with pytest.raises(ValueError, match="unknown embedded photo 'lena'"):
        EmbeddedImageDataModule(val_photos=["lena"])


def test_epoch_shuffle_sampler_depends_on_seed_and_epoch_only():
    s = EpochShuffleSampler(20, seed=1)
    first = list(s)
    assert sorted(first) == list(range(20)) and list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------
def test_psnr_and_ssim_against_references():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 24, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 24, 24, generator=g)).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(a, b), -10 * torch.log10(mse))
    ours = ssim(a, b)
    for i in range(2):
        ref = structural_similarity(
            a[i].permute(1, 2, 0).numpy(),
            b[i].permute(1, 2, 0).numpy(),
            channel_axis=2,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(2))


def test_codebook_usage_over_many_batches():
    t = CodebookUsageTracker(codebook_size=10, levels=2)
    t.update(torch.tensor([[0, 1], [0, 2]]), has_level_axis=True)
    t.update(torch.tensor([[3, 1], [-1, 1]]), has_level_axis=True)  # -1: a dropped level, ignored
    stats = t.compute()
    assert torch.allclose(stats["usage"], torch.tensor([0.2, 0.2]))

    # level 0 counts {0: 2, 3: 1}; level 1 counts {1: 3, 2: 1}
    def perplexity(counts):
        p = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        return torch.exp(-(p * p.log()).sum()).item()

    assert stats["perplexity"][0].item() == pytest.approx(perplexity([2, 1]))
    assert stats["perplexity"][1].item() == pytest.approx(perplexity([3, 1]))


# ---------------------------------------------------------------------------------------------------------------
# LightningModule: step counting and exact resume
# ---------------------------------------------------------------------------------------------------------------
def tiny_module(seed=0, disc_start=2):
    tok = tiny_tokenizer(VectorQuantize(8, 32, kmeans_init=True, decay=0.9, seed=0), seed=seed)
    loss = ImageTokenizerLoss(disc_weight=0.5, disc_start=disc_start, disc_ndf=8, disc_layers=2)
    torch.manual_seed(seed)
    return ImageTokenizerModule(tok, loss, learning_rate=1e-3)


def tiny_data():
    return EmbeddedImageDataModule(crop_size=16, batch_size=4, train_samples=12, val_samples=4)


def trainer(root, max_epochs, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, default_root_dir=root, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, deterministic=True, **kwargs)  # fmt: skip


def quantizer_buffers(module):
    return {k: v.clone() for k, v in module.tokenizer.quantizer.state_dict().items()}


def test_global_step_counts_generator_steps_and_discriminator_starts_late(tmp_path):
    module = tiny_module(disc_start=2)
    disc_before = {k: v.clone() for k, v in module.loss.discriminator.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
        t.fit(module, datamodule=tiny_data())
    assert t.global_step == 3  # 3 batches, although the discriminator also stepped at steps 2
    changed = [k for k, v in module.loss.discriminator.state_dict().items() if not torch.equal(v, disc_before[k])]
    assert changed  # the discriminator trained once it started


def test_resume_restores_ema_state_exactly_and_continues_bit_identically(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.seed_everything(0)
        continuous = tiny_module()
        trainer(tmp_path / "a", max_epochs=2, enable_checkpointing=False).fit(continuous, datamodule=tiny_data())

        L.seed_everything(0)
        first = tiny_module()
        t1 = trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=False)
        t1.fit(first, datamodule=tiny_data())
        ckpt = tmp_path / "half.ckpt"
        t1.save_checkpoint(ckpt)
        saved = quantizer_buffers(first)
        assert any("embed_avg" in k for k in saved) and any("cluster_size" in k for k in saved)

        class RecordRestored(L.Callback):
            def on_train_start(self, trainer, module):
                self.buffers = quantizer_buffers(module)

        L.seed_everything(0)
        resumed = tiny_module(seed=1)  # different init: everything must come from the checkpoint
        record = RecordRestored()
        t2 = trainer(tmp_path / "c", max_epochs=2, enable_checkpointing=False, callbacks=[record])
        t2.fit(resumed, datamodule=tiny_data(), ckpt_path=ckpt, weights_only=True)
    for k, v in saved.items():
        assert torch.equal(record.buffers[k], v), f"{k} not restored exactly"
    assert t2.global_step == 6
    final, expected = resumed.state_dict(), continuous.state_dict()
    for k in expected:
        assert torch.equal(final[k], expected[k]), f"{k} differs after resuming"


def test_learning_rate_warmup_and_cosine_decay():
    module = ImageTokenizerModule(
        tiny_tokenizer(), learning_rate=1.0, warmup_steps=10, lr_decay="cosine", min_lr_ratio=0.1
    )
    module.trainer = L.Trainer(max_steps=110, logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert module.generator_lr(0) == pytest.approx(0.1)
    assert module.generator_lr(9) == pytest.approx(1.0)
    assert module.generator_lr(60) == pytest.approx(0.55)  # half-way through the decay
    assert module.generator_lr(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        ImageTokenizerModule(tiny_tokenizer(), lr_decay="step")


def test_quantizer_parameters_get_their_own_learning_rate_and_weight_decay(tmp_path):
    vq = VectorQuantize(8, 32, reparam="simvq", codebook_update="gradient")
    module = ImageTokenizerModule(
        tiny_tokenizer(vq), learning_rate=1e-3, weight_decay=0.0, quantizer_lr_mult=30.0,
        quantizer_weight_decay=1.0, warmup_steps=10,
    )  # fmt: skip
    opt = module.configure_optimizers()
    # weight decay applies to parameters of 2+ dims only: the map's matrix decays, its bias does not (issue 12)
    rest, quant, quant_1d = opt.param_groups
    assert {id(p) for p in quant["params"] + quant_1d["params"]} == {id(p) for p in vq.parameters()}
    assert not {id(p) for p in rest["params"]} & {id(p) for p in vq.parameters()}
    assert (rest["lr"], rest["weight_decay"]) == (1e-3, 0.0)
    assert quant["lr"] == pytest.approx(3e-2) and quant["weight_decay"] == 1.0
    assert quant_1d["lr"] == pytest.approx(3e-2) and quant_1d["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in quant["params"]) and all(p.ndim == 1 for p in quant_1d["params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_epochs=1, enable_checkpointing=False).fit(module, datamodule=tiny_data())
    rest, quant, quant_1d = module.optimizers().optimizer.param_groups
    assert rest["lr"] == pytest.approx(module.generator_lr(2))  # warm-up applies to both groups
    assert quant["lr"] == quant_1d["lr"] == pytest.approx(30 * module.generator_lr(2))
    with pytest.raises(ValueError, match="quantizer_lr_mult"):
        ImageTokenizerModule(tiny_tokenizer(), quantizer_lr_mult=0.0)


def test_weight_decay_skips_biases_and_norm_gains():
    module = ImageTokenizerModule(tiny_tokenizer(), tiny_module().loss, weight_decay=0.1)
    opt_g, opt_d = module.configure_optimizers()
    for opt, model in ((opt_g, module.tokenizer), (opt_d, module.loss.discriminator)):
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        for name, p in model.named_parameters():
            assert (id(p) in decayed) == (p.ndim >= 2), name  # conv kernels decay; biases, GroupNorm gains do not


def test_hyperparameters_are_saved_in_checkpoints(tmp_path):
    module = ImageTokenizerModule(tiny_tokenizer(), learning_rate=3e-3, lr_decay="cosine", weight_decay=0.01)
    hp = module.hparams
    assert (hp.learning_rate, hp.lr_decay, hp.weight_decay, hp.betas) == (3e-3, "cosine", 0.01, (0.5, 0.9))
    assert "tokenizer" not in hp and "loss" not in hp  # modules travel in the state dict, not as hyperparameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, max_epochs=1, enable_checkpointing=False, limit_train_batches=1)
        t.fit(module, datamodule=tiny_data())
    t.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["learning_rate"] == 3e-3 and saved["lr_decay"] == "cosine" and saved["weight_decay"] == 0.01
