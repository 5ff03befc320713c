"""Test-session environment: offline, no telemetry, a throwaway HF cache."""
import os
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="trm-lm-hf-home-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HOME": _HF_HOME,
}.items():
    os.environ.setdefault(key, value)
os.environ["HF_HOME"] = _HF_HOME  # never touch the user's real cache

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline copies of the real data sets; skip (saying why) only when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent next to the checkout ({SHARED_DATA}); data-dependent test skipped")
    return SHARED_DATA
