"""Model cards (README.md with Hub metadata) for trained trm-lm models.

`render_model_card` is used by the training loop when it saves the final model and by `trm_lm/hub.py`
before an upload, so a folder on disk and its Hub copy carry the same card.
"""

from __future__ import annotations

import importlib.metadata

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TRM_PAPER = "Tiny Recursive Model (Jolicoeur-Martineau 2025, arXiv:2510.04871)"
_FRAMEWORKS = ("torch", "transformers", "accelerate", "datasets", "tokenizers")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _usage(repo_id: str, custom_code: bool) -> str:
    remote = ", trust_remote_code=True" if custom_code else ""
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{remote})  # reads config.json: same trust\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{remote})\n'
        'inputs = tokenizer("Once upon a time", return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=40)\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n"
        "```\n"
    )


def render_model_card(
    *,
    model_name: str,
    metrics: dict[str, float] | None = None,
    run_info: dict | None = None,
    description: str | None = None,
    datasets: list[str] | None = None,
    data_description: str | None = None,
    repo_id: str | None = None,
    pipeline_tag: str = "text-generation",
    license: str = "mit",
    tags: list[str] | None = None,
    custom_code: bool = True,
) -> ModelCard:
    """A ModelCard with YAML metadata (incl. a model-index of `metrics` when `datasets` is given) and a body:
    description, usage snippet, evaluation table and training details.

    run_info: what `trm_lm.training.run_training` records (`command`, `steps`, `epochs`, `wall_time_s`,
    `hardware`, `mixed_precision`, `num_parameters`, `ema_decay`); missing keys are left out.
    datasets: Hub dataset ids (metadata); data_description: free text about the data actually used.
    """
    metrics, run_info = dict(metrics or {}), dict(run_info or {})
    repo_id = repo_id or model_name
    eval_results = None
    if datasets and metrics:
        eval_results = [
            EvalResult(task_type=pipeline_tag, dataset_type=datasets[0], dataset_name=datasets[0],
                       dataset_split="validation", metric_type=name, metric_value=float(value))
            for name, value in metrics.items()
        ]
    card_data = ModelCardData(
        model_name=model_name, license=license, library_name="transformers", pipeline_tag=pipeline_tag,
        language="en" if pipeline_tag == "text-generation" else None, datasets=datasets,
        tags=sorted(set(["trm", "tiny-recursive-model", *(["custom_code"] if custom_code else []), *(tags or [])])),
        eval_results=eval_results,
    )

    lines = [f"# {model_name}", ""]
    lines += [description or f"A {TRM_PAPER} trained with trm-lm.", ""]
    if pipeline_tag == "text-generation":
        lines += ["## Usage", ""]
        if custom_code:
            lines += ["The modeling code ships with the weights: load it with `trust_remote_code=True` "
                      "(needs `transformers>=5`).", ""]
        lines += [_usage(repo_id, custom_code)]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in metrics.items()]
        lines += [""]
        test_sets = [name[: -len("_bits_per_byte")] for name in metrics
                     if name.endswith("_bits_per_byte") and not name.startswith("validation_")]
        if test_sets and "bits_per_byte" in metrics:
            lines += ["`bits_per_byte`, `loss` and `perplexity` are measured on the held-out slice of the training "
                      "files used for model selection; " + ", ".join(f"`{t}_bits_per_byte`" for t in test_sets) +
                      " score the final model once on the test file(s) " + ", ".join(f"`{t}`" for t in test_sets) +
                      " (whole documents, never trained on; the primary number is the first).", ""]
    training = [
        ("data", data_description or (", ".join(datasets) if datasets else None)),
        ("optimizer steps", run_info.get("steps")),
        ("epochs", run_info.get("epochs")),
        ("parameters", f"{run_info['num_parameters']:,}" if "num_parameters" in run_info else None),
        ("EMA decay", run_info.get("ema_decay") or None),
        ("mixed precision", run_info.get("mixed_precision")),
        ("hardware", run_info.get("hardware")),
        ("wall time", f"{run_info['wall_time_s'] / 60:.1f} min" if "wall_time_s" in run_info else None),
    ]
    training = [(name, value) for name, value in training if value is not None]
    if training or run_info.get("command"):
        lines += ["## Training", ""]
        lines += [f"- {name}: {_format(value)}" for name, value in training]
        if run_info.get("command"):
            lines += ["", "Command:", "", "```bash", run_info["command"], "```"]
        lines += [""]
    versions = []
    for package in _FRAMEWORKS:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    lines += ["## Framework versions", "", ", ".join(versions), ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


__all__ = ["render_model_card", "TRM_PAPER"]
