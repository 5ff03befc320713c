"""Where a benchmark writes its JSON + Markdown: outputs/benchmarks/ by default, so a run never overwrites the
committed tables by accident; benchmarks/results/ (committed, quoted by the docs) only with --update-results."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results"
SCRATCH = REPO / "outputs" / "benchmarks"


def add_results_flags(parser, name: str) -> None:
    """--update-results and --out OUT (writes OUT.json and OUT.md; overrides both folders)."""
    parser.add_argument("--update-results", action="store_true",
                        help=f"write {COMMITTED.relative_to(REPO)}/{name}.{{json,md}} (committed) instead of "
                             f"{SCRATCH.relative_to(REPO)}/")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md instead")


def results_path(args, name: str) -> Path:
    """OUT (no suffix) for the parsed flags of add_results_flags; its folder exists."""
    out = Path(args.out) if args.out else (COMMITTED if args.update_results else SCRATCH) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
