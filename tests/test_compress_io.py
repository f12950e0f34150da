"""save_compressed / load_compressed: round trips, versioning, corruption, atomic writes, no pickle."""

import json

import pytest
import torch
from torch import nn

from vqlib.compress import FORMAT_VERSION, ScalarLinear, VQConfig, VQLinear, compress, load_compressed, save_compressed
from vqlib.compress import io as vio

FAST = dict(vector_dim=4, codebook_bits=4, kmeans_iters=5, finetune_steps=0)


class Net(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 20, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("position", torch.arange(4).float())

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


@pytest.fixture(scope="module")
def compressed():
    model, _ = compress(make_net(), VQConfig(algorithm="data_free", skip_modules=["head"], **FAST))
    model.fc1 = ScalarLinear.from_linear(nn.Linear(16, 32), 3, 8)  # mixed layer types in one model
    return model


def test_round_trip_is_exact(tmp_path, compressed):
    ids = torch.randint(0, 20, (3, 5))
    out = save_compressed(compressed, tmp_path / "out", config=VQConfig(algorithm="data_free", **FAST))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta["quant_method"] == "vqlib" and meta["format_version"] == FORMAT_VERSION
    assert meta["modules"]["fc2"]["layer_type"] == "VQLinear" and meta["modules"]["fc1"]["layer_type"] == "ScalarLinear"
    assert meta["compress_config"]["algorithm"] == "data_free"
    for skeleton in (make_net(seed=5), lambda: make_net(seed=7)):
        loaded = load_compressed(out, skeleton)
        assert isinstance(loaded.fc2, VQLinear) and isinstance(loaded.fc1, ScalarLinear)
        assert torch.equal(loaded(ids), compressed(ids))
        assert loaded.head.weight is loaded.embed.weight  # ties survive
        for key, value in compressed.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value) and loaded.state_dict()[key].dtype == value.dtype


def test_meta_device_skeleton(tmp_path, compressed):
    out = save_compressed(compressed, tmp_path / "out")
    with torch.device("meta"):
        skeleton = Net()
    loaded = load_compressed(out, skeleton)
    ids = torch.randint(0, 20, (2, 4))
    assert torch.equal(loaded(ids), compressed(ids))

    class WithTransientBuffer(Net):
        def __init__(self):
            super().__init__()
            self.register_buffer("rope", torch.ones(3), persistent=False)

    with torch.device("meta"):
        skeleton = WithTransientBuffer()
    with pytest.raises(ValueError, match=r"\['rope'\].*meta device"):
        load_compressed(out, skeleton)


def test_hf_style_config_is_kept(tmp_path, compressed):
    class Cfg:
        def to_dict(self):
            return {"model_type": "toy", "hidden_size": 16}

    compressed.config = Cfg()
    try:
        out = save_compressed(compressed, tmp_path / "out")
    finally:
        del compressed.config
    data = json.loads((out / "config.json").read_text())
    assert data["model_type"] == "toy" and data["quantization_config"]["quant_method"] == "vqlib"


def test_mismatched_skeletons(tmp_path, compressed):
    out = save_compressed(compressed, tmp_path / "out")

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(32, 24, bias=False)

    with pytest.raises(ValueError, match=r"'fc2' is Linear\(32, 24.*mismatched skeleton"):
        load_compressed(out, Wider())
    with pytest.raises(ValueError, match="no module 'fc1'"):
        load_compressed(out, nn.Sequential(nn.Linear(16, 32)))

    class Extra(Net):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

    with pytest.raises(ValueError, match=r"not in skeleton \[\]|missing from file \['norm.bias', 'norm.weight'\]"):
        load_compressed(out, Extra())

    class NotLinear(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Conv1d(32, 16, 1)

    with pytest.raises(ValueError, match="is a Conv1d, expected nn.Linear"):
        load_compressed(out, NotLinear())
    with pytest.raises(TypeError, match="factory returned int"):
        load_compressed(out, lambda: 3)


def test_newer_format_version_is_refused(tmp_path, compressed):
    out = save_compressed(compressed, tmp_path / "out")
    data = json.loads((out / "config.json").read_text())
    data["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}, newer.*upgrade vqlib"):
        load_compressed(out, make_net())


def test_truncated_and_corrupt_files(tmp_path, compressed):
    out = save_compressed(compressed, tmp_path / "out")
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_compressed(out, make_net())
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sha256"):
        load_compressed(out, make_net())
    weights.write_bytes(good)
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_compressed(out, make_net())
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_compressed(tmp_path / "nothing", make_net())


def test_out_of_range_codes_are_caught_even_with_matching_checksum(tmp_path):
    # A file written by a buggy tool: structurally valid, checksum recomputed, codes out of range.
    bad = make_net()
    bad, _ = compress(bad, VQConfig(algorithm="data_free", skip_modules=["head"], **FAST))
    bad.fc2.codes.fill_(200)  # uint8 holds it, but the codebook has 2**4 entries
    out = save_compressed(bad, tmp_path / "out")
    with pytest.raises(ValueError, match="codes has values >= codebook size 16"):
        load_compressed(out, make_net())


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, compressed, monkeypatch):
    target = tmp_path / "out"

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(compressed, target)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left
    monkeypatch.undo()
    save_compressed(compressed, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_compressed(compressed, target)
    save_compressed(compressed, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="no VQLinear/ScalarLinear"):
        save_compressed(nn.Linear(2, 2), tmp_path / "plain")


def test_only_safetensors_and_json_are_read(tmp_path, compressed, monkeypatch):
    out = save_compressed(compressed, tmp_path / "out")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading must never be used")

    monkeypatch.setattr(torch, "load", forbidden)
    import pickle

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    load_compressed(out, make_net())
    assert vio.WEIGHTS_NAME.endswith(".safetensors")
