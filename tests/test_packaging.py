"""The distribution installs everything inside the vqlib namespace: never bare top-level
`models`, `training` or `kernels` packages."""

import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("vqlib-*.whl")
    return zipfile.ZipFile(wheel).namelist()


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
