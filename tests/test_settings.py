"""CodebookSettings: the one list of codebook options, mirrored by VectorQuantize's flat keyword arguments."""

import inspect

import pytest
import torch

from vqlib import VectorQuantize
from vqlib.core.codebook import Codebook
from vqlib.core.settings import CodebookSettings


def test_vector_quantize_lists_every_setting_with_the_same_default():
    params = inspect.signature(VectorQuantize.__init__).parameters
    defaults = CodebookSettings()
    for name in CodebookSettings.names():
        assert name in params, name
        assert params[name].default == getattr(defaults, name), name


def test_flat_keywords_and_settings_object_build_the_same_quantizer():
    settings = CodebookSettings(
        distance="cosine", codebook_update="gradient", gradient_estimator="rotation", usage_window=5
    )
    a = VectorQuantize(
        8, 16, distance="cosine", codebook_update="gradient", gradient_estimator="rotation", usage_window=5
    )
    b = VectorQuantize.from_settings(8, 16, settings)
    assert a.settings == b.settings == settings and a.config == b.config
    assert a.codebooks[0].settings is a.settings
    x = torch.randn(10, 8)
    assert torch.equal(a.eval()(x).quantized, b.eval()(x).quantized)  # same seed, same codes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(distance="manhattan"), "distance must be 'euclidean' or 'cosine', got 'manhattan'"),
        (dict(codebook_update="sgd"), "codebook_update must be 'ema', 'gradient' or 'frozen'"),
        (dict(gradient_estimator="gumbel"), "gradient_estimator must be 'ste' or 'rotation'"),
        (dict(search_backend="annoy"), "search_backend must be 'auto', 'torch' or 'faiss'"),
        (dict(decay=1.0), "decay"),
        (dict(kmeans_iters=0), "kmeans_iters"),
        (dict(commitment_weight=-1.0), "loss weights"),
        (dict(reparam="projector", codebook_update="gradient", kmeans_init=True), "kmeans_init"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookSettings(**kwargs)


def test_unknown_option_names_are_named():
    CodebookSettings.check_names("Thing", {"decay": 0.5})
    with pytest.raises(TypeError, match=r"Thing: unknown codebook option\(s\) \['dacay'\]"):
        CodebookSettings.check_names("Thing", {"dacay": 0.5})


def test_codebook_core_takes_the_settings():
    cb = Codebook(16, 4, CodebookSettings(codebook_update="frozen", distance="cosine"))
    assert not hasattr(cb, "embed_avg") and cb.cosine and not isinstance(cb.embed, torch.nn.Parameter)
    with pytest.raises(ValueError, match="init_codebook"):
        Codebook(16, 4, CodebookSettings(reparam="projector", codebook_update="gradient"))
