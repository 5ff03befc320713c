#!/usr/bin/env python
"""Lay out transformers' own common test files OUTSIDE the project's tracked tree, for tests/hf_suite.

Nothing from transformers is ever committed here: this script assembles, at run time, a `tests` package
under a git-ignored folder (default `build/hf-upstream/tests/`) from

  (a) the sdist of the INSTALLED transformers version: its top-level `tests/*.py`
      (test_modeling_common.py, test_configuration_common.py, ...). Downloaded with
      `pip download --no-deps --no-binary :all: transformers==<installed>` unless --sdist is given
      (a .tar.gz, or an already-extracted `transformers-X.Y.Z/` folder);
  (b) an upstream checkout of huggingface/transformers (--upstream-repo DIR, ideally at the tag of the
      installed version: `git clone --depth 1 --branch vX.Y.Z https://github.com/huggingface/transformers`),
      from which it copies `tests/generation/{__init__,test_utils}.py`, which the sdist does not ship.

`tests/exporters/` is NOT copied: the sdist does not ship it and an upstream copy from another commit
pulls in exporter APIs of that commit. A one-file stub is written instead, so that
`from .exporters.test_export import ExportTesterMixin` (test_modeling_common) and
`from tests.exporters.test_export import ExportGenerateTesterMixin` (newer generation/test_utils) resolve:
the export tests are simply not run.

No upstream test logic is edited. The only change ever made is a documented import shim (see SHIMS),
applied at layout time to the laid-out copy, never to anything in the project.

Usage:
    python tests/hf_suite/layout_upstream.py --upstream-repo DIR [--sdist PATH] [--out build/hf-upstream]
then:
    python -m pytest tests/hf_suite -p no:cacheprovider
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = PROJECT_ROOT / "build" / "hf-upstream"

# Files taken from the upstream checkout (relative to its root). __init__.py files are empty upstream.
UPSTREAM_FILES = ["tests/generation/__init__.py", "tests/generation/test_utils.py"]

EXPORT_STUB = '''"""STUB written by trm-lm's tests/hf_suite/layout_upstream.py -- not an upstream file.

Export tests not run: the upstream tests/exporters/test_export.py at this version is not in the sdist
(and a copy from another commit depends on that commit's exporter APIs). These empty mixins only let
`tests.test_modeling_common` and `tests.generation.test_utils` import.
"""


class ExportTesterMixin:
    """Stub: no export tests."""


class ExportGenerateTesterMixin:
    """Stub: no export-generate tests."""
'''

# Import shims: (file, exact old text, new text, why). Empty unless an upstream import does not resolve
# against the installed transformers; each one is reported when applied, and recorded in LAYOUT.json.
SHIMS: list[tuple[str, str, str, str]] = []


def installed_version() -> str:
    return importlib.metadata.version("transformers")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"transformers=={version}", "-d", str(into)]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(into.glob("transformers-*.tar.gz"))
    if not found:
        sys.exit(f"pip download produced no transformers-*.tar.gz in {into}")
    return found[0]


def sdist_tests_dir(sdist: Path, scratch: Path) -> Path:
    """The sdist's tests/ folder: extract a .tar.gz into scratch, or use an extracted folder as is."""
    if sdist.is_dir():
        root = sdist
    else:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
            tar.extractall(scratch, members=members, filter="data")
        tops = [p for p in scratch.iterdir() if p.is_dir()]
        if len(tops) != 1:
            sys.exit(f"unexpected sdist layout in {sdist}")
        root = tops[0]
    tests = root / "tests"
    if not (tests / "test_modeling_common.py").is_file():
        sys.exit(f"{tests} has no test_modeling_common.py: not a transformers sdist?")
    return tests


def git_describe(repo: Path) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                                  text=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None
    return {"commit": git("rev-parse", "HEAD"), "commit_date": git("log", "-1", "--format=%ci"),
            "subject": git("log", "-1", "--format=%s"), "describe": git("describe", "--tags", "--always")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-repo", required=True, type=Path,
                        help="checkout of huggingface/transformers (for tests/generation/)")
    parser.add_argument("--sdist", type=Path,
                        help="transformers sdist (.tar.gz or extracted folder) of the installed version; "
                             "default: pip download it")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to lay out (default {DEFAULT_OUT.relative_to(PROJECT_ROOT)}; keep it git-ignored)")
    args = parser.parse_args(argv)

    version = installed_version()
    out = args.out.resolve()
    if PROJECT_ROOT in out.parents or out == PROJECT_ROOT:
        ignored = subprocess.run(["git", "-C", str(PROJECT_ROOT), "check-ignore", "-q", str(out)]).returncode == 0
        if not ignored:
            sys.exit(f"{out} is inside the project but not git-ignored: refusing to lay upstream files there")
    upstream = args.upstream_repo.resolve()
    for rel in UPSTREAM_FILES:
        if not (upstream / rel).is_file():
            sys.exit(f"{upstream / rel} is missing: --upstream-repo must be a huggingface/transformers checkout")

    manifest = {"installed_transformers": version, "files": {}, "shims": []}
    with tempfile.TemporaryDirectory(prefix="hf-upstream-") as tmp:
        tmp = Path(tmp)
        sdist = args.sdist.resolve() if args.sdist else download_sdist(version, tmp / "dl")
        (tmp / "x").mkdir()
        src_tests = sdist_tests_dir(sdist, tmp / "x")
        manifest["sdist"] = str(sdist)

        if out.exists():
            shutil.rmtree(out)
        dest = out / "tests"
        dest.mkdir(parents=True)

        print(f"installed transformers {version}")
        print(f"(a) from sdist {sdist}:")
        for path in sorted(src_tests.rglob("*.py")):
            rel = path.relative_to(src_tests)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
            manifest["files"][f"tests/{rel}"] = {"from": "sdist", "sha256": sha256(path)}
            print(f"    tests/{rel}")

    info = git_describe(upstream)
    manifest["upstream_repo"] = {"path": str(upstream), **info}
    print(f"(b) from upstream checkout {upstream} (commit {info['commit']}, {info['commit_date']}):")
    for rel in UPSTREAM_FILES:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(upstream / rel, target)
        manifest["files"][rel] = {"from": "upstream", "sha256": sha256(target)}
        print(f"    {rel}")

    for rel in ("tests/__init__.py", "tests/exporters/__init__.py"):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("")
            manifest["files"][rel] = {"from": "written (empty package marker)"}
            print(f"(c) written: {rel} (empty package marker)")
    (out / "tests/exporters/test_export.py").write_text(EXPORT_STUB)
    manifest["files"]["tests/exporters/test_export.py"] = {
        "from": "written stub: export tests not run, the upstream file at this version is not in the sdist"}
    print("(c) written: tests/exporters/test_export.py (stub ExportTesterMixin/ExportGenerateTesterMixin: "
          "export tests not run, the upstream file at this version is not in the sdist)")

    for rel, old, new, why in SHIMS:
        path = out / rel
        text = path.read_text()
        if old not in text:
            print(f"shim not needed / not applicable in {rel}: {why}")
            continue
        path.write_text(text.replace(old, new, 1))
        manifest["shims"].append({"file": rel, "old": old, "new": new, "why": why})
        print(f"(d) shim applied to {rel}: {why}")

    (out / "LAYOUT.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"laid out {len(manifest['files'])} files under {out} (manifest: {out / 'LAYOUT.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
