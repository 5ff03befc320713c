"""`python -m trm_lm.hub push`, offline: HfApi is stopped at the network boundary (create_repo, upload_folder,
and create_commit, which must not be reached by any other path). What would be uploaded is then loaded with
trust_remote_code=True in a fresh interpreter that cannot import trm_lm, and must generate what the model
generates here.
"""

import json
import shutil
from pathlib import Path
from unittest import mock

import huggingface_hub.constants
import pytest
import torch
from helpers import WITHOUT_TRM_LM, run_isolated
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers import AutoModelForCausalLM

from trm_lm import hub

REPO_ID = "someone/trm-tiny-test"
METRICS = {"eval_bits_per_byte": 1.234, "eval_perplexity": 5.67}
COMMAND = "accelerate launch train/train_lm.py --config train/configs/tiny.yaml"


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model plus what trm_lm.training leaves next to it: results.json, a log, a checkpoint folder."""
    folder = tmp_path_factory.mktemp("run") / "trm-tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "results.json").write_text(json.dumps({"metrics": METRICS, "command": COMMAND, "steps": 100}))
    (folder / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (folder / "checkpoints" / "step_100").mkdir(parents=True)
    (folder / "checkpoints" / "step_100" / "optimizer.bin").write_bytes(b"not for the hub")
    return folder


class FakeHub:
    """Stands in for the Hub: records create_repo calls and the files of every upload (= one commit each)."""

    def __init__(self, received: Path):
        self.received, self.repos, self.commits = received, [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        self.token = api.token
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        self.commits.append((repo_id, files, kwargs))
        shutil.copytree(folder_path, self.received, dirs_exist_ok=True)  # the staging folder goes after the push
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc", commit_message="",
                          commit_description="", oid="0123abc")


@pytest.fixture(scope="module")
def pushed(trained_dir, tmp_path_factory):
    fake = FakeHub(tmp_path_factory.mktemp("received"))
    with mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=fake.create_repo), \
         mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake.upload_folder), \
         mock.patch.object(HfApi, "create_commit", side_effect=AssertionError("a second commit path was used")):
        code = hub.main(["push", "--model", str(trained_dir), "--repo_id", REPO_ID, "--private",
                         "--token", "hf_not_a_real_token", "--datasets", "roneneldan/TinyStories"])
    assert code == 0
    return fake


def test_push_is_one_commit_with_weights_tokenizer_card_and_code(pushed):
    assert pushed.repos == [(REPO_ID, {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert pushed.token == "hf_not_a_real_token"
    assert len(pushed.commits) == 1
    repo_id, files, kwargs = pushed.commits[0]
    assert repo_id == REPO_ID and kwargs["repo_type"] == "model"
    for name in ("README.md", "config.json", "generation_config.json", "model.safetensors", "configuration_trm.py",
                 "modeling_trm.py", "core.py", "tokenizer.json", "tokenizer_config.json"):
        assert name in files
    assert not any(name.endswith((".bin", ".jsonl")) or name.startswith("checkpoints") for name in files)
    config = json.loads((pushed.received / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_trm.TRMForCausalLM"


def test_model_card_has_metadata_metrics_usage_and_limitations(pushed):
    card = ModelCard.load(pushed.received / "README.md")
    assert "custom_code" in card.data.tags
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == set(METRICS.items())
    assert card.data.datasets == ["roneneldan/TinyStories"]
    text = card.text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert COMMAND in text and "1.2340" in text
    assert "## Limitations" in text


def test_uploaded_folder_loads_as_remote_code_and_generates_the_same(pushed, trained_dir, tmp_path):
    """A fresh `python -I` (no PYTHONPATH, no cwd on sys.path) run outside the repo: only the uploaded files."""
    prompt_ids = [0, 48, 79, 68, 70, 291]
    generate = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, pad_token_id=1)
    model = AutoModelForCausalLM.from_pretrained(trained_dir).eval()
    torch.manual_seed(0)
    expected = model.generate(torch.tensor([prompt_ids]), **generate)[0].tolist()

    script = WITHOUT_TRM_LM + f"""
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(pushed.received)!r}, trust_remote_code=True).eval()
torch.manual_seed(0)
out = model.generate(torch.tensor([{prompt_ids}]), **{generate!r})
print(json.dumps({{"module": type(model).__module__, "tokens": out[0].tolist()}}))
"""
    done = run_isolated(script, tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")  # the uploaded code, not an installed package
    assert result["tokens"] == expected and len(expected) > len(prompt_ids)


def test_the_model_cards_usage_runs_as_written_without_a_question(pushed, tmp_path):
    """The card's snippet, verbatim but for the repo id, in a fresh process without trm_lm and with no stdin:
    no interactive "[y/N]" remote-code question (AutoTokenizer reads config.json too), and it generates."""
    import re

    card = (pushed.received / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    assert "trust_remote_code=True" in code.split("AutoTokenizer.from_pretrained")[1].splitlines()[0]
    code = code.replace(f'"{REPO_ID}"', repr(str(pushed.received)))
    done = run_isolated(WITHOUT_TRM_LM + code, tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[y/N]" not in done.stdout + done.stderr and "custom code" not in done.stdout + done.stderr
    assert done.stdout.strip()


def test_push_refuses_bad_folders_before_touching_the_network(tmp_path, tiny_model_dir, capsys):
    pickle_only = tmp_path / "pickle_only"
    shutil.copytree(tiny_model_dir, pickle_only)
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    with mock.patch.object(HfApi, "create_repo") as create_repo:
        assert hub.main(["push", "--model", str(pickle_only), "--repo_id", REPO_ID]) == 2
        assert hub.main(["push", "--model", str(tiny_model_dir), "--repo_id", "not a repo id!"]) == 2
    create_repo.assert_not_called()
    err = capsys.readouterr().err.splitlines()
    assert "only pickle weights" in err[0] and "invalid --repo_id 'not a repo id!'" in err[1]


def test_push_offline_fails_with_one_line(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real client refuses at once
    assert hub.main(["push", "--model", str(tiny_model_dir), "--repo_id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "offline" in err and err.count("\n") == 1


def test_export_refuses_a_full_folder_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    from trm_lm.hub import main

    output = tmp_path / "exported"
    output.mkdir()
    (output / "old.txt").write_text("previous export")
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(output), "--samples", "0"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (output / "old.txt").exists()
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(output), "--samples", "0",
                 "--overwrite"]) == 0
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging or replaced folders left
    # a failing export leaves the previous folder as it was
    assert main(["export", "--model", str(tmp_path / "missing"), "--output", str(output), "--overwrite"]) == 2
    assert (output / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_appends_card_sections_with_their_headings_one_level_down(tiny_model_dir, tmp_path, capsys):
    from trm_lm.hub import main

    section = tmp_path / "depth.md"
    section.write_text("# Test-time depth\n\n| steps | bits/byte |\n|---|---|\n| 1 | 0.9 |\n\n## Detail\ntext\n")
    output = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(output), "--samples", "0",
                 "--card_section", str(section)]) == 0
    card = (output / "README.md").read_text()
    assert "\n## Test-time depth\n" in card and "\n### Detail\n" in card and "| 1 | 0.9 |" in card
    assert card.rstrip().endswith("text")  # appended after everything the card had
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(tmp_path / "other"), "--samples", "0",
                 "--card_section", str(tmp_path / "missing.md")]) == 2
    assert "card section file not found" in capsys.readouterr().err and not (tmp_path / "other").exists()
