"""The repository root is on ``sys.path`` whenever Python runs from it (``python -m pytest``, the test
command; ``python -m effqat_plugin.cli``; ``python -c``), so none of its top-level folders may carry
the name of an installed module: the folder would be imported instead. That broke every run from the
root once transformers 5.25 began importing Hugging Face's ``kernels`` library, while the kernels'
folder was still called ``kernels/``."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_FIND_OUTSIDE = """
import importlib.util, json, sys
sys.path = [p for p in sys.path if p not in ("", ".")]
print(json.dumps({n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}))
"""


def test_no_top_level_folder_shadows_an_installed_module(tmp_path):
    folders = sorted(p.name for p in REPO.iterdir()
                     if p.is_dir() and (p / "__init__.py").exists() and p.name != "effqat_plugin")
    assert "effqat_kernels" in folders and "converters" in folders
    # looked up from another directory, so the repository root is not on the path
    res = subprocess.run([sys.executable, "-c", _FIND_OUTSIDE, *folders], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    installed = {n for n, found in json.loads(res.stdout).items() if found}
    assert not installed, f"repository folders named like installed modules: {sorted(installed)}"


def test_transformers_and_gptqmodel_import_from_the_repository_root():
    """What the test command and ``python -m effqat_plugin.cli`` do first, from the root."""
    code = ("import transformers.modeling_utils, gptqmodel, effqat_plugin.kernels as k; "
            "print(k.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip().splitlines()[-1]).parent.name == "effqat_kernels"
    if importlib.util.find_spec("kernels") is not None:     # Hugging Face's, where transformers pulled it in
        res = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=REPO,
                             capture_output=True, text=True, check=True)
        assert not Path(res.stdout.strip()).is_relative_to(REPO / "kernels")
