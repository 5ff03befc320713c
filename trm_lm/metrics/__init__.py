"""Local `evaluate` metric modules: `evaluate.load(trm_lm.metrics.BITS_PER_BYTE)` needs no Hub access."""

from pathlib import Path

BITS_PER_BYTE = str(Path(__file__).resolve().parent / "bits_per_byte")

__all__ = ["BITS_PER_BYTE"]
