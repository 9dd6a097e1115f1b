"""Task: the rows of each split, rendered to text by a template, with labels mapped to verbalizer words.

One code path serves every task: a config names where rows come from (a built-in generator,
local files in a known format, or a hub dataset), and the same template, verbalizer and
metric logic applies to all of them.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from softprompt import synthetic
from softprompt.config import TaskConfig
from softprompt.errors import ConfigError, DataError, UserError

FIELD = re.compile(r"\{(\w+)\}")
BUILTINS: dict[str, Callable[[str, int, int], list[dict]]] = {"reviews": synthetic.generate}
BUILTIN_SIZES = {"train": 2000, "validation": 500, "test": 500}
# the shared data folder beside the project checkout, used when SOFTPROMPT_DATA is not set
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# no limit on a CSV field's size (the csv module's default is 128 KB): a long document is a valid row
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
# GLUE header names that cannot be template fields, as the names the task configs use
GLUE_COLUMNS = {"Quality": "label", "#1 ID": "id1", "#2 ID": "id2", "#1 String": "sentence1", "#2 String": "sentence2"}


def data_root() -> Path:
    """Where the official task files live: $SOFTPROMPT_DATA, made absolute so it does not depend on later chdirs."""
    return Path(os.environ.get("SOFTPROMPT_DATA") or DEFAULT_DATA).expanduser().resolve()


# `${softprompt_data:superglue/CB}` in conf/task/*.yaml: a task folder under data_root(), absolute, so the
# defaults work from whatever directory the user runs in; registered on import like sweep's resolver
if not OmegaConf.has_resolver("softprompt_data"):
    OmegaConf.register_new_resolver("softprompt_data", lambda sub="": str(data_root() / sub))


@dataclass
class Example:
    """One row ready for a scorer: the rendered input, its candidate answers and the gold index.

    A generation task's row has one candidate, the target it is trained to write, and `references`,
    every text its answer is scored against."""

    text: str
    candidates: list[str]
    label: int
    group: Any = None
    references: list[str] | None = None


@dataclass
class Task:
    cfg: TaskConfig
    rows: dict[str, list[dict]] = field(default_factory=dict)
    # split -> how it was made (source file, carved from train, ...), recorded in the run directory
    provenance: dict[str, str] = field(default_factory=dict)
    # split -> rendered rows, built once by load_task
    examples: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def labels(self) -> list[Any]:
        return list(self.cfg.labels)

    @property
    def verbalizer(self) -> list[str]:
        return list(self.cfg.verbalizer) or [str(label) for label in self.cfg.labels]

    @property
    def generation(self) -> bool:
        """Whether answers are written (scored against references) rather than chosen among labels."""
        return self.cfg.target_field is not None

    @property
    def num_classes(self) -> int:
        return len(self.cfg.choices_fields) or len(self.cfg.labels)

    def render(self, row: dict, where: str = "") -> str:
        def value(match: re.Match) -> str:
            name = match.group(1)
            if name not in row:
                raise DataError(
                    f"the template needs field {name!r}; the row has: {', '.join(row)}", where or None, column=name
                )
            return str(row[name])

        return FIELD.sub(value, self.cfg.template)

    def empty_reason(self, split: str) -> str:
        """Why a split holds no rows: the setting that removed them, or the source itself."""
        if split == "train" and carves_dev(self.cfg):
            return (
                f"task.dev_from_train={self.cfg.dev_from_train} carved every train row into the dev split; "
                "give more train rows, a smaller fraction, or task.data_files.validation=FILE"
            )
        return "its source holds no rows"

    def label_index(self, row: dict, where: str = "") -> int:
        if self.cfg.label_field not in row:
            raise DataError(
                f"missing label field; the row has: {', '.join(row)}", where or None, column=self.cfg.label_field
            )
        value = row[self.cfg.label_field]
        for index, label in enumerate(self.cfg.labels):
            if value == label or str(value) == str(label):
                return index
        raise DataError(
            f"label {value!r} is not one of task.labels: {', '.join(map(str, self.cfg.labels))}",
            where or None,
            column=self.cfg.label_field,
        )

    def candidates(self, row: dict) -> list[str]:
        if self.cfg.choices_fields:
            return [str(row[name]) for name in self.cfg.choices_fields]
        return self.verbalizer

    def references(self, row: dict, where: str = "") -> list[str]:
        """The target texts of a row: a string, a list of strings, or a hub answers mapping ({"text": [...]})."""
        name = self.cfg.target_field
        if name not in row:
            raise DataError(f"missing target field; the row has: {', '.join(row)}", where or None, column=name)
        value = row[name]
        if isinstance(value, dict) and "text" in value:
            value = value["text"]
        texts = [str(text) for text in value] if isinstance(value, (list, tuple)) else [str(value)]
        if not texts or not all(text.strip() for text in texts):
            raise DataError("the target is empty: a generation task needs a text to write", where or None, column=name)
        return texts

    def build_generation_examples(self, split: str) -> list[Example]:
        """Train rows each teach one target (a row's first reference). Other splits score each input once,
        against the references of every row that has it (E2E: one row per reference of a table); with
        task.group_field, each group is one input (SQuAD's question ids: a question asked twice counts twice)."""
        origin = self.provenance.get(split, split)
        group = self.cfg.group_field
        examples: dict[Any, Example] = {}
        for number, row in enumerate(self.rows[split], start=1):
            where = f"{origin}, row {number}"
            text, references = self.render(row, where), self.references(row, where)
            key = number if split == "train" else (text, row.get(group)) if group else text
            if key in examples:
                examples[key].references.extend(references)
            else:
                examples[key] = Example(text, references[:1], 0, references=list(references))
        return list(examples.values())

    def build_examples(self, split: str) -> list[Example]:
        origin = self.provenance.get(split, split)
        if not self.rows[split]:
            raise UserError(f"the {split} split is empty ({origin}): {self.empty_reason(split)}")
        if self.generation:
            return self.build_generation_examples(split)
        if not self.cfg.labels:
            seen = sorted({str(row[self.cfg.label_field]) for row in self.rows[split] if self.cfg.label_field in row})
            raise ConfigError(
                "task.labels",
                [],
                "the label values of column "
                f"{self.cfg.label_field!r} in class order"
                + (
                    f" (the {split} split has: {', '.join(seen[:10])}{', ...' if len(seen) > 10 else ''})"
                    if seen
                    else ""
                ),
            )
        if not any(self.cfg.label_field in row for row in self.rows[split]):
            raise DataError(
                f"the {split} split has no labels (no row has column {self.cfg.label_field!r}; official test files are "
                "unlabelled): it cannot train or evaluate, only be predicted with softprompt-predict",
                origin,
            )
        return [
            Example(
                text=self.render(row, f"{origin}, row {number}"),
                candidates=self.candidates(row),
                label=self.label_index(row, f"{origin}, row {number}"),
                group=row.get(self.cfg.group_field) if self.cfg.group_field else None,
            )
            for number, row in enumerate(self.rows[split], start=1)
        ]


def _open_text(path: Path, encoding: str, **options):
    """A text file in the task's encoding (UTF-8's byte-order mark skipped)."""
    return open(path, encoding="utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding, **options)


def read_jsonl(path: Path, encoding: str = "utf-8") -> list[dict]:
    rows = []
    with _open_text(path, encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"not valid JSON ({error.msg})", path, row=number) from None
            if not isinstance(row, dict):
                raise DataError("each line must be a JSON object", path, row=number)
            rows.append(row)
    return rows


def read_delimited(path: Path, delimiter: str, encoding: str = "utf-8") -> list[dict]:
    """CSV/TSV with a header row; GLUE's TSVs have unbalanced quotes, so quoting is off for tabs."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_text(path, encoding, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        rows = []
        for number, row in enumerate(reader, start=2):
            if None in row or any(value is None for value in row.values()):
                raise DataError(
                    f"expected {len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)})", path, row=number
                )
            rows.append({key: _number_or_text(value) for key, value in row.items()})
    return rows


def read_superglue(path: Path, encoding: str = "utf-8") -> list[dict]:
    """SuperGLUE jsonl as flat rows: nested fields lifted (WSC's `target` spans), MultiRC one row per answer.

    A MultiRC row becomes passage, question, answer, label and question_idx (the group of its answers,
    unique within a split), plus passage_idx and the answer's own idx.
    """
    rows = []
    for row in read_jsonl(path, encoding):
        passage = row.get("passage")
        if isinstance(passage, dict) and "questions" in passage:
            for question in passage["questions"]:
                for answer in question["answers"]:
                    flat = {"passage": passage["text"], "question": question["question"], "answer": answer["text"]}
                    flat.update(idx=answer["idx"], question_idx=question["idx"], passage_idx=row["idx"])
                    if "label" in answer:
                        flat["label"] = answer["label"]
                    rows.append(flat)
            continue
        flat = {key: value for key, value in row.items() if not isinstance(value, dict)}
        for value in row.values():
            if isinstance(value, dict):
                flat.update(value)
        rows.append(flat)
    return rows


def read_squad(path: Path, encoding: str = "utf-8") -> list[dict]:
    """SQuAD v1.1 JSON as one row per question: id, title, context, question and answers (their texts),
    the fields the hub's squad dataset has, so one template serves both."""
    with _open_text(path, encoding) as handle:
        try:
            articles = json.load(handle)["data"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError("not a SQuAD JSON file (an object whose 'data' lists articles)", path) from None
    return [
        {
            "id": question["id"],
            "title": article["title"],
            "context": paragraph["context"],
            "question": question["question"],
            "answers": [answer["text"] for answer in question["answers"]],
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for question in paragraph["qas"]
    ]


def read_glue(path: Path, encoding: str = "utf-8") -> list[dict]:
    """GLUE tsv: MRPC's header renamed to template-friendly names; every value kept as the file has it.

    SST-2's sentences end in a space. It stays: a byte-level BPE tokenizer (SmolLM2, Gemma, GPT-2) reads
    "journey . \nQuestion" and "journey .\nQuestion" as different tokens, so a prompt tuned on altered text
    scores differently on the rows a user, `softprompt-predict` or lm-evaluation-harness reads from the file.
    """
    return [
        {GLUE_COLUMNS.get(key, key): value for key, value in row.items()}
        for row in read_delimited(path, "\t", encoding)
    ]


def _number_or_text(value: str) -> Any:
    stripped = value.strip()
    if re.fullmatch(r"-?\d+", stripped):
        return int(stripped)
    return value


READERS: dict[str, Callable[[Path, str], list[dict]]] = {
    "jsonl": read_jsonl,
    "csv": lambda path, encoding: read_delimited(path, ",", encoding),
    "tsv": lambda path, encoding: read_delimited(path, "\t", encoding),
    "superglue_jsonl": read_superglue,
    "glue_tsv": read_glue,
    "squad_json": read_squad,
}
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


def read_file(path: Path, fmt: str | None, encoding: str = "utf-8", option: str = "task.encoding") -> list[dict]:
    """Rows of a CSV, TSV or JSON lines file; `option` is the setting that names another encoding."""
    if not path.is_file():
        raise DataError("file not found", path)
    fmt = fmt or EXTENSIONS.get(path.suffix.lower())
    if fmt not in READERS:
        raise ConfigError("task.format", fmt, "one of: " + ", ".join(READERS))
    try:
        rows = READERS[fmt](path, encoding)
    except UnicodeDecodeError:
        data = path.read_bytes()
        try:
            data.decode(encoding)
        except UnicodeDecodeError as error:
            line, byte = data.count(b"\n", 0, error.start) + 1, data[error.start : error.start + 1]
        raise DataError(
            f"not valid {encoding} text (byte {byte!r}): set {option} to the file's encoding (latin-1, cp1252, utf-16, ...)",
            path,
            row=line,
        ) from None
    except csv.Error as error:
        raise DataError(f"not a readable {fmt.upper()} file ({error})", path) from None
    if not rows:
        raise DataError("the file holds no rows", path)
    return rows


def _split_file(cfg: TaskConfig, split: str) -> Path:
    """The file of a split: task.data_files[split], or the split's stem inside task.data_dir."""
    if cfg.data_files.get(split):
        return Path(cfg.data_files[split]).expanduser()
    stem = cfg.splits.get(split, split)
    folder = Path(cfg.data_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError("task.data_dir", cfg.data_dir, "an existing folder with the task's files")
    matches = sorted(path for path in folder.iterdir() if path.stem == stem and path.suffix.lower() in EXTENSIONS)
    if not matches:
        present = ", ".join(sorted(path.name for path in folder.iterdir())) or "nothing"
        raise DataError(
            f"no {split} file ({stem}.*) in this folder, which holds: {present} "
            f"(set task.data_files.{split}=FILE, or task.splits.{split}=STEM to use another file)",
            folder,
        )
    return matches[0]


def hub_split(cfg: TaskConfig, split: str) -> str:
    """The hub's name for one of our splits (task.hub_splits, else task.splits)."""
    return (cfg.hub_splits or cfg.splits).get(split, split)


def carves_dev(cfg: TaskConfig) -> bool:
    """Whether the dev split is carved from train: task.dev_from_train, unless the hub source has its own."""
    if cfg.dev_from_train is None:
        return False
    return cfg.source == "files" or "validation" not in (cfg.hub_splits or {})


def _read_hub(cfg: TaskConfig, split: str) -> list[dict]:
    """A hub split as rows with the local files' fields; class-index labels (a ClassLabel column) become task.labels."""
    import datasets

    name = "/".join(cfg.hub_dataset)
    try:
        data = datasets.load_dataset(*cfg.hub_dataset, split=hub_split(cfg, split))
    except (OSError, ConnectionError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"task.source=hub could not load {name} ({reason}); the task's own files load without the hub: "
            "task.source=files with task.data_dir=FOLDER"
        ) from None
    label = data.features.get(cfg.hub_columns.get(cfg.label_field, cfg.label_field))
    names = label.names if isinstance(label, datasets.ClassLabel) else None
    if names and cfg.labels and len(names) != len(cfg.labels):
        raise UserError(f"{name} has {len(names)} classes ({', '.join(names)}); task.labels has {len(cfg.labels)}")
    rows = []
    for hub_row in data:
        row = {key: value for key, value in hub_row.items() if not isinstance(value, dict)}
        for ours, theirs in cfg.hub_columns.items():
            value = hub_row
            for part in theirs.split("."):
                value = value[part]
            row[ours] = value
        if names is not None:
            index = row.pop(cfg.label_field)
            if index >= 0:  # -1: an unlabelled (test) row
                row[cfg.label_field] = (cfg.labels or names)[index]
        rows.append(row)
    return rows


def read_split(cfg: TaskConfig, split: str, seed: int = 0) -> tuple[list[dict], str]:
    """Rows of one split and where they came from."""
    if cfg.source == "hub":
        return _read_hub(cfg, split), f"hub:{'/'.join(cfg.hub_dataset)}:{hub_split(cfg, split)}"
    if cfg.builtin is not None:
        if cfg.builtin not in BUILTINS:
            raise ConfigError("task.builtin", cfg.builtin, "one of: " + ", ".join(BUILTINS))
        size = cfg.builtin_size.get(split, BUILTIN_SIZES[split])
        return BUILTINS[cfg.builtin](split, size, seed), f"builtin:{cfg.builtin}:{split}"
    if not any(cfg.data_files.values()) and not cfg.data_dir:
        raise ConfigError(
            "task.data_files",
            {},
            "files for train and validation, or task.data_dir, or task.builtin, or task.source=hub",
        )
    path = _split_file(cfg, split)
    return read_file(path, cfg.format, cfg.encoding), str(path)


def carve_dev(task: Task) -> None:
    """A dev split carved from train with a fixed seed, so reruns see the same rows; with task.carve_by, whole
    groups move (SQuAD's articles), so no group is in both splits."""
    import random

    cfg, rows = task.cfg, task.rows["train"]
    if cfg.carve_by is None:
        groups = [[index] for index in range(len(rows))]
    else:
        where = task.provenance["train"]
        if not all(cfg.carve_by in row for row in rows):
            raise DataError(
                f"task.carve_by names field {cfg.carve_by!r}, which a row lacks", where, column=cfg.carve_by
            )
        by_value: dict[Any, list[int]] = {}
        for index, row in enumerate(rows):
            by_value.setdefault(row[cfg.carve_by], []).append(index)
        groups = list(by_value.values())
    random.Random(cfg.dev_seed).shuffle(groups)
    count = max(1, round(len(groups) * cfg.dev_from_train))
    dev = sorted(index for group in groups[:count] for index in group)
    kept = sorted(index for group in groups[count:] for index in group)
    task.rows["validation"] = [rows[i] for i in dev]
    task.rows["train"] = [rows[i] for i in kept]
    source = task.provenance["train"]
    whole = f" in {count} whole {cfg.carve_by} groups" if cfg.carve_by else ""
    task.provenance["validation"] = f"{source} (dev: {len(dev)} rows{whole} carved with seed {cfg.dev_seed})"
    task.provenance["train"] = f"{source} (minus the {len(dev)} dev rows)"


def eval_subset(size: int, rows: int | None, seed: int) -> list[int]:
    """The fixed validation inputs evaluated during training: a seeded sample, in split order (all when rows is null)."""
    import random

    if rows is None or rows >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), rows))


def load_task(cfg: TaskConfig, splits: tuple[str, ...] = ("train", "validation")) -> Task:
    """Read the splits; a dev split carved from train uses a fixed seed so reruns see the same rows."""
    task = Task(cfg)
    for split in splits:
        if split == "validation" and carves_dev(cfg):
            continue
        task.rows[split], task.provenance[split] = read_split(cfg, split)
    if carves_dev(cfg) and "validation" in splits:
        carve_dev(task)
    limits = {"train": cfg.max_train_rows, "validation": cfg.max_eval_rows}
    for split, limit in limits.items():
        if limit is not None and split in task.rows:
            task.rows[split] = task.rows[split][:limit]
    for split in splits:
        # every row renders and has a known label, or we fail here, before any model loads
        task.examples[split] = task.build_examples(split)
    return task
