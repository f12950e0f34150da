"""Image DataModules: a folder of your own images, and an embedded default made of the real photographs
shipped inside scikit-image and scikit-learn (no download).

Batches are float tensors (b, 3, crop, crop) in [-1, 1].

Rules for :class:`ImageFolderDataModule` (documented behaviour, tested):

* Files: ``extensions`` (png, jpg, jpeg, bmp, gif, tif, tiff, webp by default), found recursively, sorted.
* Validation split: a ``val_fraction`` of the files (at least one when there are two or more), chosen by a
  seeded permutation, so the split is the same on every run and every DDP rank; the two sets share no file.
* Grayscale (L, I, I;16, F, 1) is replicated to three channels; palette images are expanded.
* Transparency (RGBA, LA, P with transparency): composited on white (``alpha="white"``, default) or the alpha
  channel is dropped (``alpha="drop"``).
* ``resize``: when set, the shorter side is first resized to it (keeps aspect ratio). Independently, an image
  whose shorter side is smaller than ``crop_size`` is upscaled (bicubic) so that its shorter side equals
  ``crop_size``: small images are never padded or rejected.
* Training takes random crops (plus random horizontal flips if ``random_flip``), validation takes centre crops.
* Unreadable or corrupt files are found at setup (``check_files="full"`` decodes every file, ``"header"`` only
  opens and verifies it): they are skipped and their count and names are logged as a warning, or with
  ``strict=True`` setup raises listing them. A file that still fails to decode during training is replaced by
  the next readable file and reported (a warning naming it), never crashing an epoch.
* An empty or missing folder raises an error naming the folder.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vqlib.core.seeds import derive_seed
from vqlib.validation import check_choice

AlphaRule = Literal["white", "drop"]  # transparent pixels: composited on white, or the alpha channel dropped
FileCheck = Literal["full", "header", "none"]

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp")


# ---------------------------------------------------------------------------------------------------------------
# Image decoding rules
# ---------------------------------------------------------------------------------------------------------------
def to_rgb(img: Image.Image, alpha: AlphaRule = "white") -> Image.Image:
    """Apply the documented colour rules: grayscale -> RGB, transparency -> white background or dropped."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I") and arr.max() > 255 else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if alpha == "white":
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")  # drops alpha
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.Resampling.BICUBIC)


def load_image(path: Path, alpha: AlphaRule = "white") -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img, alpha)


def check_image_file(path: Path, full: bool) -> str | None:
    """None when readable, else the reason."""
    try:
        with Image.open(path) as img:
            if full:
                img.load()
            else:
                img.verify()
        return None
    except Exception as e:  # PIL raises many types for corrupt data
        return f"{type(e).__name__}: {e}"


def find_images(root: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {("." + e.lower().lstrip(".")) for e in extensions}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch): resuming from a checkpoint replays the same order."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at every epoch start
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch_shuffle", self.epoch))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


# ---------------------------------------------------------------------------------------------------------------
# Folder data set
# ---------------------------------------------------------------------------------------------------------------
class ImageFileDataset(Dataset):
    def __init__(
        self,
        files: list[Path],
        crop_size: int,
        *,
        train: bool,
        resize: int | None = None,
        random_flip: bool = True,
        alpha: AlphaRule = "white",
        strict: bool = False,
    ):
        if not files:
            raise ValueError("ImageFileDataset: no files")
        self.files, self.crop_size, self.train = files, crop_size, train
        self.resize, self.random_flip, self.alpha, self.strict = resize, random_flip, alpha, strict

    def __len__(self) -> int:
        return len(self.files)

    def _prepare(self, path: Path) -> Tensor:
        img = load_image(path, self.alpha)
        if self.resize is not None:
            img = resize_shorter_side(img, self.resize)
        if min(img.size) < self.crop_size:
            img = resize_shorter_side(img, self.crop_size)
        w, h = img.size
        c = self.crop_size
        if self.train:
            top = int(torch.randint(0, h - c + 1, ()).item())
            left = int(torch.randint(0, w - c + 1, ()).item())
        else:
            top, left = (h - c) // 2, (w - c) // 2
        x = to_tensor(img.crop((left, top, left + c, top + c)))
        if self.train and self.random_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x

    def __getitem__(self, index: int) -> Tensor:
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                return self._prepare(path)
            except Exception as e:
                if self.strict:
                    raise OSError(f"could not read image {path}: {e}") from e
                warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", RuntimeWarning)
        raise OSError(f"none of the {len(self.files)} images could be read (first: {self.files[0]})")


class ImageFolderDataModule(LightningDataModule):
    """Images from a folder (recursive). See the module docstring for the documented rules.

    Args:
        root: the folder. crop_size: square crop side (must be divisible by the tokenizer's factor).
        val_fraction: share of files held out for validation (seeded, file level).
        val_root: a separate validation folder instead of the split.
        resize: resize the shorter side to this first (e.g. 256 for ImageNet-style training); None keeps sizes.
        check_files: "full" (decode every file at setup), "header" (open + verify; fast for huge sets), "none".
        strict: raise on unreadable files instead of skipping them.
        alpha: "white" (composite on white) or "drop" (discard the alpha channel).
    """

    def __init__(
        self,
        root: str,
        *,
        crop_size: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        val_root: str | None = None,
        resize: int | None = None,
        random_flip: bool = True,
        alpha: AlphaRule = "white",
        check_files: FileCheck = "full",
        strict: bool = False,
        extensions: list[str] = list(DEFAULT_EXTENSIONS),
        seed: int = 0,
    ):
        super().__init__()
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_choice("alpha", alpha, AlphaRule)
        check_choice("check_files", check_files, FileCheck)
        self.root, self.val_root = Path(root).expanduser(), (Path(val_root).expanduser() if val_root else None)
        self.crop_size, self.batch_size = crop_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.val_fraction, self.resize = num_workers, val_fraction, resize
        self.random_flip, self.alpha, self.check_files, self.strict = random_flip, alpha, check_files, strict
        self.extensions, self.seed = list(extensions), seed
        self.skipped: list[tuple[Path, str]] = []
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []

    def _scan(self, folder: Path) -> list[Path]:
        if not folder.exists():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        if not folder.is_dir():
            raise NotADirectoryError(f"image folder {folder} is not a folder")
        files = find_images(folder, self.extensions)
        if not files:
            raise ValueError(
                f"image folder {folder} contains no images (looked recursively for extensions {self.extensions})"
            )
        if self.check_files != "none":
            good, bad = [], []
            for path in files:
                reason = check_image_file(path, full=self.check_files == "full")
                if reason is None:
                    good.append(path)
                else:
                    bad.append((path, reason))
            self.skipped.extend(bad)
            if bad and self.strict:
                listing = "; ".join(f"{p}: {r}" for p, r in bad)
                raise ValueError(f"{len(bad)} unreadable image file(s) in {folder} (strict=True): {listing}")
            if bad:
                names = ", ".join(str(p) for p, _ in bad[:50]) + (f" and {len(bad) - 50} more" if len(bad) > 50 else "")
                message = f"skipped {len(bad)} unreadable image file(s) in {folder}: {names}"
                log.warning(message)
                warnings.warn(message, RuntimeWarning)
            files = good
            if not files:
                raise ValueError(f"image folder {folder}: none of its {len(bad)} image files could be read")
        return files

    def setup(self, stage: str | None = None) -> None:
        if self.train_files:
            return
        self.skipped = []
        files = self._scan(self.root)
        if self.val_root is not None:
            self.train_files, self.val_files = files, self._scan(self.val_root)
            return
        n_val = int(round(len(files) * self.val_fraction))
        if self.val_fraction > 0 and len(files) >= 2:
            n_val = min(max(n_val, 1), len(files) - 1)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val_ids = set(order[:n_val])
        self.val_files = [f for i, f in enumerate(files) if i in val_ids]
        self.train_files = [f for i, f in enumerate(files) if i not in val_ids]

    def _dataset(self, files: list[Path], train: bool) -> ImageFileDataset:
        return ImageFileDataset(files, self.crop_size, train=train, resize=self.resize,
                                random_flip=self.random_flip, alpha=self.alpha, strict=self.strict)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset(self.train_files, train=True)
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(ds), self.seed),
                          num_workers=self.num_workers, drop_last=len(ds) >= self.batch_size,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        if not self.val_files:
            raise ValueError(f"no validation images: set val_fraction > 0 or val_root (folder {self.root})")
        return DataLoader(self._dataset(self.val_files, train=False), batch_size=self.val_batch_size,
                          num_workers=self.num_workers)  # fmt: skip

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ---------------------------------------------------------------------------------------------------------------
# Embedded photographs (scikit-image + scikit-learn)
# ---------------------------------------------------------------------------------------------------------------
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle")  # fmt: skip
SKLEARN_PHOTOS = ("china", "flower")
EMBEDDED_PHOTOS = SKIMAGE_PHOTOS + SKLEARN_PHOTOS


def load_embedded_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photograph shipped inside scikit-image or scikit-learn."""
    if name in SKIMAGE_PHOTOS:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle -> left view
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    raise ValueError(f"unknown embedded photo {name!r}; available: {', '.join(EMBEDDED_PHOTOS)}")


class PhotoCropDataset(Dataset):
    """Crops of in-memory photos. ``crops`` is a list of (photo, top, left, flip)."""

    def __init__(self, photos: list[Tensor], crops: list[tuple[int, int, int, bool]], crop_size: int):
        self.photos, self.crops, self.crop_size = photos, crops, crop_size

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> Tensor:
        p, top, left, flip = self.crops[index]
        x = self.photos[p][:, top : top + self.crop_size, left : left + self.crop_size]
        return x.flip(-1) if flip else x.clone()


class EmbeddedImageDataModule(LightningDataModule):
    """Crops of real photographs shipped with scikit-image and scikit-learn; needs no download.

    Validation uses whole held-out photographs (``val_photos``), so no validation crop overlaps any training
    crop. Training crops are drawn at seeded random positions (``train_samples`` per epoch, same on every
    rank); validation crops are a fixed grid over the held-out photos with step ``val_stride`` (default: the
    crop size, i.e. non-overlapping), ``val_samples`` of them spread evenly over the grid. Codebook usage is
    measured over the validation tokens, so they should outnumber the codes (overlapping crops help).
    ``scale`` resizes every photo first (0.5 = half size: more content per crop).
    """

    def __init__(
        self,
        *,
        crop_size: int = 64,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        scale: float = 0.5,
        train_photos: list[str] | None = None,
        val_photos: list[str] = ["chelsea", "china"],
        train_samples: int = 16384,
        val_samples: int = 64,
        val_stride: int | None = None,
        random_flip: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        val_photos = list(val_photos)
        train_photos = (
            [p for p in EMBEDDED_PHOTOS if p not in val_photos] if train_photos is None else list(train_photos)
        )
        for name in train_photos + val_photos:
            if name not in EMBEDDED_PHOTOS:
                raise ValueError(f"unknown embedded photo {name!r}; available: {', '.join(EMBEDDED_PHOTOS)}")
        if overlap := sorted(set(train_photos) & set(val_photos)):
            raise ValueError(f"train_photos and val_photos must not overlap, both contain {overlap}")
        if not train_photos or not val_photos:
            raise ValueError("EmbeddedImageDataModule needs at least one training and one validation photo")
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        self.crop_size, self.batch_size = crop_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.scale = num_workers, scale
        self.train_photos, self.val_photos = train_photos, val_photos
        if val_stride is not None and val_stride < 1:
            raise ValueError(f"val_stride must be >= 1, got {val_stride}")
        self.train_samples, self.val_samples = train_samples, val_samples
        self.val_stride = val_stride or crop_size
        self.random_flip, self.seed = random_flip, seed
        self.train_set: PhotoCropDataset | None = None
        self.val_set: PhotoCropDataset | None = None

    def _load(self, names: list[str]) -> list[Tensor]:
        photos = []
        for name in names:
            img = Image.fromarray(load_embedded_photo(name)).convert("RGB")
            if self.scale != 1:
                img = img.resize(
                    (round(img.width * self.scale), round(img.height * self.scale)), Image.Resampling.LANCZOS
                )
            if min(img.size) < self.crop_size:
                img = resize_shorter_side(img, self.crop_size)
            photos.append(to_tensor(img))
        return photos

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.crop_size
        train = self._load(self.train_photos)
        rng = np.random.default_rng(self.seed)
        # Photos are drawn in proportion to their area, so big photos contribute more distinct crops.
        areas = np.array([p.shape[1] * p.shape[2] for p in train], dtype=np.float64)
        which = rng.choice(len(train), size=self.train_samples, p=areas / areas.sum())
        crops = []
        for p in which:
            h, w = train[p].shape[1:]
            flip = bool(rng.random() < 0.5) and self.random_flip
            crops.append((int(p), int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1)), flip))
        self.train_set = PhotoCropDataset(train, crops, c)

        val = self._load(self.val_photos)
        grid = [(i, top, left, False) for i, p in enumerate(val)
                for top in range(0, p.shape[1] - c + 1, self.val_stride)
                for left in range(0, p.shape[2] - c + 1, self.val_stride)]  # fmt: skip
        if len(grid) > self.val_samples:
            keep = np.linspace(0, len(grid) - 1, self.val_samples).round().astype(int)
            grid = [grid[i] for i in keep]
        self.val_set = PhotoCropDataset(val, grid, c)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, drop_last=True,
                          sampler=EpochShuffleSampler(len(self.train_set), self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


__all__ = [
    "EMBEDDED_PHOTOS",
    "EmbeddedImageDataModule",
    "EpochShuffleSampler",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "load_embedded_photo",
    "to_rgb",
]
