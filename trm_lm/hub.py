"""Push a trained model to the Hugging Face Hub: weights, tokenizer, model card and modeling code, one commit.

    python -m trm_lm.hub push --model runs/trm-tinystories-small --repo_id user/trm-tinystories-small \
        [--private] [--token hf_...] [--datasets roneneldan/TinyStories]

What is uploaded is what loads here: the model and tokenizer are loaded from the folder (safetensors only,
checked by trm_lm.generation), saved again with `save_pretrained` into a staging folder (which writes the
remote-code files configuration_trm.py, modeling_trm.py and core.py next to the weights, with the
`auto_map` that `trust_remote_code=True` needs), joined by a README.md model card rendered from the
folder's `results.json` (metrics + run info written by trm_lm.training), and sent with one
`HfApi.upload_folder` call, i.e. one commit. Training leftovers (checkpoints, logs) stay home.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.utils import validate_repo_id

from .generation import load_model_and_tokenizer, one_line
from .model_card import render_model_card

RESULTS_FILE = "results.json"  # trm_lm.training: {"metrics": {...}, "command": ..., "steps": ..., ...}
LIMITATIONS = """## Limitations

- A tiny model trained on a small corpus (see Training): it writes short, simple stories in the style
  of its training data, often with grammatical slips, lost threads and repetitions. It is a research
  artefact, not a general-purpose assistant, and its output is not checked for facts or safety.
- English only, and only as good as its byte-level BPE tokenizer's training text.
- The modeling code ships with the weights (`trust_remote_code=True`) and targets `transformers>=5`.
- With a halt threshold, tokens stop after fewer supervision steps (per-token ACT): faster, possibly
  worse. The evaluation above used the model's default (`halt_threshold` in config.json).
"""


def read_run_results(model_dir: str | Path) -> tuple[dict, dict]:
    """(metrics, run_info) from the folder's results.json; both empty when there is none."""
    path = Path(model_dir) / RESULTS_FILE
    if not path.is_file():
        return {}, {}
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict):
            raise ValueError("expected a JSON object")
    except ValueError as error:
        raise ValueError(f"{path} is not valid results JSON: {one_line(error)}") from error
    metrics = results.pop("metrics", None) or {}
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: 'metrics' must be an object of name -> number, got {type(metrics).__name__}")
    return metrics, results


def build_model_card(model_dir: str | Path, repo_id: str, custom_code: bool = True, datasets: list[str] | None = None,
                     data_description: str | None = None) -> ModelCard:
    """The README.md for `repo_id`, from the folder's results.json; adds a Limitations section."""
    metrics, run_info = read_run_results(model_dir)
    card = render_model_card(model_name=repo_id.split("/")[-1], metrics=metrics, run_info=run_info, datasets=datasets,
                             data_description=data_description, repo_id=repo_id, custom_code=custom_code)
    if "## Limitations" not in card.content:
        card = ModelCard(card.content.rstrip("\n") + "\n\n" + LIMITATIONS)
    return card


def stage_upload(model_dir: str | Path, staging_dir: str | Path, repo_id: str, datasets: list[str] | None = None,
                 data_description: str | None = None) -> list[str]:
    """Write what will be uploaded into `staging_dir`; return the file names."""
    staging_dir = Path(staging_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")  # checks the folder first
    model.save_pretrained(staging_dir)
    tokenizer.save_pretrained(staging_dir)
    custom_code = bool(getattr(model.config, "auto_map", None))
    build_model_card(model_dir, repo_id, custom_code, datasets, data_description).save(staging_dir / "README.md")
    return sorted(path.name for path in staging_dir.iterdir() if path.is_file())


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload trm-lm model", revision: str | None = None,
                datasets: list[str] | None = None, data_description: str | None = None) -> CommitInfo:
    """Create `repo_id` if needed and upload model + tokenizer + card + modeling code in one commit."""
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise ValueError(f"invalid --repo_id {repo_id!r}: {one_line(error)} (expected 'user/name')") from error
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="trm-lm-push-") as staging:
        stage_upload(model_dir, staging, repo_id, datasets, data_description)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 revision=revision, repo_type="model")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trm_lm.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a model folder to the Hub in one commit")
    push.add_argument("--model", required=True, help="model folder (save_pretrained output, safetensors)")
    push.add_argument("--repo_id", required=True, help="Hub repository, e.g. user/trm-tinystories-small")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved `hf auth login`)")
    push.add_argument("--commit_message", default="Upload trm-lm model")
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.add_argument("--datasets", nargs="*", default=None, help="Hub dataset ids for the card's metadata")
    push.add_argument("--data_description", default=None, help="free text about the training data, for the card")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        commit = push_to_hub(args.model, args.repo_id, private=args.private, token=args.token,
                             commit_message=args.commit_message, revision=args.revision, datasets=args.datasets,
                             data_description=args.data_description)
    except (ValueError, OSError) as error:  # the Hub's HTTP errors are OSErrors too
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"pushed {args.model} to {commit.commit_url}")
    return 0


__all__ = ["push_to_hub", "stage_upload", "build_model_card", "read_run_results"]

if __name__ == "__main__":
    sys.exit(main())
