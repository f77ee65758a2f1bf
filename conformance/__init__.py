"""bnconform's harness: case format, float64 reference, comparison, pytest plugin, command line.

Imports no framework (nor NumPy) here: `reports` reads results through `conformance.results`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: cases/, adapters/, results/
DEFAULT_CASES = ROOT / "cases"
RESULTS_DIR = ROOT / "results"
