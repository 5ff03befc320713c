"""Make the upstream transformers `tests` package (laid out by layout_upstream.py) importable.

build/hf-upstream/tests is a regular package (it has __init__.py), so once build/hf-upstream is on
sys.path `import tests` resolves to it rather than to this project's tests/ folder, which is a plain
directory (no __init__.py) and therefore only a namespace-package candidate. Nothing happens when the
layout is absent: test_trm_hf_common.py then skips itself.
"""
import sys
from pathlib import Path

UPSTREAM_ROOT = Path(__file__).resolve().parents[2] / "build" / "hf-upstream"

if (UPSTREAM_ROOT / "tests" / "test_modeling_common.py").is_file() and str(UPSTREAM_ROOT) not in sys.path:
    sys.path.insert(0, str(UPSTREAM_ROOT))


def pytest_configure(config):
    """Register the marks the upstream files use, so they do not warn as unknown."""
    for mark in ("generate", "torch_compile_test", "torch_export_test", "flash_attn_test", "flash_attn_3_test",
                 "flash_attn_4_test", "accelerate_tests", "training_ci", "is_training_test", "kernels_test"):
        config.addinivalue_line("markers", f"{mark}: used by transformers' upstream common tests")
