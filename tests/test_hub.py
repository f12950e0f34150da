"""HubMixin: save_pretrained / from_pretrained round trips, clear errors, atomic writes, push_to_hub plumbing
(Hugging Face calls are replaced by fakes: no network)."""

import json

import pytest
import torch
from image_helpers import random_images, tiny_tokenizer

import vqlib.models.hub as hub
from vqlib import FSQ, ResidualVQ, VectorQuantize
from vqlib.models import ImageTokenizer


def trained(tok: ImageTokenizer, steps: int = 2) -> ImageTokenizer:
    """A couple of training forwards so EMA buffers / k-means state differ from a fresh model."""
    tok.train()
    for i in range(steps):
        tok(random_images(4, seed=i))
    return tok.eval()


@pytest.mark.parametrize(
    "make_quantizer",
    [
        lambda: VectorQuantize(8, 32, kmeans_init=True, seed=0),
        lambda: VectorQuantize(8, 64, codebook_update="gradient", reparam="simvq"),
        lambda: VectorQuantize(8, 16, codebook_update="gradient", reparam="projector",
                               init_codebook=torch.randn(16, 12), codebook_dim=4, heads=2),
        lambda: ResidualVQ(8, 16, 3),
        lambda: FSQ([5, 4, 3], dim=8),
    ],
    ids=["vq-ema-kmeans", "simvq", "frozen-projector-heads", "rvq", "fsq"],
)
def test_round_trip_gives_identical_outputs(tmp_path, make_quantizer):
    tok = trained(tiny_tokenizer(make_quantizer()))
    folder = tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = ImageTokenizer.from_pretrained(folder)
    assert type(loaded.quantizer) is type(tok.quantizer)
    assert not loaded.training
    for (k, a), (k2, b) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = random_images(3, seed=7)
    with torch.no_grad():
        out, out2 = tok(x), loaded(x)
    assert torch.equal(out.indices, out2.indices)
    assert torch.equal(out.reconstruction, out2.reconstruction)
    assert torch.equal(loaded.decode(loaded.encode(x)), out.reconstruction)


def test_config_content_and_model_card(tmp_path):
    tok = tiny_tokenizer(VectorQuantize(8, 32))
    folder = tok.save_pretrained(tmp_path / "tok", repo_id="me/tiny")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "ImageTokenizer" and cfg["format_version"] == hub.FORMAT_VERSION
    assert cfg["init_args"]["quantizer"]["class_path"] == "vqlib.VectorQuantize"
    assert cfg["init_args"]["quantizer"]["init_args"]["codebook_size"] == 32
    assert cfg["init_args"]["ch_mult"] == [1, 2, 2]
    card = (folder / "README.md").read_text()
    assert "ImageTokenizer.from_pretrained('me/tiny')" in card and "vqlib.VectorQuantize" in card
    assert "{{" not in card and "library_name: vqlib" in card


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageTokenizer.from_pretrained(str(tmp_path / "a" / "b"))  # a path, never sent to the Hub
    folder = tiny_tokenizer().save_pretrained(tmp_path / "tok")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        ImageTokenizer.from_pretrained(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        ImageTokenizer.from_pretrained(tmp_path / "file")


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key in cfg:
            cfg[key] = value
        else:
            cfg["init_args"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def test_wrong_model_type_newer_format_and_mismatch(tmp_path):
    folder = tiny_tokenizer().save_pretrained(tmp_path / "tok")
    edit_config(folder, model_type="AudioTokenizer")
    with pytest.raises(ValueError, match="describes a 'AudioTokenizer', not a 'ImageTokenizer'"):
        ImageTokenizer.from_pretrained(folder)
    edit_config(folder, model_type="ImageTokenizer", format_version=hub.FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="newer than this vqlib supports"):
        ImageTokenizer.from_pretrained(folder)
    edit_config(folder, format_version=hub.FORMAT_VERSION, ch=16)
    with pytest.raises(ValueError, match="does not match the model built from config.json.*shape mismatches"):
        ImageTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageTokenizer.from_pretrained(folder)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_tokenizer().save_pretrained(tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_save_into_existing_folder_replaces_files_and_keeps_others(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    tiny_tokenizer(seed=0).save_pretrained(folder)
    second = tiny_tokenizer(seed=1)
    second.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    loaded = ImageTokenizer.from_pretrained(folder)
    assert torch.equal(loaded.encoder.conv_in.weight, second.encoder.conv_in.weight)


def test_repo_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    folder = tiny_tokenizer().save_pretrained(tmp_path / "tok")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ImageTokenizer.from_pretrained("someone/tiny-tokenizer", revision="v1")
    assert calls[0][0] == "someone/tiny-tokenizer" and calls[0][1]["revision"] == "v1"
    assert "model.safetensors" in calls[0][1]["allow_patterns"]

    def failing(repo_id, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(OSError, match="'someone/x' is not a local folder and could not be fetched"):
        ImageTokenizer.from_pretrained("someone/x")


def test_push_to_hub_uploads_saved_folder(monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            seen["created"] = (repo_id, private, exist_ok)

        def create_branch(self, repo_id, branch, exist_ok=False):
            seen["branch"] = branch

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            seen["files"] = sorted(p.name for p in folder_path.iterdir())
            seen["card"] = (folder_path / "README.md").read_text()
            seen["loaded"] = ImageTokenizer.from_pretrained(folder_path)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    tok = tiny_tokenizer()
    assert tok.push_to_hub("me/tok", private=True, token="t") == "commit-info"
    assert seen["created"] == ("me/tok", True, True) and seen["token"] == "t"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "from_pretrained('me/tok')" in seen["card"]
    assert torch.equal(seen["loaded"].decoder.conv_out.weight, tok.decoder.conv_out.weight)


def test_frozen_codebook_factory_round_trip_needs_no_codebook_file(tmp_path):
    from safetensors.torch import save_file

    from vqlib.models import frozen_codebook_quantizer

    features = torch.randn(40, 12)
    save_file({"codebook": features}, tmp_path / "frozen.safetensors")
    q = frozen_codebook_quantizer(8, str(tmp_path / "frozen.safetensors"), codebook_dim=4)
    assert q.codebook_size == 40 and torch.equal(q.codebooks[0].basis, features)
    tok = trained(tiny_tokenizer(q))
    folder = tok.save_pretrained(tmp_path / "tok")
    cfg = json.loads((folder / "config.json").read_text())["init_args"]["quantizer"]
    assert cfg["class_path"] == "vqlib.VectorQuantize" and cfg["init_args"]["init_codebook_shape"] == [40, 12]
    (tmp_path / "frozen.safetensors").unlink()
    loaded = ImageTokenizer.from_pretrained(folder)
    x = random_images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, tok(x).reconstruction)
    with pytest.raises(FileNotFoundError, match="frozen codebook file .* does not exist"):
        frozen_codebook_quantizer(8, str(tmp_path / "frozen.safetensors"))
    save_file({"a": features, "b": features.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="holds 2 tensors"):
        frozen_codebook_quantizer(8, str(tmp_path / "two.safetensors"))
    assert frozen_codebook_quantizer(8, str(tmp_path / "two.safetensors"), key="b").codebook_size == 40
