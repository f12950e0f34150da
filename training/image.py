"""LightningModule training an :class:`~vqlib.models.ImageTokenizer` (manual optimisation: generator + PatchGAN).

Every validation logs ``val/psnr``, ``val/ssim`` (images mapped to [0, 1]), ``val/rec_loss``, codebook usage
and perplexity over the whole validation set per quantizer level (``val/usage``, ``val/perplexity`` and
``val/usage_level{i}`` ... for several levels/heads), ``val/tokens_per_image`` and ``val/bits_per_image``, and
writes a PNG grid (originals on odd rows, reconstructions below them) to
``<log_dir>/reconstructions/{val,test}_step_XXXXXXX.png``.

``trainer.global_step`` counts generator steps only: discriminator steps are not counted, so ``max_steps``
means training batches whether or not the discriminator is active.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from vqlib.models.image_losses import ImageTokenizerLoss
from vqlib.models.image_tokenizer import ImageTokenizer

from vqlib.validation import check_choice

from .common import log_folder, step_without_counting, weight_decay_groups
from .metrics import CodebookUsageTracker, psnr, ssim

LrDecay = Literal["none", "cosine"]


def _images(batch: Any) -> Tensor:
    # Data modules yield image tensors; accept (images, ...) tuples / {"images": ...} from custom ones.
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["images"]
    return batch[0]


class ImageTokenizerModule(LightningModule):
    """Trains ``tokenizer`` with ``loss`` (reconstruction + quantizer loss + optional LPIPS / PatchGAN).

    Args:
        tokenizer: the ImageTokenizer (``export`` writes this attribute with save_pretrained).
        loss: ImageTokenizerLoss; default: L1 + quantizer loss, no discriminator.
        learning_rate / disc_learning_rate: Adam learning rates (discriminator defaults to the generator's).
        betas: Adam betas ((0.5, 0.9) as in taming / VQGAN).
        weight_decay: AdamW decoupled weight decay (0 = Adam), on parameters of 2+ dimensions only (never on
            biases or norm gains); also the discriminator's.
        quantizer_lr_mult / quantizer_weight_decay: learning-rate factor and weight decay of the quantizer's
            own parameters (e.g. SimVQ's linear map), in their own optimiser group; decay None = weight_decay.
            At 65,536 codes, SimVQ's usage needs decay on its map (benchmarks/bench_utilization.py: 99.6%
            with decay 1.0 and x30 learning rate, 84% without decay).
        warmup_steps: linear learning-rate warm-up of the generator.
        lr_decay: "cosine" decays the generator's learning rate to ``min_lr_ratio`` x its value at
            ``trainer.max_steps`` (no decay when max_steps is unset); "none" keeps it constant.
        gradient_clip: clip the generator's gradient norm (None = off; manual optimisation ignores
            ``trainer.gradient_clip_val``).
        num_logged_images: images per reconstruction grid.
    """

    def __init__(
        self,
        tokenizer: ImageTokenizer,
        loss: ImageTokenizerLoss | None = None,
        *,
        learning_rate: float = 1e-4,
        disc_learning_rate: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        quantizer_lr_mult: float = 1.0,
        quantizer_weight_decay: float | None = None,
        warmup_steps: int = 0,
        lr_decay: LrDecay = "none",
        min_lr_ratio: float = 0.1,
        gradient_clip: float | None = None,
        num_logged_images: int = 8,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "loss"])
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.loss = loss if loss is not None else ImageTokenizerLoss(disc_weight=0.0)
        self.learning_rate = learning_rate
        self.disc_learning_rate = disc_learning_rate if disc_learning_rate is not None else learning_rate
        self.betas, self.weight_decay = tuple(betas), weight_decay
        if quantizer_lr_mult <= 0:
            raise ValueError(f"quantizer_lr_mult must be > 0, got {quantizer_lr_mult}")
        self.quantizer_lr_mult = quantizer_lr_mult
        self.quantizer_weight_decay = weight_decay if quantizer_weight_decay is None else quantizer_weight_decay
        check_choice("lr_decay", lr_decay, LrDecay)
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.gradient_clip = warmup_steps, gradient_clip
        self.lr_decay, self.min_lr_ratio = lr_decay, min_lr_ratio
        self.num_logged_images = num_logged_images
        q = tokenizer.quantizer
        levels = tokenizer.codes_per_token
        self.usage = CodebookUsageTracker(q.codebook_size, levels)
        self._logged: list[tuple[Tensor, Tensor]] = []

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        def adam(groups, lr):
            return torch.optim.AdamW(groups, lr=lr, betas=self.betas)

        quantizer_ids = {id(p) for p in self.tokenizer.quantizer.parameters()}
        trainable = [p for p in self.tokenizer.parameters() if p.requires_grad]
        rest = [p for p in trainable if id(p) not in quantizer_ids]
        quantizer_params = [p for p in trainable if id(p) in quantizer_ids]
        groups = weight_decay_groups(rest, self.weight_decay, lr_mult=1.0)
        groups += weight_decay_groups(quantizer_params, self.quantizer_weight_decay, lr_mult=self.quantizer_lr_mult)
        for group in groups:
            group["lr"] = self.learning_rate * group["lr_mult"]
        opt_g = adam(groups, self.learning_rate)
        if self.loss.discriminator is None:
            return opt_g
        return [
            opt_g,
            adam(weight_decay_groups(self.loss.discriminator.parameters(), self.weight_decay), self.disc_learning_rate),
        ]

    def generator_lr(self, step: int) -> float:
        """Learning rate of the generator at ``step``: linear warm-up, then constant or cosine decay."""
        lr = self.learning_rate
        if self.warmup_steps > 0:
            lr *= min(1.0, (step + 1) / self.warmup_steps)
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if self.lr_decay == "cosine" and max_steps and max_steps > 0:
            progress = min(1.0, max(0, step - self.warmup_steps) / max(1, max_steps - self.warmup_steps))
            lr *= self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr

    def _optimizers(self):
        opts = self.optimizers()
        return (opts, None) if not isinstance(opts, list) else (opts[0], opts[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = _images(batch)
        step = self.global_step
        opt_g, opt_d = self._optimizers()
        if self.warmup_steps > 0 or self.lr_decay != "none":
            for group in opt_g.optimizer.param_groups:
                group["lr"] = self.generator_lr(step) * group["lr_mult"]

        out = self.tokenizer(images)
        disc_active = self.loss.discriminator_active(step)
        if disc_active:
            self.toggle_optimizer(opt_g)  # discriminator params take no gradient from the generator loss
        g_loss, g_logs = self.loss.generator_loss(
            images, out.reconstruction, out.quantizer_loss, step, self.tokenizer.last_layer
        )
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        if self.gradient_clip is not None:
            self.clip_gradients(opt_g, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        if disc_active:
            self.untoggle_optimizer(opt_g)

        logs = {f"train/{k}": v for k, v in g_logs.items()}
        if disc_active and opt_d is not None:
            self.toggle_optimizer(opt_d)
            d_loss, d_logs = self.loss.discriminator_loss(images, out.reconstruction.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            step_without_counting(opt_d)
            self.untoggle_optimizer(opt_d)
            logs.update({f"train/{k}": v for k, v in d_logs.items()})
        for key in ("perplexity", "batch_usage", "usage", "dead_codes"):
            value = out.metrics.get(key)
            if value is not None:
                logs[f"train/{key}"] = value.float().mean()
        self.log_dict(logs, prog_bar=False, batch_size=images.shape[0])
        self.log("loss", g_logs["rec_loss"], prog_bar=True, logger=False, batch_size=images.shape[0])
        return g_loss.detach()

    # -- evaluation -------------------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, batch_idx: int, prefix: str) -> None:
        images = _images(batch)
        out = self.tokenizer(images)
        rec = out.reconstruction.clamp(-1, 1)
        real01, rec01 = (images + 1) / 2, (rec + 1) / 2
        b = images.shape[0]
        metrics = {
            f"{prefix}/psnr": psnr(real01, rec01).clamp_max(100.0).mean(),
            f"{prefix}/rec_loss": self.loss.reconstruction_loss(images, out.reconstruction),
            f"{prefix}/quantizer_loss": out.quantizer_loss.detach(),
        }
        if min(images.shape[-2:]) >= 11:
            metrics[f"{prefix}/ssim"] = ssim(real01, rec01).mean()
        for key, value in metrics.items():
            self.log(
                key, value, on_epoch=True, on_step=False, sync_dist=True, batch_size=b, prog_bar=key.endswith("psnr")
            )
        self.usage.update(out.indices, has_level_axis=self.tokenizer.quantizer.code_axis)
        # A few images from every batch, so that the grid spans the whole validation set.
        taken = sum(r.shape[0] for r, _ in self._logged)
        if taken < self.num_logged_images:
            batches = self._num_eval_batches(prefix)
            per_batch = max(1, math.ceil(self.num_logged_images / batches)) if batches else self.num_logged_images
            k = min(per_batch, self.num_logged_images - taken)
            self._logged.append((images[:k].detach().cpu(), rec[:k].detach().cpu()))
        self._image_size = tuple(images.shape[-2:])

    def _num_eval_batches(self, prefix: str) -> int:
        counts = self.trainer.num_val_batches if prefix == "val" else self.trainer.num_test_batches
        total = sum(counts)
        return int(total) if math.isfinite(total) else 0  # 0: unknown length

    def on_validation_epoch_start(self) -> None:
        self._logged = []
        self.usage.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_summary("val")

    def on_test_epoch_start(self) -> None:
        self._logged = []
        self.usage.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_summary("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Token indices of each image."""
        return self.tokenizer.encode(_images(batch))

    def _log_epoch_summary(self, prefix: str) -> None:
        stats = self.usage.compute(device=self.device)
        usage, perplexity = stats["usage"], stats["perplexity"]
        logs = {f"{prefix}/usage": usage.mean(), f"{prefix}/perplexity": perplexity.mean()}
        if usage.numel() > 1:
            for i in range(usage.numel()):
                logs[f"{prefix}/usage_level{i}"] = usage[i]
                logs[f"{prefix}/perplexity_level{i}"] = perplexity[i]
        if getattr(self, "_image_size", None) is not None:
            logs[f"{prefix}/tokens_per_image"] = torch.tensor(float(self.tokenizer.tokens_per_image(self._image_size)))
            logs[f"{prefix}/bits_per_image"] = torch.tensor(self.tokenizer.bits_per_image(self._image_size))
        # Values are already identical on every rank (gathered), so no sync_dist.
        self.log_dict({k: v.float() for k, v in logs.items()}, prog_bar=False)
        self._write_grid(prefix)

    def _write_grid(self, prefix: str) -> None:
        if not self._logged or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        from torchvision.utils import save_image

        real = torch.cat([r for r, _ in self._logged])
        rec = torch.cat([r for _, r in self._logged])
        self._logged = []
        rows = max(1, min(8, real.shape[0]))
        # Originals and reconstructions interleaved in row pairs.
        pairs = [torch.cat([real[i : i + rows], rec[i : i + rows]]) for i in range(0, real.shape[0], rows)]
        grid = (torch.cat(pairs) + 1) / 2
        folder = log_folder(self) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"{prefix}_step_{self.global_step:07d}.png", nrow=rows)

    def log_folder(self) -> str:
        """The logger's log_dir (where metrics go), else the trainer's default_root_dir."""
        return str(log_folder(self))


__all__ = ["ImageTokenizerModule", "step_without_counting"]
