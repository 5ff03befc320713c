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

# pytest-xdist (pyproject.toml's addopts: one worker per core) runs the suite in several worker processes side by
# side. Each gets its share of the cores for torch's intra-op threads, and so do the interpreters it starts
# (OMP_NUM_THREADS), so that the workers do not oversubscribe a small CPU (2 workers x 2 threads on 2 cores
# make tiny models crawl). Without xdist (-n 0, or -p no:xdist) nothing changes.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if os.environ.get("PYTEST_XDIST_WORKER") and _XDIST_WORKERS > 0:
    _threads = str(max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                       // _XDIST_WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads

    import torch  # noqa: E402

    torch.set_num_threads(int(_threads))

import pytest  # noqa: E402
from helpers import build_tiny_model, build_tiny_solver, load_script, running_app  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# ----- models and apps built once (tests/helpers.py has the builders) -----------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-trm"))


@pytest.fixture(scope="session")
def tiny_solver_dir(tmp_path_factory) -> Path:
    return build_tiny_solver(tmp_path_factory.mktemp("tiny-sudoku-solver"))


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    """The tiny model loaded by the one checked loader, as every CLI loads a model."""
    from trm_lm.generation import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def cli():
    """generate/generate.py as a module (its main(argv) is the CLI)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    yield load_script("generate/generate.py")
    hf_logging.set_verbosity(verbosity)  # main() silences transformers; give the rest of the session its logs back


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    with running_app(tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(app[0], verbose=False)


# ----- the offline data ----------------------------------------------------------------------------------

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


# Under xdist (--dist loadfile: each file runs whole on one worker, so its module-scoped fixtures are built once),
# the longest files are handed out first, so that short files fill the end of the run rather than one long file
# running alone while the other workers idle. First of all tests/test_readme.py, whose slow test runs every
# README command in two lanes (2 to 3 minutes); then the others that take half a minute or more on 2 cores.
# A name that no longer exists only drops out of the order; every other file follows in the usual order.
LONGEST_FIRST = ("test_readme.py", "test_resume.py", "test_training.py", "test_train.py",
                 "test_no_warnings.py", "test_app_robustness.py", "test_generate_robustness.py", "test_ddp.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects: a stable sort orders them all alike
        rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
