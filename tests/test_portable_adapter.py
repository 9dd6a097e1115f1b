"""A run's prompt/ loads on any machine: its adapter names a backbone others can load, its model card says what it
is, how well it did and how to load it, and softprompt-push publishes it (or says in one line why it cannot)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForSequenceClassification

import softprompt
from helpers import data_dir, peft_scores, quick_overrides, run_cli
from softprompt import model_card, push, zoo
from softprompt import run_dir as records
from softprompt.backbone import load_backbone
from softprompt.cli import compose_config
from softprompt.config import ModelConfig, validate
from softprompt.pipeline import build_pipeline
from softprompt.prompt_bank import run_config
from test_evaluation_agreement import bank_scores, dev_file

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def hub_cache(root: Path, hub_id: str, folder: Path) -> Path:
    """A hub cache holding `folder` as `hub_id`'s main revision, as on a machine that once downloaded it: the hub id an
    adapter names then loads offline."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in folder.iterdir():
        if path.is_file():
            (snapshot / path.name).symlink_to(path)
    return root


def card_snippet(prompt: Path, text: str) -> str:
    """The card's Python snippet, loading the adapter from `prompt` and predicting for a row whose one field is `text`."""
    snippet = re.search(r"```python\n(.*?)```", (prompt / model_card.CARD).read_text(), re.DOTALL).group(1)
    assert snippet.count('"..."') == 1 and model_card.LOCAL_ADAPTER in snippet
    return snippet.replace(model_card.LOCAL_ADAPTER, str(prompt)).replace('"..."', json.dumps(text))


def adapter_config(run: Path) -> dict:
    return records.read_json(run / records.PROMPT_DIR / model_card.ADAPTER_CONFIG)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """A prompt tuned on a small GPT-2 that lives in a local folder, by softprompt.run (so .hydra/ holds the overrides)."""
    root = tmp_path_factory.mktemp("folder_run")
    backbone = load_backbone(validate(compose_config(["model=tiny-gpt2"])).model)
    folder = root / "gpt2"
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    overrides = quick_overrides(
        "tiny-gpt2", steps=2, **{"model.from_config": "null", "model.tokenizer": "null", "model.name_or_path": folder}
    )
    softprompt.run([*overrides, f"hydra.run.dir={root / 'run'}"])
    return root / "run"


def test_the_adapter_names_a_backbone_other_machines_can_load(tmp_path):
    for name, hub_id in [
        ("minilm-l6", MINILM_HUB_ID),
        ("mpnet-base", "sentence-transformers/all-mpnet-base-v2"),
        ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("gemma3-270m", "google/gemma-3-270m"),
    ]:
        assert model_card.source(validate(compose_config([f"model={name}"])).model) == ("zoo", hub_id)
    lester = validate(compose_config(["model=t5-base-lm-adapt"])).model
    assert model_card.source(lester) == ("hub", "google/t5-base-lm-adapt")
    assert model_card.source(validate(compose_config(["model=tiny-bert"])).model) == ("random", None)
    (tmp_path / "mine").mkdir()
    assert model_card.source(ModelConfig(name="mine", name_or_path=str(tmp_path / "mine" / ".." / "mine"))) == (
        "folder",
        str((tmp_path / "mine").resolve()),
    )
    # a hub id keeps its revision, which AutoPeftModel passes on when it loads the base model
    folder = tmp_path / "adapter"
    folder.mkdir()
    records.write_json(
        folder / model_card.ADAPTER_CONFIG, {"base_model_name_or_path": "/site-packages/x", "revision": None}
    )
    model_card.make_portable(folder, ModelConfig(name="t5", name_or_path="google/t5-base-lm-adapt", revision="abc123"))
    saved = records.read_json(folder / model_card.ADAPTER_CONFIG)
    assert (saved["base_model_name_or_path"], saved["revision"]) == ("google/t5-base-lm-adapt", "abc123")


def test_a_run_from_a_local_folder_has_a_portable_adapter_and_a_filled_card(folder_run):
    metrics = records.read_json(folder_run / records.METRICS)
    cfg = run_config(folder_run)
    assert adapter_config(folder_run)["base_model_name_or_path"] == str(Path(cfg.model.name_or_path).resolve())
    card = ModelCard.load(folder_run / records.PROMPT_DIR / model_card.CARD)
    # a local path is no hub id: the front matter names no base model, the text and adapter_config.json do
    assert card.data.base_model is None and card.data.library_name == "peft"
    assert {"softprompt", "prompt-tuning", "reviews"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", metrics["eval"]["accuracy"])
    best, initial = metrics["eval"]["accuracy"], metrics["initial_eval"]["accuracy"]
    assert f"| **accuracy** | {initial:.4f} | {best:.4f} |" in card.text
    assert f"best (step {metrics['best_step']} of {metrics['steps']})" in card.text
    assert "still running" not in card.text
    assert "softprompt-train model=tiny-gpt2 prompt.length=4 trainer.max_steps=2" in card.text
    assert "hydra.run.dir" not in card.text
    assert "AutoPeftModelForCausalLM.from_pretrained(adapter)" in card.text
    assert "peft=path/to/prompt" in card.text and "lm_eval --model hf" in card.text
    assert "softprompt-predict --prompts reviews=RUN_DIR" in card.text


def test_the_cards_snippet_scores_as_softprompt_does(folder_run, capsys):
    text = "The battery died after two days and the screen cracked."
    namespace: dict = {}
    exec(card_snippet(folder_run / records.PROMPT_DIR, text), namespace)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    [served] = softprompt.load_run(folder_run).predict([text])
    assert printed == served["prediction"]
    # the margin between the answers, which a misplaced logit offset or a missing prompt would change
    log_likelihood, rendered = namespace["log_likelihood"], namespace["text"]
    margin = log_likelihood(rendered, "positive") - log_likelihood(rendered, "negative")
    assert margin == pytest.approx(served["scores"]["positive"] - served["scores"]["negative"], abs=1e-4)


def test_push_uploads_the_prompt_with_a_card_naming_the_repository(folder_run, tmp_path, monkeypatch, capsys):
    calls = {}

    class Hub:
        def create_repo(self, repo_id, private, exist_ok):
            calls["repo"] = (repo_id, private, exist_ok)

        def create_branch(self, repo_id, branch, exist_ok):
            calls["branch"] = branch

        def upload_folder(self, repo_id, folder_path, revision, commit_message):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls["upload"] = (repo_id, revision)

            class Commit:
                commit_url = f"https://hub.example/{repo_id}/commit/1"

            return Commit()

    monkeypatch.setattr(push.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(push, "HfApi", Hub)
    prompt = folder_run / records.PROMPT_DIR
    before = (prompt / model_card.CARD).read_text()
    push.main([str(folder_run), "me/reviews-prompt", "--private", "--revision", "v1"])
    assert calls == {"repo": ("me/reviews-prompt", True, True), "branch": "v1", "upload": ("me/reviews-prompt", "v1")}
    uploaded = tmp_path / "uploaded"
    assert sorted(path.name for path in uploaded.iterdir()) == sorted(path.name for path in prompt.iterdir())
    for name in ("adapter_model.safetensors", model_card.ADAPTER_CONFIG):
        assert (uploaded / name).read_bytes() == (prompt / name).read_bytes()
    card = (uploaded / model_card.CARD).read_text()
    assert 'adapter = "me/reviews-prompt"' in card and "peft=me/reviews-prompt" in card
    assert (prompt / model_card.CARD).read_text() == before
    assert "pushed" in capsys.readouterr().out


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ")
    return line


def test_push_offline_is_one_line(folder_run):
    offline = one_error_line(run_cli("softprompt.push", str(folder_run), "me/x", env={"HF_HUB_OFFLINE": "1"}))
    assert "the hub cannot be reached" in offline and "HF_HUB_OFFLINE=1" in offline


@pytest.mark.slow
def test_push_without_a_network_is_one_line(folder_run):
    # nothing listens on the endpoint, as when the network is down
    unreachable = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    refused = one_error_line(run_cli("softprompt.push", str(folder_run), "me/x", env=unreachable))
    assert refused.startswith("error: the hub cannot be reached at http://127.0.0.1:9")


def test_push_refuses_what_is_not_a_completed_run(tmp_path, folder_run, capsys):
    untrained = tmp_path / "untrained"
    shutil.copytree(folder_run, untrained, ignore=shutil.ignore_patterns(records.PROMPT_DIR))
    running = tmp_path / "running"
    shutil.copytree(folder_run, running)
    records.mark(running, "running")
    for run, message in [
        (tmp_path / "missing", "is not a run directory: no such folder"),
        (untrained, "holds no trained prompt (no prompt/ folder)"),
        (running, "has not completed (status: running)"),
    ]:
        with pytest.raises(SystemExit) as stop:
            push.main([str(run), "me/x"])
        assert stop.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {run} {message}")


@pytest.mark.slow
def test_a_minilm_prompt_gives_its_reported_accuracy_through_plain_and_auto_peft(tmp_path):
    """minilm-l6 on SST-2: the adapter names the hub id, and loaded through PEFT alone (the base model by hand, or by
    that id from a hub cache) it scores the dev rows, one at a time as the task renders them, to the reported accuracy;
    softprompt-predict still serves the run offline, and the card's own snippet runs."""
    data_dir("sst2")
    run = tmp_path / "run"
    rows = 64
    overrides = [
        "model=minilm-l6",
        "task=sst2",
        "task.max_train_rows=512",
        f"task.max_eval_rows={rows}",
        "trainer.max_steps=30",
        "trainer.eval_every=15",
        "trainer.lr=0.03",
        "trainer.progress_bar=false",
    ]
    metrics = softprompt.run([*overrides, f"hydra.run.dir={run}"])
    reported = metrics["eval"]["accuracy"]
    assert metrics["best_step"] > 0, "the saved prompt and head must be trained ones"
    prompt = run / records.PROMPT_DIR
    assert adapter_config(run)["base_model_name_or_path"] == MINILM_HUB_ID
    assert ModelCard.load(prompt / model_card.CARD).data.base_model == MINILM_HUB_ID

    pipeline = build_pipeline(run_config(run), splits=("validation",))
    labels = torch.tensor([example.label for example in pipeline.task.examples["validation"]])
    local = zoo.model_path("minilm-l6")
    cache = hub_cache(tmp_path / "hub", MINILM_HUB_ID, local)
    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(local, num_labels=2), prompt)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(prompt, cache_dir=str(cache), num_labels=2)
    with torch.no_grad():
        scores = {
            name: torch.tensor(peft_scores(model.eval(), pipeline))
            for name, model in [("plain", plain), ("auto", auto)]
        }
    assert (scores["plain"] - scores["auto"]).abs().max() < 1e-5
    for name, scored in scores.items():
        assert (scored.argmax(-1) == labels).sum().item() / len(labels) == reported, name

    # softprompt's own loading reads the backbone from the run's config, offline as before
    _, served = bank_scores(run, dev_file(tmp_path, rows), tmp_path / "predictions.jsonl")
    assert served == pytest.approx(reported)

    # the card's snippet, run as a user elsewhere would (the hub id found in their cache)
    script = tmp_path / "snippet.py"
    sentence = pipeline.task.rows["validation"][0]["sentence"]
    script.write_text(card_snippet(prompt, sentence))
    result = run_cli(script.stem, cwd=tmp_path, env={"HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    expected = ["negative", "positive"][scores["plain"][0].argmax().item()]
    assert result.stdout.strip().splitlines()[-1] == expected
