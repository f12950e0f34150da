"""vqlib.serialization: atomic folder writes, format versions (older upgraded, newer refused), truncated or corrupt
safetensors named as such, pickle-only folders refused without unpickling."""

import json

import pytest
import torch
from image_helpers import tiny_tokenizer
from safetensors.torch import save_file
from torch import nn
from vqlib.models import ImageTokenizer, hub

from vqlib import serialization as ser
from vqlib.compress import load_compressed


def test_write_folder_is_all_or_nothing(tmp_path):
    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ser.write_folder(tmp_path / "out", {"a.txt": ser.text_writer("a"), "b.txt": broken})
    assert list(tmp_path.iterdir()) == []
    ser.write_folder(tmp_path / "out", {"a.txt": ser.text_writer("1")})
    (tmp_path / "out" / "mine.txt").write_text("keep")
    ser.write_folder(tmp_path / "out", {"a.txt": ser.text_writer("2")})  # replace="files": others kept
    assert (tmp_path / "out" / "a.txt").read_text() == "2" and (tmp_path / "out" / "mine.txt").exists()
    ser.write_folder(tmp_path / "out", {"a.txt": ser.text_writer("3")}, replace="folder")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        ser.write_folder(tmp_path / "file", {"a.txt": ser.text_writer("a")})


@pytest.mark.parametrize(
    "version, message",
    [
        ("1", "positive integer, got '1'"),
        (True, "positive integer, got True"),
        (0, "positive integer"),
        (3, "format version 3, newer than this vqlib supports \\(2\\).*vqlib 9.9.*upgrade vqlib"),
    ],
)
def test_format_version_checks(version, message):
    with pytest.raises(ValueError, match=message):
        ser.check_format_version(version, 2, "x/config.json", "9.9", "load")
    assert ser.check_format_version(1, 2, "x", None, "load") == 1


def test_older_format_versions_are_upgraded(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    folder = tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["init_args"]["channels"] = cfg["init_args"].pop("ch")  # pretend version 1 named it differently
    (folder / "config.json").write_text(json.dumps(cfg))

    def upgrade_1_to_2(old):
        args = dict(old["init_args"])
        args["ch"] = args.pop("channels")
        return {**old, "format_version": 2, "init_args": args}

    monkeypatch.setattr(hub, "FORMAT_VERSION", 2)
    monkeypatch.setitem(hub._UPGRADES, 1, upgrade_1_to_2)
    loaded = ImageTokenizer.from_pretrained(folder)
    assert torch.equal(loaded.encoder.conv_in.weight, tok.encoder.conv_in.weight)


def test_truncated_and_corrupt_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(100.0), "b": torch.ones(3, 4)}, str(path))
    good = path.read_bytes()
    assert ser.load_safetensors(path, "cpu", "load")["b"].shape == (3, 4)
    header_len = int.from_bytes(good[:8], "little")
    for cut, message in [
        (4, "not even the 8-byte"),
        (8 + header_len // 2, "header says"),
        (len(good) - 1, f"{len(good) - 1} bytes, its header describes {len(good)} bytes"),
    ]:
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=f"truncated.*{message}|{message}"):
            ser.load_safetensors(path, "cpu", "load")
    path.write_bytes(good[:8] + b"{not json" + good[17:])
    with pytest.raises(ValueError, match="not a safetensors file"):
        ser.load_safetensors(path, "cpu", "load")
    with pytest.raises(FileNotFoundError, match="missing"):
        ser.load_safetensors(tmp_path / "none.safetensors", "cpu", "load")


def test_pickle_only_folders_are_refused(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("never unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match=r"only pickle checkpoint\(s\) \['pytorch_model.bin'\]"):
        ImageTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="never unpickles"):
        load_compressed(folder, nn.Linear(2, 2))


def test_state_for_safetensors_unties_shared_storage(tmp_path):
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    model[1].weight = model[0].weight
    state = ser.state_for_safetensors(model)
    assert state["0.weight"].data_ptr() != state["1.weight"].data_ptr()
    save_file(state, str(tmp_path / "w.safetensors"))  # would raise on shared memory
