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
os.environ.pop("TRM_LM_SMOKE", None)  # a developer's exported smoke switch must not shrink in-process tests

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline copies of the real data sets; skip (saying why) only when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent next to the checkout ({SHARED_DATA}); data-dependent test skipped")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads make tiny models crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories(shared_data):
    """The 1,000 real validation stories."""
    from trm_lm.data import read_documents

    return read_documents(shared_data / "tinystories" / "valid.jsonl")


@pytest.fixture(scope="module")
def tokenizer(stories):
    """A small byte-level BPE trained on 300 of them."""
    from trm_lm.data import train_bpe_tokenizer

    return train_bpe_tokenizer(stories[:300], vocab_size=512)
