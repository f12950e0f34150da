import json
import math

import pytest
import torch
import torchaudio
from vqlib.models.audio_tokenizer import AudioTokenizer, mix_channels

from vqlib import ResidualVQ


def tiny_tokenizer(
    channels: int = 1,
    *,
    sample_rate: int = 8000,
    levels: int = 4,
    codes: int = 32,
    dropout: float = 0.0,
    causal: bool = False,
    channel_first: bool = True,
    seed: int = 0,
) -> AudioTokenizer:
    torch.manual_seed(seed)
    rvq = ResidualVQ(8, codes, levels, quantizer_dropout=dropout, channel_first=channel_first, seed=seed)
    return AudioTokenizer(
        rvq,
        sample_rate=sample_rate,
        channels=channels,
        n_filters=2,
        ratios=[4, 2],
        residual_dilations=[1, 3],
        lstm_layers=1,
        causal=causal,
    )


def sine(freq: float, seconds: float, sample_rate: int) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return 0.5 * torch.sin(2 * math.pi * freq * t)


def test_bitrate_and_frame_rate_maths():
    rvq = ResidualVQ(8, 1024, 32, channel_first=True)
    tok = AudioTokenizer(rvq, sample_rate=24000, ratios=[8, 5, 4, 2], n_filters=1, lstm_layers=0)
    assert tok.hop_length == 320
    assert tok.frame_rate == 75.0
    assert tok.bitrate(8) == pytest.approx(6.0)
    assert [tok.bitrate(n) for n in (2, 4, 8, 16)] == pytest.approx([1.5, 3.0, 6.0, 12.0])
    assert tok.bitrate() == pytest.approx(24.0)
    tok16 = AudioTokenizer(
        ResidualVQ(8, 256, 8, channel_first=True), sample_rate=16000, ratios=[8, 5, 4, 2], n_filters=1, lstm_layers=0
    )
    assert tok16.bitrate(2) == pytest.approx(50 * 2 * 8 / 1000)
    for bad in (0, 33, 1.5, True):
        with pytest.raises(ValueError, match="num_quantizers"):
            tok.bitrate(bad)


@pytest.mark.parametrize("channels", [1, 2])
def test_shapes_and_padding(channels):
    tok = tiny_tokenizer(channels).eval()
    x = 0.3 * torch.randn(3, channels, 101)  # not a multiple of the hop (8): padded to 104 = 13 frames
    out = tok(x)
    assert out.reconstruction.shape == x.shape
    assert out.codes.shape == (3, 13, 4) and out.codes.dtype == torch.int64
    assert tok.num_frames(101) == 13
    codes = tok.encode(x)
    assert codes.shape == (3, 13, 4)
    assert tok.decode(codes).shape == (3, channels, 104)
    assert tok.decode(codes, length=101).shape == (3, channels, 101)


@pytest.mark.parametrize("channel_first", [True, False])
@pytest.mark.parametrize("channels", [1, 2])
def test_encode_decode_equals_forward_in_eval(channels, channel_first):
    tok = tiny_tokenizer(channels, channel_first=channel_first).eval()
    x = 0.3 * torch.randn(2, channels, 96)
    with torch.no_grad():
        out = tok(x)
        codes = tok.encode(x)
        assert torch.equal(codes, out.codes)
        assert torch.equal(tok.decode(codes, length=96), out.reconstruction)


def test_prefix_decoding_matches_fewer_levels():
    tok = tiny_tokenizer(levels=4).eval()
    x = 0.3 * torch.randn(2, 1, 80)
    with torch.no_grad():
        codes = tok.encode(x)
        for n in (1, 2, 3):
            assert torch.equal(tok.encode(x, num_quantizers=n), codes[..., :n])
            fewer = tok(x, num_quantizers=n)
            assert (fewer.codes[..., n:] == -1).all()
            assert torch.equal(tok.decode(codes[..., :n], length=80), fewer.reconstruction)
        # different prefixes decode to different audio
        assert not torch.equal(tok.decode(codes[..., :1]), tok.decode(codes))


def test_quantizer_dropout_uses_fewer_levels_in_training_only():
    tok = tiny_tokenizer(levels=4, dropout=1.0).train()
    x = 0.3 * torch.randn(2, 1, 64)
    used = {tok(x).num_quantizers for _ in range(12)}
    assert len(used) > 1 and min(used) < 4
    tok.eval()
    assert tok(x).num_quantizers == 4


def test_encode_leaves_training_mode_and_codebooks_alone():
    tok = tiny_tokenizer().train()
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.encode(0.3 * torch.randn(2, 1, 64))
    assert tok.training
    after = tok.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_encoder_through_quantizer():
    tok = tiny_tokenizer().train()
    x = 0.3 * torch.randn(2, 1, 64)
    out = tok(x)
    ((out.reconstruction - x).pow(2).mean() + out.quantizer_loss).backward()
    first_conv = tok.encoder.model[0].conv
    grad = first_conv.parametrizations.weight.original1.grad
    assert grad is not None and grad.abs().sum() > 0


def test_causal_output_ignores_future_input():
    tok = tiny_tokenizer(causal=True).eval()
    x = 0.3 * torch.randn(1, 1, 128)
    y = x.clone()
    y[..., 64:] = torch.randn(64)  # change only the future, from a frame boundary (hop 8)
    with torch.no_grad():
        a, b = tok(x).reconstruction, tok(y).reconstruction
    assert torch.equal(a[..., :64], b[..., :64])
    assert not torch.equal(a[..., 64:], b[..., 64:])


def test_prepare_resamples_and_mixes_channels():
    tok = tiny_tokenizer(channels=1, sample_rate=8000)
    wave = sine(440, 1.0, 16000)
    prepared = tok.prepare(wave, 16000)
    assert prepared.shape == (1, 1, 8000)
    assert torch.allclose(prepared[0, 0], torchaudio.functional.resample(wave, 16000, 8000))
    # stereo into a mono model: the channel average
    stereo = torch.stack([sine(300, 0.1, 8000), 0.2 * torch.ones(800)])
    assert torch.allclose(tok.prepare(stereo, 8000), stereo.mean(0).view(1, 1, -1))
    # mono into a stereo model: duplicated
    tok2 = tiny_tokenizer(channels=2, sample_rate=8000)
    mono = sine(300, 0.1, 8000)
    dup = tok2.prepare(mono[None, None], 8000)
    assert dup.shape == (1, 2, 800) and torch.equal(dup[0, 0], dup[0, 1]) and torch.equal(dup[0, 0], mono)
    # same rate and layout: unchanged
    x = torch.randn(2, 2, 50)
    assert torch.equal(tok2.prepare(x, 8000), x)
    with pytest.raises(ValueError, match="3 input channels"):
        tok2.prepare(torch.randn(3, 100), 8000)
    with pytest.raises(TypeError, match="floating point"):
        tok.prepare(torch.zeros(100, dtype=torch.int16), 8000)
    with pytest.raises(ValueError, match="sample_rate"):
        tok.prepare(torch.zeros(100), 0)
    with pytest.raises(ValueError, match=r"\(time,\)"):
        tok.prepare(torch.zeros(1, 1, 1, 100), 8000)


def test_mix_channels_rule():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(mix_channels(x, 1), torch.tensor([[2.0, 4.0]]))
    assert torch.equal(mix_channels(x[:1], 2), torch.tensor([[1.0, 2.0], [1.0, 2.0]]))


def test_bad_waveforms_raise_clear_errors():
    tok = tiny_tokenizer(channels=1)
    with pytest.raises(ValueError, match=r"expected shape \(batch, 1, time\).*prepare"):
        tok(torch.randn(2, 2, 64))
    with pytest.raises(ValueError, match="prepare"):
        tok.encode(torch.randn(64))
    with pytest.raises(TypeError, match="floating point"):
        tok.encode(torch.zeros(1, 1, 64, dtype=torch.long))
    bad = torch.randn(1, 1, 64)
    bad[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tok(bad)
    with pytest.raises(ValueError, match="num_quantizers"):
        tok.encode(torch.randn(1, 1, 64), num_quantizers=5)


def test_bad_codes_raise_clear_errors():
    tok = tiny_tokenizer(levels=4, codes=32).eval()
    codes = tok.encode(0.3 * torch.randn(2, 1, 64))
    with pytest.raises(IndexError, match=r"\[0, 31\].*max 32"):
        tok.decode(torch.full_like(codes, 32))
    with pytest.raises(IndexError, match="min -2"):
        tok.decode(torch.full_like(codes, -2))
    with pytest.raises(ValueError, match=r"\(batch, frames, n\)"):
        tok.decode(codes[0])
    with pytest.raises(ValueError, match=r"1 <= n <= 4"):
        tok.decode(torch.zeros(2, 8, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(codes.float())
    with pytest.raises(ValueError, match="first level"):
        tok.decode(torch.full_like(codes, -1))
    with pytest.raises(ValueError, match="length"):
        tok.decode(codes, length=1000)
    with pytest.raises(TypeError, match="Tensor"):
        tok.decode(codes.tolist())


def test_constructor_checks():
    rvq = ResidualVQ(8, 32, 2, channel_first=True)
    with pytest.raises(TypeError, match="ResidualVQ"):
        AudioTokenizer(torch.nn.Identity())
    with pytest.raises(ValueError, match="channels"):
        AudioTokenizer(rvq, channels=3)
    with pytest.raises(ValueError, match="ratios"):
        AudioTokenizer(rvq, ratios=[])


def test_hub_round_trip(tmp_path):
    tok = tiny_tokenizer(channels=2, levels=3).eval()
    x = 0.3 * torch.randn(2, 2, 64)
    tok.train()
    tok(x)  # one EMA update, so buffers differ from a fresh model
    tok.eval()
    tok.save_pretrained(tmp_path / "model")
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["model_type"] == "AudioTokenizer"
    assert cfg["init_args"]["sample_rate"] == 8000 and cfg["init_args"]["channels"] == 2
    assert cfg["init_args"]["quantizer"]["class_path"] == "vqlib.ResidualVQ"
    loaded = AudioTokenizer.from_pretrained(tmp_path / "model")
    assert not loaded.training
    for k, v in tok.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    codes = tok.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    with torch.no_grad():
        assert torch.equal(loaded.decode(codes), tok.decode(codes))
    card = (tmp_path / "model" / "README.md").read_text()
    assert "AudioTokenizer" in card
