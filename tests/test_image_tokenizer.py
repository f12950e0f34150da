"""ImageTokenizer: shapes for f4/f8/f16, encode -> decode equals forward in eval for every quantizer family,
token counts, and clear errors for bad images / indices."""

import math

import pytest
import torch
from image_helpers import random_images, tiny_tokenizer
from vqlib.models import ImageTokenizer

from vqlib import FSQ, LFQ, ResidualVQ, VectorQuantize


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
def test_shapes_and_token_counts(ch_mult, factor):
    tok = tiny_tokenizer(ch_mult=ch_mult)
    x = random_images(2, size=32)
    out = tok(x)
    assert tok.downsample_factor == factor
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, 32 // factor, 32 // factor) and out.indices.dtype == torch.int64
    assert out.quantizer_loss.ndim == 0 and "perplexity" in out.metrics
    assert tok.tokens_per_image(32) == (32 // factor) ** 2
    assert tok.tokens_per_image((32, 64)) == (32 // factor) * (64 // factor)
    assert tok.bits_per_image(32) == pytest.approx((32 // factor) ** 2 * math.log2(32))


QUANTIZERS = {
    "vq-ema": lambda: VectorQuantize(8, 32, kmeans_init=True),
    "simvq": lambda: VectorQuantize(8, 256, codebook_update="gradient", reparam="simvq"),
    "vq-heads": lambda: VectorQuantize(8, 16, heads=2),
    "rvq": lambda: ResidualVQ(8, 16, 3),
    "fsq": lambda: FSQ([5, 5, 4], dim=8),
    "lfq": lambda: LFQ(8, 64),
    "channel-first-vq": lambda: VectorQuantize(8, 32, channel_first=True),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_encode_decode_matches_forward_in_eval(name):
    tok = tiny_tokenizer(QUANTIZERS[name]())
    tok(random_images(4, seed=1))  # one training forward (k-means init, EMA update)
    tok.eval()
    x = random_images(2, seed=2)
    with torch.no_grad():
        out = tok(x)
    idx = tok.encode(x)
    assert torch.equal(idx, out.indices)
    expected_shape = (2, 4, 4) + ((tok.codes_per_token,) if tok.codes_per_token > 1 else ())
    assert tuple(idx.shape) == expected_shape
    with torch.no_grad():
        assert torch.equal(tok.decode(idx), out.reconstruction)


def test_encode_never_updates_codebook_and_keeps_mode():
    tok = tiny_tokenizer(VectorQuantize(8, 32))
    tok(random_images(4))
    tok.train()
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.encode(random_images(4, seed=3))
    assert tok.training
    for k, v in tok.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layout_comes_from_the_quantizer_interface():
    # a one-level residual VQ still has a trailing level axis: the tokenizer reads code_axis, not a count
    tok = tiny_tokenizer(ResidualVQ(8, 16, 1)).eval()
    x = random_images(2, seed=4)
    idx = tok.encode(x)
    assert tok.codes_per_token == 1 and idx.shape == (2, 4, 4, 1)
    with torch.no_grad():
        assert torch.equal(tok.decode(idx), tok(x).reconstruction)
    assert tiny_tokenizer(VectorQuantize(8, 16, heads=2)).codes_per_token == 2


def test_gradients_reach_encoder_and_codebook_map():
    tok = tiny_tokenizer(VectorQuantize(8, 64, codebook_update="gradient", reparam="simvq"))
    x = random_images(2)
    out = tok(x)
    (out.reconstruction.sub(x).abs().mean() + out.quantizer_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    simvq_map = [p for n, p in tok.quantizer.named_parameters() if "proj" in n]
    assert simvq_map and all(p.grad is not None and p.grad.abs().sum() > 0 for p in simvq_map)


def test_attention_is_optional():
    with_attn = sum(p.numel() for p in tiny_tokenizer(use_attention=True).parameters())
    without = sum(p.numel() for p in tiny_tokenizer(use_attention=False).parameters())
    assert with_attn > without


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.rand(2, 1, 16, 16), ValueError, r"expected shape \(batch, 3, H, W\), got \(2, 1, 16, 16\)"),
        (torch.rand(3, 16, 16), ValueError, "expected shape"),
        (torch.rand(2, 3, 18, 16), ValueError, "divisible by the downsampling factor 4, got 18x16"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), TypeError, "floating point"),
        (torch.rand(2, 3, 16, 16) * 255, ValueError, r"values in \[-1, 1\]"),
        (torch.full((2, 3, 16, 16), float("nan")), ValueError, "finite"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(images, error, match):
    tok = tiny_tokenizer()
    with pytest.raises(error, match=match):
        tok(images)
    with pytest.raises(error, match=match):
        tok.encode(images)


def test_bad_indices():
    tok = tiny_tokenizer(VectorQuantize(8, 32)).eval()
    idx = tok.encode(random_images(2))
    with pytest.raises(ValueError, match=r"expected shape \(batch, h, w\)"):
        tok.decode(idx[0, 0])
    with pytest.raises(IndexError, match=r"\[0, 31\].*max 32"):
        tok.decode(torch.full_like(idx, 32))
    with pytest.raises(IndexError, match="min -1"):
        tok.decode(torch.full_like(idx, -1))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(idx.float())
    with pytest.raises(ValueError, match=r"expected shape \(batch, h, w\) for VectorQuantize, got \(2, 4, 4, 2\)"):
        tok.decode(idx[..., None].expand(-1, -1, -1, 2))
    rvq_tok = tiny_tokenizer(ResidualVQ(8, 16, 3)).eval()
    rvq_idx = rvq_tok.encode(random_images(2))
    assert rvq_tok.decode(rvq_idx[..., :2]).shape == (2, 3, 16, 16)  # a prefix of levels decodes
    with pytest.raises(ValueError, match=r"\(batch, h, w, levels/heads \(up to 3\)\) for ResidualVQ"):
        rvq_tok.decode(rvq_idx[..., 0])  # levels axis missing


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="vqlib.Quantizer"):
        ImageTokenizer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ch_mult"):
        tiny_tokenizer(ch_mult=())
    with pytest.raises(ValueError, match="ch must be >= 1"):
        tiny_tokenizer(ch=0)


def test_batchnorm_latents_are_centred_and_round_trip_in_eval():
    tok = tiny_tokenizer(VectorQuantize(8, 64, codebook_update="gradient", reparam="simvq"), latent_norm="batchnorm")
    x = random_images(4, seed=5)
    z = tok.quant_conv(tok.encoder(x))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # each latent channel centred over the batch in training
    tok(x)
    tok.eval()
    with torch.no_grad():
        out = tok(x)
    assert torch.equal(tok.decode(tok.encode(x)), out.reconstruction)
    with pytest.raises(ValueError, match="latent_norm must be 'none' or 'batchnorm'"):
        tiny_tokenizer(latent_norm="layer")
