"""The distribution installs everything inside the vqlib namespace: never bare top-level
`models`, `training` or `kernels` packages."""

import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("vqlib-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_names(wheel_path):
    return zipfile.ZipFile(wheel_path).namelist()


def test_wheel_maps_folders_into_the_vqlib_namespace(wheel_names):
    top_level = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"vqlib"}
    for module in ("vqlib/models/__init__.py", "vqlib/training/__init__.py", "vqlib/kernels/__init__.py"):
        assert module in wheel_names
    assert "vqlib/training/configs/image_tiny.yaml" in wheel_names


def test_installed_packages_import_from_the_namespace():
    import importlib.util

    import vqlib.kernels
    import vqlib.models
    import vqlib.training

    assert vqlib.models.__name__ == "vqlib.models"
    for bare in ("models", "training", "kernels"):
        spec = importlib.util.find_spec(bare)
        assert spec is None or "site-packages" not in str(spec.origin), f"bare top-level package {bare!r} installed"


def test_model_card_templates_ship_in_the_wheel_and_load_from_it(wheel_names, wheel_path):
    for name in (
        "vqlib/model_cards/__init__.py",
        "vqlib/model_cards/tokenizer_card.md",
        "vqlib/model_cards/compressed_card.md",
        "vqlib/cards.py",
        "vqlib/serialization.py",
    ):
        assert name in wheel_names, name
    # Read them as vqlib.cards does (importlib.resources) from the wheel itself, in a fresh interpreter whose
    # only vqlib is the wheel (a bare vqlib package stands in so that torch is not imported).
    code = (
        "import sys, types, importlib.resources as r\n"
        f"sys.path.insert(0, {str(wheel_path)!r})\n"
        f"pkg = types.ModuleType('vqlib'); pkg.__path__ = [{str(wheel_path)!r} + '/vqlib']; sys.modules['vqlib'] = pkg\n"
        "import vqlib.model_cards as m\n"
        "assert m.__file__.startswith(sys.path[0]), m.__file__\n"
        "print(r.files('vqlib.model_cards').joinpath('tokenizer_card.md').read_text()[:20])\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "{{ card_data }}" in out.stdout
