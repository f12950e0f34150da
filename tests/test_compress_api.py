"""``compress`` layer selection with ``VQConfig.filter_fn`` beside the glob filters, and a config
holding a callable that is still saved as JSON."""

import json

import pytest
import torch
from torch import nn

from vqlib.compress import ScalarLinear, VQConfig, compress, load_compressed, save_compressed
from vqlib.compress.cli import build_parser


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = x + self.q(x) * self.k(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


def make_block():
    torch.manual_seed(0)
    return Block()


def wide_only(module, name):
    return module.out_features > 16


def test_filter_fn_and_the_globs_must_both_keep_a_layer():
    calls = []

    def mlp_only(module, name):
        calls.append((name, type(module).__name__))
        return name.startswith("fc")

    cfg = VQConfig(algorithm="scalar_rtn", scalar_bits=4, skip_modules=["fc2"], filter_fn=mlp_only)
    model, report = compress(make_block(), cfg)
    status = {r.name: (r.status, r.reason) for r in report.layers}
    assert status == {
        "q": (
            "skipped",
            "filter_fn mlp_only returned False",
        ),
        "k": (
            "skipped",
            "filter_fn mlp_only returned False",
        ),
        "fc1": ("compressed", ""),
        "fc2": ("skipped", "matched by skip_modules"),
    }
    assert calls == [("q", "Linear"), ("k", "Linear"), ("fc1", "Linear")]  # fc2: the globs decided first
    assert isinstance(model.fc1, ScalarLinear) and isinstance(model.q, nn.Linear)


def test_filter_fn_sees_the_module_and_an_error_names_what_came():
    _, report = compress(make_block(), VQConfig(algorithm="scalar_rtn", filter_fn=wide_only))
    assert [r.name for r in report.compressed] == ["fc1"]
    with pytest.raises(TypeError, match="filter_fn: expected a callable.*got 'fc'"):
        VQConfig(filter_fn="fc")
    with pytest.raises(TypeError, match="filter_fn\\(module, name\\) must return a bool, got int for 'q'"):
        compress(make_block(), VQConfig(algorithm="scalar_rtn", filter_fn=lambda m, n: 1))
    with pytest.raises(ValueError, match="no eligible.*q: filter_fn <lambda> returned False"):
        compress(make_block(), VQConfig(algorithm="scalar_rtn", filter_fn=lambda m, n: False))


def test_a_config_with_filter_fn_saves_without_it(tmp_path):
    cfg = VQConfig(algorithm="scalar_rtn", scalar_bits=4, filter_fn=wide_only)
    assert "filter_fn" not in cfg.to_dict() and VQConfig.from_dict(cfg.to_dict()).filter_fn is None
    model, report = compress(make_block(), cfg)
    json.dumps(report.to_dict())  # the report holds the config without the callable
    save_compressed(model, tmp_path / "out", config=cfg)
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "filter_fn" not in quant["compress_config"] and quant["compress_config"]["scalar_bits"] == 4
    assert quant["uncompressed_modules"] == ["fc2", "k", "q"]  # what the filter left out is on record
    loaded = load_compressed(tmp_path / "out", make_block())
    assert isinstance(loaded.fc1, ScalarLinear) and isinstance(loaded.q, nn.Linear)


def test_command_line_has_no_filter_fn_flag_and_lists_the_algorithms():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert "--include-modules" in flags and "--filter-fn" not in flags
    algorithm = next(a for a in parser._actions if "--algorithm" in a.option_strings)
    assert algorithm.choices == ["data_free", "calibrated", "scalar_rtn"]


def test_vqlib_compress_is_a_plain_function_and_the_package_keeps_its_import_path():
    import vqlib.compress  # still a valid statement: it binds vqlib, whose attribute is the function
    from vqlib.compress import compress as from_package
    from vqlib.compress import io as io_module

    assert type(vqlib.compress).__name__ == "function" and from_package is vqlib.compress
    assert io_module.__name__ == "vqlib.compress.io" and vqlib.load_compressed is io_module.load_compressed
    model, report = vqlib.compress(make_block(), VQConfig(algorithm="scalar_rtn"))
    assert len(report.compressed) == 4 and isinstance(model.q, ScalarLinear)
