"""Audio DataModules: a folder of audio files, and procedurally synthesised audio (the default).

Both yield float32 batches ``(batch, channels, segment_samples)`` at the DataModule's ``sample_rate``.

Folder rules (:class:`AudioFolderDataModule`):

* files: every ``*.wav``, ``*.flac``, ``*.mp3``, ``*.ogg`` (case-insensitive; ``extensions=``) under ``root``,
  recursively, read with ``soundfile`` (libsndfile; MP3 needs libsndfile >= 1.1).
* a missing folder, or one without audio files: ``FileNotFoundError`` / ``ValueError`` naming the folder.
* at ``setup`` every file is probed (header + its first and last blocks decoded). Unreadable, empty
  or corrupt files are skipped; their count and names are logged (logger ``vqlib.training.audio_data``)
  and kept in ``skipped_files``. ``strict=True`` raises instead. A file that fails later, mid-epoch,
  is replaced by the next readable file (logged once per file), never a crash.
* sample rates: files at other rates are resampled (torchaudio); channels are mixed like
  :meth:`vqlib.models.AudioTokenizer.prepare` (average to mono, duplicate mono to stereo; other
  mismatches are skipped as unsupported at setup).
* split: files are ordered by a hash of their path relative to ``root`` and the first
  ``max(1, round(val_fraction * n))`` form the validation set: deterministic, independent of the
  machine and of file-system order, and a file keeps its split when others are added.
* train items: a random ``segment_seconds`` window of a train file (zero-padded when the file is
  shorter); validation items: ``val_segments_per_file`` evenly spaced windows of each validation
  file (deterministic).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from vqlib.models.audio_tokenizer import mix_channels, resample

from .audio_synth import TRAIN_SPLIT, VAL_SPLIT, synthesize_clip

log = logging.getLogger(__name__)
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
_PROBE_FRAMES = 2048


def _soundfile():
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - soundfile is in the train extra
        raise ImportError(
            "reading audio files needs soundfile: pip install 'vqlib[train]' (or pip install soundfile)"
        ) from e
    return soundfile


@dataclass(frozen=True)
class AudioFileInfo:
    path: Path
    frames: int
    sample_rate: int
    channels: int


def _probe(path: Path, channels: int) -> AudioFileInfo:
    """Header + first and last blocks decoded; raises on anything unreadable or unsupported."""
    sf = _soundfile()
    info = sf.info(str(path))
    if info.frames <= 0 or info.samplerate <= 0:
        raise ValueError(f"no audio frames (frames={info.frames}, sample rate={info.samplerate})")
    if info.channels != channels and channels != 1 and info.channels != 1:
        raise ValueError(f"{info.channels} channels cannot be mixed to {channels}")
    with sf.SoundFile(str(path)) as f:
        f.read(min(_PROBE_FRAMES, info.frames), dtype="float32")
        if info.frames > _PROBE_FRAMES:
            f.seek(max(0, info.frames - _PROBE_FRAMES))
            f.read(_PROBE_FRAMES, dtype="float32")
    return AudioFileInfo(path, int(info.frames), int(info.samplerate), int(info.channels))


def read_segment(
    info: AudioFileInfo, start_seconds: float, num_samples: int, sample_rate: int, channels: int
) -> Tensor:
    """``num_samples`` samples at ``sample_rate`` starting at ``start_seconds`` (zero-padded past the end),
    as float32 (channels, num_samples)."""
    sf = _soundfile()
    start = int(round(start_seconds * info.sample_rate))
    # A few extra source samples so the resampler's output covers the whole segment.
    frames = math.ceil(num_samples * info.sample_rate / sample_rate) + 2
    data = sf.read(
        str(info.path), start=start, frames=min(frames, max(0, info.frames - start)), dtype="float32", always_2d=True
    )[0]
    wave = torch.from_numpy(np.ascontiguousarray(data.T))
    wave = resample(mix_channels(wave, channels), info.sample_rate, sample_rate)[..., :num_samples]
    if wave.shape[-1] < num_samples:
        wave = torch.nn.functional.pad(wave, (0, num_samples - wave.shape[-1]))
    return wave


class _FolderSegments(Dataset):
    def __init__(
        self,
        files: list[AudioFileInfo],
        num_samples: int,
        sample_rate: int,
        channels: int,
        *,
        train: bool,
        items: int | None = None,
        segments_per_file: int = 1,
        strict: bool = False,
    ):
        self.files, self.num_samples, self.sample_rate, self.channels = files, num_samples, sample_rate, channels
        self.train, self.strict, self.segments_per_file = train, strict, segments_per_file
        self.length = (items or len(files)) if train else len(files) * segments_per_file
        self.failed: set[Path] = set()

    def __len__(self) -> int:
        return self.length

    def _start(self, info: AudioFileInfo, index: int) -> float:
        segment = self.num_samples / self.sample_rate
        room = max(0.0, info.frames / info.sample_rate - segment)
        if self.train:
            return float(torch.rand(()).item()) * room
        k = index % self.segments_per_file
        return room * (k + 0.5) / self.segments_per_file if self.segments_per_file > 1 else room / 2

    def __getitem__(self, index: int) -> Tensor:
        file_index = (index if self.train else index // self.segments_per_file) % len(self.files)
        for attempt in range(len(self.files)):
            info = self.files[(file_index + attempt) % len(self.files)]
            try:
                return read_segment(info, self._start(info, index), self.num_samples, self.sample_rate, self.channels)
            except Exception as e:  # a file that passed the probe but fails here: use the next one
                if self.strict:
                    raise RuntimeError(f"failed to read {info.path}: {e}") from e
                if info.path not in self.failed:
                    self.failed.add(info.path)
                    log.warning("skipping unreadable audio file %s mid-epoch (%s: %s)", info.path, type(e).__name__, e)
        raise RuntimeError(f"none of the {len(self.files)} audio files could be read")


def _split_key(root: Path, path: Path) -> str:
    return hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest()


class AudioFolderDataModule(LightningDataModule):
    """Audio files under ``root`` -> fixed-length training segments and a held-out validation split
    (rules in the module docstring).

    Args:
        root: folder searched recursively.
        sample_rate, channels: what batches are converted to (match the tokenizer's).
        segment_seconds: train segment length; val_segment_seconds: validation segment length (default: same).
        val_fraction: share of files held out for validation (at least one file).
        val_segments_per_file: evenly spaced validation windows per validation file.
        train_items_per_epoch: random segments per epoch (default: one per train file, at least one batch).
        strict: raise on unreadable files instead of skipping them.
    """

    def __init__(
        self,
        root: str,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        segment_seconds: float = 1.0,
        val_segment_seconds: float | None = None,
        val_fraction: float = 0.1,
        val_segments_per_file: int = 1,
        train_items_per_epoch: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        extensions: Sequence[str] = AUDIO_EXTENSIONS,
        strict: bool = False,
    ):
        super().__init__()
        if channels not in (1, 2):
            raise ValueError(f"channels: expected 1 or 2, got {channels}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
        if segment_seconds <= 0 or (val_segment_seconds is not None and val_segment_seconds <= 0):
            raise ValueError("segment_seconds and val_segment_seconds must be positive")
        self.root = Path(root).expanduser()
        self.sample_rate, self.channels = int(sample_rate), channels
        self.segment_samples = int(round(segment_seconds * sample_rate))
        self.val_segment_samples = int(round((val_segment_seconds or segment_seconds) * sample_rate))
        self.val_fraction, self.val_segments_per_file = val_fraction, val_segments_per_file
        self.train_items_per_epoch = train_items_per_epoch
        self.batch_size, self.num_workers = batch_size, num_workers
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.strict = strict
        self.skipped_files: list[tuple[Path, str]] = []
        self.train_files: list[AudioFileInfo] = []
        self.val_files: list[AudioFileInfo] = []

    def _list_files(self) -> list[Path]:
        if not self.root.exists():
            raise FileNotFoundError(f"audio data folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"audio data folder {self.root} is not a folder")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in self.extensions)
        if not files:
            raise ValueError(
                f"audio data folder {self.root} holds no audio files (looked for {', '.join(self.extensions)})"
            )
        return files

    def setup(self, stage: str | None = None) -> None:
        if self.train_files:
            return
        readable, skipped = [], []
        for path in self._list_files():
            try:
                readable.append(_probe(path, self.channels))
            except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, ValueError...
                skipped.append((path, f"{type(e).__name__}: {e}"))
        self.skipped_files = skipped
        if skipped:
            names = ", ".join(str(p.relative_to(self.root)) for p, _ in skipped)
            if self.strict:
                details = "; ".join(f"{p}: {why}" for p, why in skipped)
                raise ValueError(f"{len(skipped)} unreadable audio files in {self.root} (strict=True): {details}")
            log.warning("skipped %d unreadable audio files in %s: %s", len(skipped), self.root, names)
        if len(readable) < 2:
            raise ValueError(
                f"audio data folder {self.root}: need at least 2 readable audio files for a train/validation "
                f"split, found {len(readable)} (skipped {len(skipped)})"
            )
        readable.sort(key=lambda info: _split_key(self.root, info.path))
        num_val = min(len(readable) - 1, max(1, round(self.val_fraction * len(readable))))
        self.val_files, self.train_files = readable[:num_val], readable[num_val:]

    def train_dataset(self) -> Dataset:
        # At least one full batch per epoch even from a handful of files (train batches drop the last partial one).
        items = self.train_items_per_epoch or max(len(self.train_files), self.batch_size)
        return _FolderSegments(
            self.train_files,
            self.segment_samples,
            self.sample_rate,
            self.channels,
            train=True,
            items=items,
            strict=self.strict,
        )

    def val_dataset(self) -> Dataset:
        return _FolderSegments(
            self.val_files,
            self.val_segment_samples,
            self.sample_rate,
            self.channels,
            train=False,
            segments_per_file=self.val_segments_per_file,
            strict=self.strict,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset(),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset(),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class SynthAudioDataset(Dataset):
    """``num_clips`` synthesised clips of one split; clip i is always the same (see :mod:`.audio_synth`).
    Clips are cached after their first synthesis (per worker process)."""

    def __init__(
        self,
        num_clips: int,
        num_samples: int,
        sample_rate: int,
        channels: int = 1,
        *,
        seed: int = 0,
        split: int = TRAIN_SPLIT,
        cache: bool = True,
    ):
        self.num_clips, self.num_samples, self.sample_rate, self.channels = (
            num_clips,
            num_samples,
            sample_rate,
            channels,
        )
        self.seed, self.split, self.cache = seed, split, cache
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip index {index} out of range for {self.num_clips} clips")
        clip = self._cache.get(index)
        if clip is None:
            clip = torch.from_numpy(
                synthesize_clip(self.seed, index, self.num_samples, self.sample_rate, self.channels, self.split)
            )
            if self.cache:
                self._cache[index] = clip
        return clip


class SynthAudioDataModule(LightningDataModule):
    """Procedurally synthesised notes, chords, percussion and formant sweeps: needs no download.

    Train and validation clips come from disjoint seed streams (``(seed, split, index)``), so the
    validation set is held out and identical on every run.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        segment_seconds: float = 0.5,
        val_segment_seconds: float = 1.0,
        num_train_clips: int = 2000,
        num_val_clips: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if channels not in (1, 2):
            raise ValueError(f"channels: expected 1 or 2, got {channels}")
        if num_train_clips < 1 or num_val_clips < 1:
            raise ValueError(f"num_train_clips and num_val_clips must be >= 1, got {num_train_clips}, {num_val_clips}")
        self.sample_rate, self.channels = int(sample_rate), channels
        self.segment_samples = int(round(segment_seconds * sample_rate))
        self.val_segment_samples = int(round(val_segment_seconds * sample_rate))
        self.num_train_clips, self.num_val_clips = num_train_clips, num_val_clips
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: SynthAudioDataset | None = None
        self.val_set: SynthAudioDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        common = dict(sample_rate=self.sample_rate, channels=self.channels, seed=self.seed)
        self.train_set = SynthAudioDataset(self.num_train_clips, self.segment_samples, split=TRAIN_SPLIT, **common)
        self.val_set = SynthAudioDataset(self.num_val_clips, self.val_segment_samples, split=VAL_SPLIT, **common)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


__all__ = ["AudioFolderDataModule", "AudioFileInfo", "SynthAudioDataModule", "SynthAudioDataset", "read_segment"]
