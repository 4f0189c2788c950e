"""Where the benchmarks find real-world data: the repository's test data when it is there,
else the shared data folder next to the checkout. Every bench also takes the folder as an
argument; nothing here imports the tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_data_dir(name: str) -> Path:
    """``tests/data/<name>`` if it exists, else ``../shared/data/<name>``."""
    inside = ROOT / "tests" / "data" / name
    return inside if inside.is_dir() else ROOT.parent / "shared" / "data" / name
