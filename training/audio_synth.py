"""Procedurally synthesised audio: the default training set of the audio tokenizer (no download).

Each clip is a mix of random events, drawn from a NumPy generator seeded by ``(seed, split, index)``
so a clip is the same on every machine and run, and the train and validation splits never share one:

* harmonic notes and chords (major/minor/seventh/sus), partials ``1/k^rolloff`` with slight vibrato,
  under an ADSR envelope;
* percussive bursts: band-passed noise with an exponential decay, sometimes over a pitch-dropping
  sine "kick";
* formant-like sweeps: a gliding harmonic source shaped by three resonances whose centre
  frequencies move, as in a voice changing vowel.

Events get random levels (-20..0 dB) and, in stereo, random constant-power pans; the clip is
peak-normalised to 0.3-0.9.
"""

from __future__ import annotations

import numpy as np

TRAIN_SPLIT, VAL_SPLIT = 0, 1
CHORDS = ([0], [0, 4, 7], [0, 3, 7], [0, 4, 7, 11], [0, 3, 7, 10], [0, 5, 7], [0, 7, 12])


def _adsr(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    attack = int(rng.uniform(0.002, 0.08) * sr)
    decay = int(rng.uniform(0.03, 0.3) * sr)
    release = int(rng.uniform(0.02, 0.3) * sr)
    sustain = rng.uniform(0.2, 0.9)
    env = np.full(n, sustain, dtype=np.float64)
    a = min(attack, n)
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    d = min(decay, n - a)
    env[a : a + d] = np.linspace(1.0, sustain, d, endpoint=False)
    r = min(release, n)
    env[n - r :] *= np.linspace(1.0, 0.0, r)
    return env


def _harmonic_stack(f0: np.ndarray, amps: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of partials k*f0(t) with amplitudes ``amps[k-1]`` (either (K,) or (K, n)); partials above 0.45 sr muted."""
    k = np.arange(1, amps.shape[0] + 1)[:, None]
    phase = 2 * np.pi * np.cumsum(k * f0[None, :], axis=1) / sr + rng.uniform(0, 2 * np.pi, size=(len(k), 1))
    amps = amps if amps.ndim == 2 else amps[:, None]
    audible = (k * f0[None, :]) < 0.45 * sr
    return (amps * audible * np.sin(phase)).sum(axis=0)


def _note(n: int, sr: int, rng: np.random.Generator, chord: bool) -> np.ndarray:
    root = rng.uniform(45, 84)  # MIDI
    intervals = CHORDS[rng.integers(1, len(CHORDS))] if chord else [0]
    t = np.arange(n) / sr
    rolloff = rng.uniform(0.8, 2.0)
    num_harmonics = 12
    amps = 1.0 / np.arange(1, num_harmonics + 1) ** rolloff
    if rng.random() < 0.3:  # hollow, clarinet-like: odd partials only
        amps[1::2] = 0.0
    vibrato = 1 + rng.uniform(0, 0.006) * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
    out = np.zeros(n)
    for iv in intervals:
        f0 = 440.0 * 2 ** ((root + iv - 69) / 12) * vibrato
        out += _harmonic_stack(f0, amps, sr, rng)
    return out * _adsr(n, sr, rng) / len(intervals)


def _percussion(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(n)
    spectrum = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    centre = np.exp(rng.uniform(np.log(200), np.log(0.4 * sr)))
    width = centre * rng.uniform(0.2, 1.5)
    spectrum *= np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    burst = np.fft.irfft(spectrum, n)
    burst /= np.abs(burst).max() + 1e-9
    t = np.arange(n) / sr
    out = burst * np.exp(-t / rng.uniform(0.01, 0.1))
    if rng.random() < 0.4:  # kick: sine whose pitch drops exponentially
        f = 50 + 100 * np.exp(-t / 0.03)
        out += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / rng.uniform(0.05, 0.2))
    return out


def _sweep(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    f0_start, f0_end = rng.uniform(90, 300, size=2)
    f0 = f0_start + (f0_end - f0_start) * t
    nyq = 0.45 * sr
    ranges = ((300, 900), (900, 2500), (2000, 3500))
    num_harmonics = int(nyq / f0.min())
    k = np.arange(1, num_harmonics + 1)[:, None]
    amps = np.zeros((num_harmonics, n))
    for lo, hi in ranges:
        start, end = rng.uniform(lo, min(hi, nyq)), rng.uniform(lo, min(hi, nyq))
        centre = start + (end - start) * t
        bandwidth = rng.uniform(60, 200)
        amps += 1.0 / (1.0 + ((k * f0[None, :] - centre[None, :]) / bandwidth) ** 2)
    return _harmonic_stack(f0, amps / np.sqrt(num_harmonics), sr, rng) * _adsr(n, sr, rng)


def synthesize_clip(
    seed: int, index: int, num_samples: int, sample_rate: int, channels: int = 1, split: int = TRAIN_SPLIT
) -> np.ndarray:
    """One clip as float32 ``(channels, num_samples)``; the same arguments always give the same clip."""
    if channels not in (1, 2):
        raise ValueError(f"channels: expected 1 (mono) or 2 (stereo), got {channels}")
    if num_samples < 1 or sample_rate < 1:
        raise ValueError(f"expected positive num_samples and sample_rate, got {num_samples} and {sample_rate}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, index]))
    duration = num_samples / sample_rate
    num_events = max(1, int(rng.poisson(3.0 * duration)) + 1)
    mix = np.zeros((channels, num_samples))
    for _ in range(num_events):
        kind = rng.choice(4, p=[0.3, 0.25, 0.25, 0.2])
        length = int(rng.uniform(0.08, 0.8) * sample_rate)
        onset = int(rng.uniform(-0.2, 0.9) * num_samples)
        if kind == 0:
            event = _note(length, sample_rate, rng, chord=False)
        elif kind == 1:
            event = _note(length, sample_rate, rng, chord=True)
        elif kind == 2:
            event = _percussion(length, sample_rate, rng)
        else:
            event = _sweep(length, sample_rate, rng)
        event = event / (np.abs(event).max() + 1e-9) * 10 ** (rng.uniform(-20, 0) / 20)
        lo, hi = max(onset, 0), min(onset + length, num_samples)
        if hi <= lo:
            continue
        segment = event[lo - onset : hi - onset]
        if channels == 2:
            angle = rng.uniform(0, np.pi / 2)  # constant-power pan
            mix[0, lo:hi] += np.cos(angle) * segment
            mix[1, lo:hi] += np.sin(angle) * segment
        else:
            mix[0, lo:hi] += segment
    peak = np.abs(mix).max()
    if peak < 1e-6:  # every event fell outside the clip: fall back to a quiet tone so no clip is silent
        mix += 0.1 * np.sin(2 * np.pi * 220 * np.arange(num_samples) / sample_rate)
        peak = np.abs(mix).max()
    return (mix / peak * rng.uniform(0.3, 0.9)).astype(np.float32)
