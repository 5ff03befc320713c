"""Push a trained model to the Hugging Face Hub: weights, tokenizer, model card and modeling code, one commit.

    python -m trm_lm.hub push --model runs/trm-tinystories-small --repo_id user/trm-tinystories-small \
        [--private] [--token hf_...] [--datasets roneneldan/TinyStories]
    python -m trm_lm.hub export --model outputs/tinystories-cpu-long --output checkpoints/trm-tinystories-small \
        --dtype bfloat16 --samples 3          # the same folder, written locally (how the shipped model is made)

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
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.utils import validate_repo_id

from .generation import GenerationSettings, generate_text, load_model_and_tokenizer, one_line
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
                 data_description: str | None = None, dtype: str | None = None, samples: int = 0,
                 card_sections: list[str | Path] = ()) -> list[str]:
    """Write what will be uploaded into `staging_dir`; return the file names.

    dtype: cast the weights before saving ("bfloat16", "float16", "float32"; None keeps them).
    samples: append this many sample stories (seeded, from "Once upon a time") to the model card.
    card_sections: Markdown files appended to the card (e.g. benchmarks/results/depth.md), headings one level down.
    """
    sections = [card_section(path) for path in card_sections]  # read first: a missing file costs no work
    staging_dir = Path(staging_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")  # checks the folder first
    card = build_model_card(model_dir, repo_id, bool(getattr(model.config, "auto_map", None)), datasets,
                            data_description)
    if samples:
        card = ModelCard(card.content.rstrip("\n") + "\n\n" + sample_stories(model, tokenizer, samples))
    for section in sections:
        card = ModelCard(card.content.rstrip("\n") + "\n\n" + section)
    if dtype is not None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(staging_dir)
    tokenizer.save_pretrained(staging_dir)
    card.save(staging_dir / "README.md")
    return sorted(path.name for path in staging_dir.iterdir() if path.is_file())


def card_section(path: str | Path) -> str:
    """A Markdown file as a model-card section: its headings one level down (its title becomes a '##')."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"card section file not found: {path}")
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    return "\n".join("#" + line if line.startswith("#") else line for line in lines) + "\n"


def sample_stories(model, tokenizer, count: int, prompt: str = "Once upon a time", max_new_tokens: int = 160) -> str:
    """A Markdown section of `count` seeded samples (temperature 0.8, top-p 0.95), for the model card."""
    lines = ["## Sample stories", "",
             f'Prompt "{prompt}", temperature 0.8, top-p 0.95, {max_new_tokens} new tokens, seeds 0..{count - 1}:', ""]
    for seed in range(count):
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=seed)
        text = generate_text(model, tokenizer, prompt, settings).texts[0]
        lines += [f"**seed {seed}:** {prompt}{text}".replace("\n", " "), ""]
    return "\n".join(lines)


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
    export = commands.add_parser("export", help="write the folder `push` would upload to a local directory")
    export.add_argument("--model", required=True, help="model folder (save_pretrained output, safetensors)")
    export.add_argument("--output", required=True, help="where to write it (must not exist or be empty)")
    export.add_argument("--name", default=None, help="model name for the card (default: the output folder's name)")
    export.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    export.add_argument("--samples", type=int, default=3, help="sample stories to put in the card")
    export.add_argument("--datasets", nargs="*", default=None)
    export.add_argument("--data_description", default=None)
    export.add_argument("--card_section", nargs="*", default=[], metavar="FILE",
                        help="Markdown files appended to the model card, e.g. benchmarks/results/depth.md")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output folder (swapped in only once the new one is complete)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "export":
        output = Path(args.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
            print(f"error: {output} exists and is not empty (pass --overwrite to replace it)", file=sys.stderr)
            return 2
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-export-", dir=output.parent))
        try:
            files = stage_upload(args.model, staging, args.name or output.name, args.datasets, args.data_description,
                                 dtype=args.dtype, samples=args.samples, card_sections=args.card_section)
            old = output.with_name(f".{output.name}-replaced")
            if output.exists():
                shutil.rmtree(old, ignore_errors=True)
                output.rename(old)
            staging.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        print(f"exported {args.model} to {output}: {', '.join(files)}")
        return 0
    try:
        commit = push_to_hub(args.model, args.repo_id, private=args.private, token=args.token,
                             commit_message=args.commit_message, revision=args.revision, datasets=args.datasets,
                             data_description=args.data_description)
    except (ValueError, OSError) as error:  # the Hub's HTTP errors are OSErrors too
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"pushed {args.model} to {commit.commit_url}")
    return 0


__all__ = ["push_to_hub", "stage_upload", "build_model_card", "read_run_results", "sample_stories"]

if __name__ == "__main__":
    sys.exit(main())
