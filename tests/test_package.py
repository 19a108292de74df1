"""ptame as a package: the wheel builds, installs outside the repository (no conf/, no tests/) and
its library API works from there; the licence and citation files exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from .helpers.entry_points import REPO_ROOT

API_SCRIPT = textwrap.dedent("""
    import pathlib, sys
    import torch
    from torch import nn
    import ptame
    from ptame import PTAME, AuxiliaryFeatureExtractor, Backbone, PTAMEExplainer

    site = pathlib.Path(sys.argv[1]).resolve()
    assert pathlib.Path(ptame.__file__).resolve().is_relative_to(site), ptame.__file__
    assert (pathlib.Path(ptame.__file__).parent / "py.typed").is_file()

    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        def forward(self, x):
            first = self.a(x).relu()
            return [first, self.b(first).relu()]

    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(8, 5))
    backbone = Backbone(classifier, (0.5,) * 3, (0.25,) * 3, name="any-classifier")
    auxiliary = AuxiliaryFeatureExtractor(Pyramid(), ["a", "b"], (0.5,) * 3, (0.25,) * 3, name="pyramid")
    explainer = PTAMEExplainer(PTAME(backbone, auxiliary, input_size=(32, 32))).eval()
    maps = explainer(torch.rand(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and 0 <= float(maps.min()) and float(maps.max()) <= 1
    print("library API works from", site)
""")


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build the wheel")
def test_the_wheel_installs_outside_the_repository_and_its_api_works(tmp_path):
    built = subprocess.run(["uv", "build", "--wheel", "--out-dir", str(tmp_path / "dist")], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ptame-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(["uv", "pip", "install", "--no-deps", "--python", sys.executable, "--target",
                                str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert not (site / "conf").exists() and not (site / "tests").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "use_ptame.py").write_text(API_SCRIPT)
    # the installed copy first on the path (before the repository's editable install), run away from it
    result = subprocess.run([sys.executable, "use_ptame.py", str(site)], cwd=elsewhere, capture_output=True,
                            text=True, timeout=600, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "library API works from" in result.stdout


def test_the_licence_and_the_citation_are_there():
    import yaml

    assert "MIT License" in (REPO_ROOT / "LICENSE").read_text()
    citation = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    assert citation["preferred-citation"]["title"].startswith("P-TAME: Explain Any Image Classifier")
