"""HubMixin: save_pretrained / from_pretrained round trips, clear errors, atomic writes, push_to_hub plumbing
(Hugging Face calls are replaced by fakes: no network)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hub_server import FakeHub
from image_helpers import random_images, tiny_tokenizer
from torch import nn
from vqlib.models import ImageTokenizer, hub
from vqlib.models.audio_tokenizer import AudioTokenizer

from vqlib import FSQ, ResidualVQ, VectorQuantize
from vqlib.compress import (
    VQConfig,
    compress,
    load_compressed,
    push_to_hub,
    save_compressed,
)


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
        lambda: VectorQuantize(
            8,
            16,
            codebook_update="gradient",
            reparam="projector",
            init_codebook=torch.randn(16, 12),
            codebook_dim=4,
            heads=2,
        ),
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


# -- through a fake Hub on 127.0.0.1 (tests/hub_server.py): huggingface_hub's real download/upload code ---------

FAST_VQ = dict(algorithm="data_free", vector_dim=4, codebook_bits=4, kmeans_iters=5, finetune_steps=0)


@pytest.fixture(scope="module")
def fake_hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def hub_env(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub's constants pointed at the fake Hub, with a cache and HF_HOME under tmp_path."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for name, value in {
        "ENDPOINT": fake_hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": fake_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "AGENT_HARNESSES_PATH": str(home / "agents.json"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return fake_hub


def audio_tokenizer(seed=0):
    torch.manual_seed(seed)
    rvq = ResidualVQ(8, 16, 2, channel_first=True, seed=seed)
    return AudioTokenizer(rvq, sample_rate=8000, n_filters=2, ratios=[4, 2], residual_dilations=[1], lstm_layers=0)


def test_image_tokenizer_push_pull_revision_cache_offline(hub_env):
    first, second = tiny_tokenizer(seed=0), tiny_tokenizer(seed=1)
    info = first.push_to_hub("me/img", metrics={"val/psnr": 21.5, "val/usage": 0.75})
    sha1 = info.oid
    sha2 = second.push_to_hub("me/img").oid
    assert sha1 != sha2 and hub_env.repos["me/img"].refs["main"] == sha2
    hub_env.tag("me/img", "v1", sha1)
    x = random_images(2, seed=3)

    latest = ImageTokenizer.from_pretrained("me/img")
    assert latest.hub_commit == sha2 and latest.hub_repo_id == "me/img"
    with torch.no_grad():
        assert torch.equal(latest(x).reconstruction, second(x).reconstruction)
    pinned = ImageTokenizer.from_pretrained("me/img", revision="v1")  # a tag resolves to its commit
    assert pinned.hub_commit == sha1 and pinned.hub_metrics == {"psnr": 21.5, "codebook_usage": 0.75}
    with torch.no_grad():
        assert torch.equal(pinned(x).reconstruction, first(x).reconstruction)

    gets = hub_env.file_gets("model.safetensors") + sum(1 for m, p in hub_env.requests if p.startswith("/lfs/"))
    again = ImageTokenizer.from_pretrained("me/img", revision="v1")  # cached: no file bytes sent again
    assert again.hub_commit == sha1
    assert hub_env.file_gets("model.safetensors") + sum(1 for m, p in hub_env.requests if p.startswith("/lfs/")) == gets
    n = len(hub_env.requests)
    offline = ImageTokenizer.from_pretrained("me/img", local_files_only=True)
    assert len(hub_env.requests) == n and offline.hub_commit == sha2  # no request at all
    with pytest.raises(OSError, match="could not be fetched.*revision nope"):
        ImageTokenizer.from_pretrained("me/img", revision="nope")


def test_audio_tokenizer_round_trip_and_branch(hub_env):
    tok = audio_tokenizer()
    tok.push_to_hub("me/audio", revision="dev", metrics={"val/si_sdr": 3.5, "val/bitrate_kbps_nq2": 8.0})
    assert "dev" in hub_env.repos["me/audio"].refs
    with pytest.raises(FileNotFoundError, match="is missing config.json, model.safetensors"):
        AudioTokenizer.from_pretrained("me/audio")  # main holds only .gitattributes
    loaded = AudioTokenizer.from_pretrained("me/audio", revision="dev")
    assert loaded.hub_commit == hub_env.repos["me/audio"].refs["dev"]
    assert loaded.hub_metrics == {"si_sdr": 3.5, "bitrate_kbps": 8.0}
    wave = torch.randn(1, 1, 800, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode(wave), tok.encode(wave))
        assert torch.equal(loaded(wave).reconstruction, tok(wave).reconstruction)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make_net():
    torch.manual_seed(0)
    return Net()


def test_compressed_model_push_pull_revision_offline(hub_env, tmp_path):
    cfg = VQConfig(**FAST_VQ)
    model, report = compress(make_net(), cfg, progress=False)
    save_compressed(
        model,
        tmp_path / "c",
        config=cfg,
        report=report,
        push_to_hub=True,
        repo_id="me/net",
        metrics={"perplexity": 9.25},
    )
    sha1 = hub_env.repos["me/net"].refs["main"]
    model2, _ = compress(make_net(), VQConfig(**{**FAST_VQ, "codebook_bits": 3}), progress=False)
    sha2 = push_to_hub(model2, "me/net", commit_message="3 bits").oid
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    loaded = load_compressed("me/net", make_net, revision=sha1)
    assert loaded.hub_commit == sha1 and torch.equal(loaded(x), model(x))
    latest = load_compressed("me/net", make_net)
    assert latest.hub_commit == sha2 and torch.equal(latest(x), model2(x))
    n = len(hub_env.requests)
    assert torch.equal(load_compressed("me/net", make_net, revision=sha1, local_files_only=True)(x), model(x))
    assert len(hub_env.requests) == n

    from huggingface_hub import ModelCard

    from vqlib.cards import card_metrics

    card = ModelCard.load(tmp_path / "c" / "README.md")
    metrics = card_metrics(card)
    assert card.data.library_name == "vqlib" and metrics["perplexity"] == 9.25
    assert metrics["bits_per_weight_compressed_layers"] == pytest.approx(report.bits_per_weight)
    assert metrics["compression_seconds"] == pytest.approx(report.seconds)
    assert metrics["size_mib_compressed"] == pytest.approx(report.model_bytes_after / 2**20)


def test_bad_repos_are_refused_without_unpickling(hub_env, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading must never be used")

    import pickle

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    hub_env.commit("me/pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04not really"})
    with pytest.raises(ValueError, match=r"only pickle checkpoint\(s\) \['pytorch_model.bin'\].*never unpickles"):
        ImageTokenizer.from_pretrained("me/pickled")
    with pytest.raises(ValueError, match="only pickle checkpoint"):
        load_compressed("me/pickled", make_net)
    assert hub_env.file_gets("pytorch_model.bin") == 0  # never even downloaded

    folder = tiny_tokenizer().save_pretrained(tmp_path / "tok")
    data = (folder / "model.safetensors").read_bytes()
    hub_env.commit_folder("me/truncated", folder)
    hub_env.commit("me/truncated", {"model.safetensors": data[: len(data) - 100]})
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        ImageTokenizer.from_pretrained("me/truncated")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format_version"] = hub.FORMAT_VERSION + 1
    hub_env.commit("me/newer", {"config.json": json.dumps(cfg).encode(), "model.safetensors": data})
    with pytest.raises(ValueError, match="newer than this vqlib supports.*upgrade vqlib"):
        ImageTokenizer.from_pretrained("me/newer")
    with pytest.raises(OSError, match="'me/absent' is not a local folder and could not be fetched"):
        ImageTokenizer.from_pretrained("me/absent")


def test_card_usage_snippet_runs_as_written_in_a_fresh_interpreter(hub_env, tmp_path, monkeypatch):
    """The card's snippet, unchanged, in a child with HF_ENDPOINT set before huggingface_hub is imported; then
    the same snippet here with HF_HUB_OFFLINE from the child's cache (no request reaches the server)."""
    from huggingface_hub import constants

    tiny_tokenizer().push_to_hub("me/snippet")
    sha = hub_env.repos["me/snippet"].refs["main"]
    readme = hub_env.repos["me/snippet"].commits[sha]["README.md"].decode()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    home = tmp_path / "child_home"
    env = {**os.environ, "HF_ENDPOINT": hub_env.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    code = snippet + "\nprint(tuple(reconstruction.shape), tokenizer.hub_commit)\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == sha

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub_env.requests)
    scope: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), scope)
    assert scope["tokenizer"].hub_commit == sha and len(hub_env.requests) == n


def test_vqlib_command_info_download_upload(hub_env, tmp_path, capsys):
    from vqlib.hub_cli import main as vqlib_main

    folder = tiny_tokenizer().save_pretrained(tmp_path / "tok", metrics={"val/psnr": 20.0})
    assert vqlib_main(["upload", str(folder), "me/cli"]) == 0
    sha = hub_env.repos["me/cli"].refs["main"]
    assert f"/me/cli/commit/{sha}" in capsys.readouterr().out
    assert vqlib_main(["info", "me/cli"]) == 0
    out = capsys.readouterr().out
    assert f"me/cli @ {sha}" in out and "tokenizer (ImageTokenizer)" in out and "format version: 1" in out
    assert "PSNR (dB)" in out and "20" in out
    size = (folder / "model.safetensors").stat().st_size
    assert "model.safetensors" in out and f"{size:,} bytes" in out
    assert vqlib_main(["download", "me/cli", "--to", str(tmp_path / "copy")]) == 0
    assert f"@ {sha} to {tmp_path / 'copy'}" in capsys.readouterr().out
    assert ImageTokenizer.from_pretrained(tmp_path / "copy").decoder.conv_out.weight.shape[0] == 3

    model, report = compress(make_net(), VQConfig(**FAST_VQ), progress=False)
    save_compressed(model, tmp_path / "c", report=report)
    assert vqlib_main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "compressed model" in out and f"{report.bits_per_weight:.3f} bits per weight" in out

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_model.bin").write_bytes(b"x")
    for args, message in [
        (["info", "me/absent"], "could not be fetched"),
        (["upload", str(tmp_path / "bad"), "me/x"], "only pickle checkpoint"),
        (["download", str(tmp_path / "c")], "is a local path"),
    ]:
        assert vqlib_main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def _image_case():
    tok = tiny_tokenizer(seed=4)
    x = random_images(2, seed=5)
    return tok, lambda m: m(x).reconstruction, lambda repo, **kw: ImageTokenizer.from_pretrained(repo, **kw)


def _audio_case():
    tok = audio_tokenizer(seed=4)
    wave = torch.randn(1, 1, 400, generator=torch.Generator().manual_seed(5))
    return tok, lambda m: m(wave).reconstruction, lambda repo, **kw: AudioTokenizer.from_pretrained(repo, **kw)


def _compressed_case():
    model, _ = compress(make_net(), VQConfig(**FAST_VQ), progress=False)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    return model, lambda m: m(x), lambda repo, **kw: load_compressed(repo, make_net, **kw)


@pytest.mark.parametrize("case", [_image_case, _audio_case, _compressed_case], ids=["image", "audio", "compressed"])
def test_every_kind_second_load_from_cache_and_hf_hub_offline(hub_env, monkeypatch, case):
    from huggingface_hub import constants

    model, run, load = case()
    repo = f"me/cache-{case.__name__.strip('_')}"
    if isinstance(model, Net):
        push_to_hub(model, repo)
    else:
        model.push_to_hub(repo)
    sha = hub_env.repos[repo].refs["main"]
    with torch.no_grad():
        expected = run(model)
        assert torch.equal(run(load(repo)), expected)
        sent = sum(1 for m, p in hub_env.requests if m == "GET" and "/api/" not in p)
        assert load(repo).hub_commit == sha  # second call: only the revision/tree look-ups, no file bytes
        assert sum(1 for m, p in hub_env.requests if m == "GET" and "/api/" not in p) == sent
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        n = len(hub_env.requests)
        offline = load(repo)
        assert len(hub_env.requests) == n and offline.hub_commit == sha and torch.equal(run(offline), expected)
