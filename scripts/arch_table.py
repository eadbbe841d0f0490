"""Print the README's architecture table from the coverage-matrix cases (tests/arch_cases.py).

Usage: python scripts/arch_table.py   (paste between the README's arch-table markers; a test checks it)
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from arch_cases import markdown_table  # noqa: E402

if __name__ == "__main__":
    print(markdown_table())
