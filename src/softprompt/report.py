"""softprompt-report: many run directories -> one tidy table, mean +- std over seeds, and figures.

Every run directory found under the given folders is one row, failed and unfinished runs
included (they are marked, never dropped). Runs that differ only in their seed are grouped;
any other config key that varies across the runs becomes a column of its own, so runs that
differ in it are never averaged together. Figures follow Lester et al. (2021) Fig. 3: the main
metric against model parameters (log x), one line per prompt length and one per initialisation;
and Fig. 1 when the runs compare methods (model tuning, prompt tuning, prompt design, ...): one
line per method across model sizes (`by_model_size`), and the metric against the number of
trainable parameters (`by_trainable_params`). Every setting's dev curve over training, mean over seeds
(`dev_curves`), shows whether a schedule has flattened. For an Optuna search (softprompt.search), the metric of
every trial against each searched value (`trials`), the best trial marked and failed trials shown.

A report keeps every run's config (`configs.jsonl`) beside its rows, so an earlier report's `results.csv` can stand in
for run directories that are gone (a wiped scratch disk, another machine): its runs are rows of the new report with
their curves, compared on their whole configs like the runs found on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from softprompt import run_dir as records  # noqa: E402
from softprompt.config import INITS, flatten  # noqa: E402
from softprompt.errors import UserError, exit_on_user_error, folder_problem, read_record  # noqa: E402
from softprompt.identity import NON_RESULT_KEYS  # noqa: E402
from softprompt.registry import DEFAULT_METHOD, METHODS, MethodSpec  # noqa: E402
from softprompt.search import MULTIRUN, Search, find_search, trial_values  # noqa: E402

RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
CURVES_CSV = "curves.csv"
CONFIGS_JSONL = "configs.jsonl"
REPORT_MD = "report.md"
# what write_report returns besides the figures
TABLES = ("markdown", "results", "summary", "curves", "configs")
# the columns of the tidy table, in order; config keys that vary across runs are added after `init`
COLUMNS = [
    "run",
    "model",
    "parameters",
    "task",
    "metric",
    "method",
    "prompt_length",
    "init",
    "seed",
    "value",
    "initial",
    "best_step",
    "trainable_params",
    "trainable_fraction",
    "train_seconds",
    "status",
    "reason",
]
# whole numbers (kept as integers in the CSV even where a failed run leaves a gap)
INTEGER_COLUMNS = ["parameters", "prompt_length", "seed", "best_step", "trainable_params"]
# config keys the standard columns already show
SHOWN_KEYS = {
    "model.name",
    "model.num_params",
    "task.name",
    "task.main_metric",
    "method.name",
    "prompt.length",
    "prompt.init",
    "seed",
}
# a method this version does not know (a run directory from elsewhere): its name is its label, no length or
# init column, no knobs, and it is drawn as a method that trains
UNKNOWN_METHOD = MethodSpec(name="", label="", figure_rank=len(METHODS))


def _spec(method: str) -> MethodSpec:
    return METHODS.get(method, UNKNOWN_METHOD)


def _label(method: str) -> str:
    return _spec(method).label or str(method)


# what each figure draws one line per, and its label
AXES = {"prompt_length": "prompt length", "init": "initialisation"}
MARKERS = "osD^vPX*"
# sideways step between lines (a fraction of a category, or of e on a log axis): equal values stay visible
DODGE = 0.06
# where a point's value label may go, in points from it, in order of preference: right above, right below, left
VALUE_LABEL_OFFSETS = ((6, 4), (6, -11), (-6, 4), (-6, -11))
# columns of a user's reference points file (--reference)
REFERENCE_COLUMNS = ["task", "parameters", "value", "label"]


def is_report_table(path: Path) -> bool:
    """An earlier report's results.csv given in place of run directories."""
    return path.name == RESULTS_CSV and path.is_file()


def report_destination(paths: list[Path], out: Path | None, option: str) -> Path:
    """Where the report goes: `out`, or else into the one folder given (for an earlier report's results.csv, its
    folder). Several folders have no natural home, so they need `option` named."""
    if out is not None:
        return out
    if len(paths) > 1:
        raise UserError(f"{option} is required when more than one directory is given")
    return paths[0].parent if is_report_table(paths[0]) else paths[0]


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory at or under the given paths: a folder Hydra wrote a config into."""
    runs = set()
    for path in paths:
        if not path.is_dir():
            raise UserError(
                f"{path} is not a directory or a report's {RESULTS_CSV}: give sweep or run directories, or the "
                f"{RESULTS_CSV} of an earlier report"
            )
        runs.update(config.parent.parent for config in path.glob("**/.hydra/config.yaml"))
    return sorted(runs)


def read_report_table(path: Path) -> tuple[list[tuple[dict, dict]], pd.DataFrame]:
    """An earlier report's rows with their configs (configs.jsonl), and their dev curves (curves.csv: run, step,
    value), so runs whose directories are gone are rows again."""
    configs_path, curves_path = path.with_name(CONFIGS_JSONL), path.with_name(CURVES_CSV)
    absent = [beside.name for beside in (configs_path, curves_path) if not beside.is_file()]
    if absent:
        raise UserError(
            f"{path}: no {' or '.join(absent)} beside it; an earlier report is read with the {CONFIGS_JSONL} and "
            f"{CURVES_CSV} written with it (a report from before {CONFIGS_JSONL} is rewritten from its run directories)"
        )
    try:
        table = pd.read_csv(path, dtype={"run": str, "status": str, "reason": str})
        curves = pd.read_csv(curves_path, dtype={"run": str})
        configs = {line["run"]: line["config"] for line in map(json.loads, configs_path.read_text().splitlines())}
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as error:
        raise UserError(f"{path}: its report cannot be read ({type(error).__name__}: {error})") from None
    missing = [column for column in COLUMNS if column not in table.columns]
    missing += [f"{CURVES_CSV} {column}" for column in ("run", "step", "value") if column not in curves.columns]
    unlisted = [] if missing else [run for run in table["run"] if run not in configs]
    if missing or unlisted:
        problem = (
            f"missing column(s) {', '.join(missing)}" if missing else f"{unlisted[0]} has no line in {CONFIGS_JSONL}"
        )
        raise UserError(f"{path}: not a report softprompt-report wrote ({problem})")
    rows = [
        {column: None if _missing(value) else value for column, value in row.items()}
        for row in table[COLUMNS].to_dict("records")
    ]
    return [(row, configs[row["run"]]) for row in rows], curves[["run", "step", "value"]]


def _location(run: str, report: Path) -> Path:
    """Where a row of the report at `report` was run: its path is written relative to the report's folder when
    the run lay under it."""
    under = report.parent / run
    return (under if under.exists() else Path(run)).resolve()


def _relative(run: str, out: Path) -> str:
    return str(Path(run).relative_to(out)) if Path(run).is_relative_to(out) else run


def _read_record(run_path: Path) -> tuple[dict, dict, str | None]:
    """A run's flattened config and metrics record, and what in them is damaged with the way out (None if nothing)."""
    config_path, metrics_path = run_path / ".hydra" / "config.yaml", run_path / records.METRICS
    again = f"start the run again with hydra.run.dir={run_path}"
    config, metrics, damage = {}, {}, []
    try:
        config = flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=False), scalars=True)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as error:
        damage.append(
            f"{config_path} cannot be read ({type(error).__name__}: {' '.join(str(error).split())}): {again} "
            "(Hydra writes it anew)"
        )
    if metrics_path.is_file():
        try:
            metrics = read_record(metrics_path, f"move it out of the run directory and {again} to resume it")
        except UserError as error:
            damage.append(str(error))
    return config, metrics, "; ".join(damage) or None


def run_row(run_path: Path) -> tuple[dict, dict]:
    """One run's table row and its flattened config; a run whose records are damaged is a row that says so."""
    config, metrics, damage = _read_record(run_path)
    metric = metrics.get("main_metric", config.get("task.main_metric"))
    # runs made before methods existed have no method key: they are prompt tuning
    method = metrics.get("method", config.get("method.name", DEFAULT_METHOD))
    counts = metrics.get("trainable_params", {})
    row = {
        "run": str(run_path),
        "model": metrics.get("model", config.get("model.name")),
        "parameters": metrics.get("model_params", config.get("model.num_params")),
        "task": metrics.get("task", config.get("task.name")),
        "metric": metric,
        "method": method,
        "prompt_length": config.get("prompt.length") if _spec(method).has_length else None,
        "init": config.get("prompt.init") if _spec(method).has_init else None,
        "seed": metrics.get("seed", config.get("seed")),
        "value": metrics.get("eval", {}).get(metric),
        "initial": metrics.get("initial_eval", {}).get(metric),
        "best_step": metrics.get("best_step"),
        "trainable_params": counts.get("total"),
        "trainable_fraction": counts.get("fraction"),
        "train_seconds": metrics.get("train_seconds"),
        # a run with no metrics.json was stopped before training started
        "status": "damaged" if damage else metrics.get("status", "incomplete"),
        "reason": damage or metrics.get("reason"),
    }
    return row, config


# a dev evaluation as the training log writes it: "... - step 150: accuracy=0.6800, f1=0.6512"
LOGGED_EVALUATION = re.compile(r" - step (\d+): ((?:\w+=[-\d.]+(?:, )?)+)$")


def _logged_curve(run_path: Path) -> list[dict]:
    """The dev curve of a run trained, or resumed from a checkpoint saved, before metrics.json kept `eval_curve`,
    from its train.log; a resumed run logs the steps it evaluates again, with the same values, so each step's
    first line is kept."""
    points = {}
    lines = [line for path in sorted(run_path.glob("*.log")) for line in path.read_text(errors="replace").splitlines()]
    for line in lines:
        match = LOGGED_EVALUATION.search(line)
        if match and int(match[1]) not in points:
            pairs = (pair.split("=") for pair in match[2].split(", "))
            points[int(match[1])] = {"step": int(match[1]), **{key: float(value) for key, value in pairs}}
    return [points[step] for step in sorted(points)]


def curve_table(table: pd.DataFrame, kept: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per evaluation during training of every run in the tidy table: its setting, seed, step and value
    of the main metric (metrics.json's `eval_curve`, or train.log's for older runs; `kept`'s run, step and value
    for the runs of earlier reports)."""
    settings = [column for column in table.columns[: table.columns.get_loc("seed") + 1] if column != "metric"]
    kept = kept if kept is not None else pd.DataFrame(columns=["run", "step", "value"])
    rows, earlier = [], set(kept["run"])
    for run in table.itertuples(index=False):
        if run.run in earlier:
            continue
        _, metrics, _ = _read_record(Path(run.run))
        curve = metrics.get("eval_curve") or []
        if not curve or curve[0]["step"] != 0:  # every run evaluates at step 0: a curve without it lacks its start
            curve = _logged_curve(Path(run.run))
        rows += [{"run": run.run, "step": point["step"], "value": point.get(run.metric)} for point in curve]
    points = pd.DataFrame(rows, columns=["run", "step", "value"])
    points = (pd.concat([points, kept], ignore_index=True) if len(kept) else points).astype(
        {"step": "Int64", "value": "float64"}
    )
    shown = table[[*settings, "metric", "status"]]
    return shown.merge(points, on="run", how="inner")[[*settings, "metric", "step", "value", "status"]]


def tidy_table(loaded: list[tuple[dict, dict]]) -> pd.DataFrame:
    """One row per run (run_row's row and config); config keys that differ between runs of one model and task
    as extra columns."""
    configs = pd.DataFrame([config for _, config in loaded])
    for key in ("model.name", "task.name"):
        if key not in configs.columns:
            configs[key] = None
    if "method.name" not in configs.columns:
        configs["method.name"] = DEFAULT_METHOD
    configs["method.name"] = configs["method.name"].fillna(DEFAULT_METHOD)
    ignored = SHOWN_KEYS | set(NON_RESULT_KEYS)
    # keys set by the model, task or method choice itself (its hub id, its template, its learning rate) are
    # not extra settings
    by_choice = configs.astype(str).groupby(["model.name", "task.name", "method.name"])
    varying = [key for key in configs.columns if key not in ignored and by_choice[key].nunique(dropna=False).max() > 1]
    table = pd.DataFrame([row for row, _ in loaded], columns=COLUMNS)
    # a run that failed before its model loaded has no measured size: take its model's from the others
    table["parameters"] = table.groupby("model", dropna=False)["parameters"].transform(
        lambda sizes: sizes.fillna(sizes.max())
    )
    table = table.astype({column: "Int64" for column in INTEGER_COLUMNS})
    for position, key in enumerate(varying, start=COLUMNS.index("init") + 1):
        values = configs[key].astype(str)
        if key.startswith("method."):
            # a method's knob is empty on the rows of methods that do not read it
            values = values.where(
                [key.removeprefix("method.") in _spec(method).knobs for method in table["method"]], None
            )
        table.insert(position, key, values)
    return table.sort_values(
        ["task", "parameters", "model", "method", "prompt_length", "init", *varying, "seed"],
        kind="stable",
        ignore_index=True,
    )


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """The extra config-key columns tidy_table added: after `init`, before `seed` (or the summary's `seeds`)."""
    end = "seed" if "seed" in frame.columns else "seeds"
    return list(frame.columns[frame.columns.get_loc("init") + 1 : frame.columns.get_loc(end)])


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of completed runs, for every setting; failures counted."""
    keys = ["model", "parameters", "task", "metric", "method", "prompt_length", "init", *varying_keys(table)]
    completed = table["status"] == "completed"
    grouped = table.assign(
        done=completed, ok=table["value"].where(completed), ok_initial=table["initial"].where(completed)
    ).groupby(keys, sort=True, dropna=False)
    return grouped.agg(
        seeds=("done", "sum"),
        not_completed=("done", lambda done: int((~done).sum())),
        mean=("ok", "mean"),
        std=("ok", "std"),
        initial=("ok_initial", "mean"),
        trainable_params=("trainable_params", "max"),
        trainable_fraction=("trainable_fraction", "max"),
    ).reset_index()


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _millions(count: float) -> str:
    return f"{count / 1e6:,.1f}M"


def _setting(value) -> str:
    """A setting's value as a label shows it: a config key that runs made before it existed lack is unset."""
    return "unset" if _missing(value) or str(value) in ("nan", "None", "<NA>") else str(value)


def _splitting(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """The keys that tell lines apart: the method, and any other key that varies within one method's runs (a
    runs' missing value included: runs older than a key are a setting of their own); a key a method does not
    have, as model tuning's prompt length, does not split it from the others."""
    per_method = rows.groupby("method", dropna=False)
    return [
        key
        for key in keys
        if (rows[key].nunique() if key == "method" else per_method[key].nunique(dropna=False).max()) > 1
    ]


def _line_label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{AXES.get(key, key)} {_setting(row[key])}" for key in keys)


def draw_figure(summary: pd.DataFrame, axis: str, reference: pd.DataFrame | None, stem: Path) -> list[Path]:
    """Main metric per setting with std-over-seeds error bars, one panel per task; PNG and SVG."""
    data = summary[summary["seeds"] > 0]
    tasks = list(dict.fromkeys(zip(data["task"], data["metric"])))
    figure, panels = plt.subplots(1, len(tasks), figsize=(9.6 * len(tasks), 4.6), squeeze=False)
    labels = []
    for panel, (task, metric) in zip(panels[0], tasks):
        rows = data[(data["task"] == task) & (data["metric"] == metric)]
        by_size = rows["parameters"].nunique() > 1
        # across model sizes when there are several (Lester Fig. 3); otherwise along the axis itself
        x_key, line_keys = ("parameters", [axis]) if by_size else (axis, ["model"])
        others = ["method", "init" if axis == "prompt_length" else "prompt_length", *varying_keys(summary)]
        line_keys += _splitting(rows, others)
        categorical = x_key == "init"
        positions = {value: index for index, value in enumerate(sorted(rows[x_key].unique(), key=_init_order))}
        annotate, values = len(rows) <= 16, []
        labels.append((panel, values))
        # stable: lines apart only in other keys keep groupby's order
        lines = sorted(
            rows.groupby(line_keys, sort=True, dropna=False),
            key=lambda group: [_init_order(key)[0] for key in group[0]],
        )
        for number, (_, line) in enumerate(lines):
            line = line.sort_values(x_key, key=lambda column: column.map(positions) if categorical else column)
            xs = [positions[value] for value in line[x_key]] if categorical else line[x_key].astype(float)
            xs = _dodged(xs, number, len(lines), log=not categorical)
            panel.errorbar(
                xs,
                line["mean"],
                yerr=line["std"].fillna(0),
                marker=MARKERS[number % len(MARKERS)],
                capsize=4,
                label=_line_label(line.iloc[0], line_keys),
            )
            if annotate:
                values += zip(xs, line["mean"], line["std"].fillna(0))
        if reference is not None and by_size:
            draw_reference(panel, reference, task, "--")
        if categorical:
            panel.set_xticks(list(positions.values()), list(positions))
        else:
            # log x, ticked at the measured points: model sizes (with names) or prompt lengths
            panel.set_xscale("log")
            panel.minorticks_off()
            if by_size:
                _size_ticks(panel, rows)
            else:
                lengths = sorted(rows[x_key].unique())
                panel.set_xticks([float(length) for length in lengths], [str(length) for length in lengths])
        panel.set_xlabel({"parameters": "model parameters", **AXES}[x_key])
        panel.set_ylabel(f"{metric} (mean ± std over seeds)")
        panel.set_title(
            f"{task}: {metric} by {AXES[axis]}"
            + ("" if by_size else f" ({', '.join(map(str, rows['model'].unique()))})")
        )
        panel.grid(True, which="both", alpha=0.3)
        _legend_beside(panel)
    # labels go where they cover no other, which is known only once the panels are laid out
    figure.tight_layout()
    for panel, values in labels:
        _value_labels(panel, values)
    return save_figure(figure, stem)


def draw_curves(curves: pd.DataFrame, stem: Path) -> list[Path]:
    """Each setting's dev curve, mean over the seeds that completed, a band of one std: one panel per task and
    model, smallest model first, one line per setting. It shows where a schedule has flattened."""
    data = curves[(curves["status"] == "completed") & curves["value"].notna()]
    # prompt design's single evaluation is not a curve
    data = data[data.groupby("run")["step"].transform("nunique") > 1]
    panels_of = list(dict.fromkeys(zip(data["task"], data["metric"], data["parameters"], data["model"])))
    panels_of.sort(key=lambda panel: (str(panel[0]), panel[2] if not _missing(panel[2]) else 0))
    setting_keys = [key for key in ["method", "prompt_length", "init", *varying_keys(curves)] if key in curves]
    # room below the panels for the legends, a line per setting
    height = 4.6 + 0.2 * data.groupby(setting_keys, dropna=False).ngroups
    figure, panels = plt.subplots(
        1, len(panels_of), figsize=(6.4 * len(panels_of), height), squeeze=False, sharey=data["metric"].nunique() == 1
    )
    for panel, (task, metric, parameters, model) in zip(panels[0], panels_of):
        rows = data[(data["task"] == task) & (data["model"] == model)]
        keys = _splitting(rows, setting_keys)
        groups = rows.groupby(keys, sort=True, dropna=False) if keys else [((), rows)]
        for number, (_, line) in enumerate(sorted(groups, key=lambda group: [_init_order(k)[0] for k in group[0]])):
            by_step = line.groupby("step")["value"]
            mean, std, seeds = by_step.mean(), by_step.std().fillna(0), line["seed"].nunique()
            label = _method_label(line.iloc[0], [key for key in keys if key != "method"])
            panel.plot(
                mean.index,
                mean,
                marker=MARKERS[number % len(MARKERS)],
                markersize=3,
                label=f"{label}, {seeds} seed{'' if seeds == 1 else 's'}",
            )
            panel.fill_between(mean.index, mean - std, mean + std, alpha=0.15)
        panel.set_title(f"{task}: {model}" + ("" if _missing(parameters) else f" ({_millions(parameters)})"))
        panel.set_xlabel("training step")
        panel.set_ylabel(f"dev {metric} (mean ± std over seeds)")
        panel.grid(True, alpha=0.3)
        panel.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return save_figure(figure, stem)


def _value_labels(panel: plt.Axes, points: list[tuple[float, float, float]]) -> None:
    """Each point's value beside it, on the first side inside the panel where it covers no other label, marker or
    error bar: lines dodged apart at one model size often have near-equal values. Labels stay out of the layout, so
    saving does not move them."""
    renderer = panel.figure.canvas.get_renderer()
    reach = renderer.points_to_pixels(4)
    taken = []
    for x, y, std in points:
        (left, bottom), (right, top) = panel.transData.transform([(x, y - std), (x, y + std)])
        taken.append(Bbox.from_extents(left - reach, bottom - reach, right + reach, top + reach))
    for x, y, _ in points:
        label = panel.annotate(
            f"{y:.3f}",
            (x, y),
            xytext=VALUE_LABEL_OFFSETS[0],
            textcoords="offset points",
            fontsize=8,
            annotation_clip=False,
        )
        label.set_in_layout(False)
        # the first side again last: where every side is taken, the preferred one
        for dx, dy in (*VALUE_LABEL_OFFSETS, VALUE_LABEL_OFFSETS[0]):
            label.xyann = (dx, dy)
            label.set_horizontalalignment("left" if dx > 0 else "right")
            box = label.get_window_extent(renderer)
            inside = panel.bbox.contains(box.x0, box.y0) and panel.bbox.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                break
        taken.append(box)


def _size_ticks(panel: plt.Axes, rows: pd.DataFrame) -> None:
    """Model sizes ticked with their names on a log axis; a size under 1.5 times the one before it has its label
    two lines lower, so close sizes (109.5M and 134.5M) stay readable."""
    ticks = rows.drop_duplicates("parameters").sort_values("parameters")
    labels, lowered, previous = [], False, None
    for size, model in zip(ticks["parameters"], ticks["model"]):
        lowered = previous is not None and size < 1.5 * previous and not lowered
        labels.append(("\n\n" if lowered else "") + f"{_millions(size)}\n{model}")
        previous = size
    panel.set_xticks(ticks["parameters"].astype(float).tolist(), labels)


def _init_order(value) -> tuple[int, str]:
    """Initialisations in the order of Lester et al.'s Fig. 3(b), from least to most informed (config.INITS);
    any other value after them, by its name."""
    return (INITS.index(value), "") if not _missing(value) and value in INITS else (len(INITS), str(value))


def _dodged(xs, number: int, count: int, log: bool) -> list[float]:
    """Line `number` of `count` moved a little sideways, so lines with equal values at a point stay visible."""
    step = (number - (count - 1) / 2) * min(DODGE, 0.3 / max(count, 1))
    return [x * math.exp(step) if log else x + step for x in map(float, xs)]


def _legend_beside(panel: plt.Axes) -> None:
    """The legend right of the panel, where it cannot cover points or the y-axis."""
    panel.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _method_label(row: pd.Series, keys: list[str]) -> str:
    label = _label(row["method"])
    details = []
    for key in keys:
        value = _setting(row[key])
        if value == "unset" and (key in AXES or key.startswith("method.")):
            continue  # a length, initialisation or knob this method does not have
        if key == "method.num_demonstrations":
            details.append(f"k={value}")
        elif key == "prompt_length":
            details.append(f"length {value}")
        else:
            details.append(f"{AXES.get(key, key)} {value}")
    return label + (f" ({', '.join(details)})" if details else "")


def method_lines(rows: pd.DataFrame, summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One line per method setting: the method, and any key that varies within that method's runs."""
    lines = []
    for _method, group in rows.groupby("method", sort=False):
        keys = _splitting(group, ["prompt_length", "init", *varying_keys(summary)])
        for _, line in group.groupby(keys, sort=True, dropna=False) if keys else [(None, group)]:
            lines.append((_method_label(line.iloc[0], keys), line))
    return sorted(lines, key=lambda item: (_spec(item[1]["method"].iloc[0]).figure_rank, item[0]))


def draw_methods(summary: pd.DataFrame, x_key: str, reference: pd.DataFrame | None, stem: Path) -> list[Path]:
    """Lester et al. (2021) Fig. 1: the main metric against model parameters (or trainable parameters), log x,
    one line per method, error bars = std over seeds; one panel per task. Prompt design trains nothing, so it
    has no point on the trainable-parameters axis."""
    data = summary[summary["seeds"] > 0]
    if x_key == "trainable_params":
        data = data[data["trainable_params"].fillna(0) > 0]
    tasks = list(dict.fromkeys(zip(data["task"], data["metric"])))
    figure, panels = plt.subplots(1, max(len(tasks), 1), figsize=(10.0 * max(len(tasks), 1), 5.0), squeeze=False)
    for panel, (task, metric) in zip(panels[0], tasks):
        rows = data[(data["task"] == task) & (data["metric"] == metric)]
        lines = method_lines(rows, summary)
        for number, (label, line) in enumerate(lines):
            # a method's points are joined in order of model size, on either axis
            line = line.sort_values(["parameters", x_key])
            xs = _dodged(line[x_key], number, len(lines), log=True)
            # a method that trains nothing is a reference line
            style = {} if _spec(line["method"].iloc[0]).trains else {"linestyle": "--"}
            panel.errorbar(
                xs,
                line["mean"],
                yerr=line["std"].fillna(0),
                marker=MARKERS[number % len(MARKERS)],
                capsize=4,
                label=label,
                **style,
            )
            if x_key == "trainable_params":
                for x, y, model in zip(xs, line["mean"], line["model"]):
                    panel.annotate(model, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color="grey")
        if reference is not None and x_key == "parameters":
            draw_reference(panel, reference, task, ":")
        panel.set_xscale("log")
        if x_key == "parameters":
            panel.minorticks_off()
            _size_ticks(panel, rows)
            panel.set_xlabel("model parameters")
            panel.set_title(f"{task}: {metric} by model size and method")
        else:
            panel.set_xlabel("trainable parameters")
            untrained = [_label(method) for method in dict.fromkeys(summary["method"]) if not _spec(method).trains]
            panel.set_title(
                f"{task}: {metric} by trainable parameters"
                + (f" ({', '.join(untrained)} trains none)" if untrained else "")
            )
        panel.set_ylabel(f"{metric} (mean ± std over seeds)")
        panel.grid(True, which="both", alpha=0.3)
        _legend_beside(panel)
    return save_figure(figure, stem)


def draw_reference(panel: plt.Axes, reference: pd.DataFrame, task: str, linestyle: str) -> None:
    """The user's reference points of this task (or of every task, `*`) as grey open squares, one line per label."""
    points = reference[reference["task"].isin([task, "*"])]
    for label, group in points.groupby("label", sort=False):
        panel.plot(
            group["parameters"],
            group["value"],
            linestyle=linestyle,
            marker="s",
            fillstyle="none",
            color="grey",
            label=label,
        )


def trial_table(folder: Path, search: Search) -> pd.DataFrame:
    """One row per trial of the search in `folder`: its searched values, then its task, metric, value and status."""
    keys = list(search.keys)
    rows = []
    for run in find_runs([folder]):
        values = trial_values(run, keys)
        if values is not None:
            row, _ = run_row(run)
            rows.append(
                {**values, **{column: row[column] for column in ("task", "model", "metric", "value", "status")}}
            )
    return pd.DataFrame(rows, columns=[*keys, "task", "model", "metric", "value", "status"])


def find_searches(paths: list[Path]) -> dict[Path, tuple[Search, pd.DataFrame]]:
    """Every Optuna search at or under the given paths (a sweep directory with the sweeper's multirun.yaml), with
    its trials."""
    folders = sorted({found.parent for path in paths for found in path.glob(f"**/{MULTIRUN}")})
    searches = {folder: find_search(folder) for folder in folders}
    return {folder: (search, trial_table(folder, search)) for folder, search in searches.items() if search is not None}


def describe_search(folder: Path, search: Search, trials: pd.DataFrame) -> str:
    """One line for the report: the search's trials and Optuna's best."""
    counts = trials["status"].value_counts()
    found = f"`{folder}`: {len(trials)} trials (" + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")"
    if search.best_value is None:
        return found + "; no trial completed."
    best = ", ".join(f"{key}={value}" for key, value in search.best_params.items())
    metric = ", ".join(map(str, trials["metric"].dropna().unique()))
    return found + f"; Optuna's best: {best} ({metric} {search.best_value:.4f})."


def draw_trials(trials: pd.DataFrame, search: Search, stem: Path) -> list[Path]:
    """The main metric of every trial against each searched value, one panel per key (log x where the search drew
    on a log scale); Optuna's best trial starred, failed trials as crosses along the bottom."""
    done = trials[trials["status"] == "completed"]
    matches = [done[key] == value for key, value in search.best_params.items() if key in done]
    best = done[pd.concat(matches, axis=1).all(axis=1)] if matches else done.iloc[:0]
    failed = trials[trials["status"] != "completed"]
    figure, panels = plt.subplots(1, len(search.keys), figsize=(5.2 * len(search.keys), 4.4), squeeze=False)
    for panel, (key, space) in zip(panels[0], search.keys.items()):
        numeric = pd.api.types.is_numeric_dtype(trials[key]) and not pd.api.types.is_bool_dtype(trials[key])
        # values that are not numbers (a group choice: model=choice(...)) are categories, in the search's order
        categories = [str(value) for value in space.choices or sorted(trials[key].unique(), key=str)]
        positions = {value: index for index, value in enumerate(dict.fromkeys(categories))}
        xs = trials[key].astype(float) if numeric else trials[key].astype(str).map(positions)
        if len(done):
            panel.plot(xs[done.index], done["value"], "o", alpha=0.8, label=f"completed ({len(done)})")
        if len(best):
            panel.plot(xs[best.index], best["value"], "*", markersize=16, color="C3", label="best (Optuna)")
            for x_best, y_best in zip(xs[best.index], best["value"]):
                panel.annotate(f"{y_best:.3f}", (x_best, y_best), textcoords="offset points", xytext=(8, 4), fontsize=8)
        if len(failed):
            # a failed trial has no metric: a cross at the bottom of the panel, where its value was drawn
            panel.plot(
                xs[failed.index],
                [0.02] * len(failed),
                "x",
                color="grey",
                transform=panel.get_xaxis_transform(),
                label=f"failed ({len(failed)})",
            )
        if not numeric:
            panel.set_xticks(list(positions.values()), list(positions))
        elif space.log:
            # ticks at 1, 2 and 5 of each decade, written as numbers: a search of a narrow range still has some
            panel.set_xscale("log")
            panel.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            panel.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            panel.xaxis.set_minor_formatter(ticker.NullFormatter())
        elif space.choices:
            panel.set_xticks([float(value) for value in space.choices])
        if numeric and space.bounds:
            # the whole searched range, so where the trials landed in it shows
            low, high = space.bounds
            if space.log:
                pad = (high / low) ** 0.03
                panel.set_xlim(low / pad, high * pad)
            else:
                pad = 0.03 * (high - low)
                panel.set_xlim(low - pad, high + pad)
        panel.set_xlabel(key + (" (log scale)" if numeric and space.log else ""))
        panel.set_ylabel(", ".join(map(str, trials["metric"].dropna().unique())))
        # room below the trials for the failed ones' crosses, and above for the best one's value
        panel.margins(y=0.15)
        panel.grid(True, alpha=0.3)
        _legend_beside(panel)
    figure.suptitle(
        f"{', '.join(map(str, trials['task'].dropna().unique()))}: {len(trials)} trials of an Optuna search "
        f"({', '.join(map(str, trials['model'].dropna().unique()))})"
    )
    return save_figure(figure, stem)


def save_figure(figure: plt.Figure, stem: Path) -> list[Path]:
    """PNG for reading, SVG for papers: its text stays text, so numbers and labels can be searched and edited; with
    no date and fixed ids, a figure redrawn from the same rows is the same file, so a committed one changes only
    with its data."""
    figure.tight_layout()
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    figure.savefig(png, dpi=150)
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "softprompt"}):
        figure.savefig(svg, dpi=150, metadata={"Date": None})
    plt.close(figure)
    return [png, svg]


def read_reference(path: Path) -> pd.DataFrame:
    """Reference points to overlay: CSV with columns task (or * for every task), parameters, value, label."""
    try:
        reference = pd.read_csv(path)
    except (OSError, pd.errors.ParserError) as error:
        raise UserError(f"--reference {path}: cannot be read as CSV ({error})") from None
    missing = [column for column in REFERENCE_COLUMNS if column not in reference.columns]
    if missing:
        raise UserError(
            f"--reference {path}: missing column(s) {', '.join(missing)}; needs {', '.join(REFERENCE_COLUMNS)}"
        )
    return reference


def _markdown(frame: pd.DataFrame) -> str:
    """A Markdown table with numbers written for reading: metrics to 4 places, counts with separators."""

    def cell(column: str, value) -> str:
        if _missing(value):
            return ""
        if column == "parameters":
            return _millions(value)
        if column in ("value", "initial", "mean", "std"):
            return f"{value:.4f}"
        if column == "train_seconds":
            return f"{value:.1f}"
        if column == "trainable_fraction":
            return f"{value:.4%}"
        return f"{value:,}" if isinstance(value, int) or column in INTEGER_COLUMNS else str(value)

    shown = pd.DataFrame({column: [cell(column, value) for value in frame[column]] for column in frame.columns})
    return shown.to_markdown(index=False, disable_numparse=True)


def ensemble_lines(paths: list[Path]) -> list[str]:
    """The ensembles `softprompt-predict --ensemble` left in the given folders, beside their members' mean and best;
    a damaged ensemble.json is listed with the way out."""
    rows, damaged = [], []
    for path in paths:
        if (path / records.ENSEMBLE).is_file():
            try:
                found = read_record(path / records.ENSEMBLE, "run softprompt-predict --ensemble again to rewrite it")
            except UserError as error:
                damaged.append(f"- {error}")
                continue
            metric = found["main_metric"]
            rows.append(
                {
                    "folder": str(path),
                    "task": found["task"],
                    "model": found["model"],
                    "prompts": len(found["per_prompt"]),
                    "metric": metric,
                    "mean": found["mean"],
                    "best": found["best"],
                    "vote": found["vote"][metric],
                    "mean log-prob": found["mean_log_prob"][metric],
                }
            )
    if not rows and not damaged:
        return []
    table = [pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"), ""] if rows else []
    return ["## Ensembles", "", *table, *damaged, *([""] if damaged else [])]


def write_report(paths: list[Path], out: Path, reference: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, figures and report.md into `out` from the run directories under `paths`
    and the rows of earlier reports' results.csv among them (a run found on disk takes the place of its row);
    returns what was written."""
    reports = [path for path in paths if is_report_table(path)]
    folders = [path for path in paths if path not in reports]
    runs = find_runs(folders)
    loaded = [run_row(run) for run in runs]
    found = {run.resolve() for run in runs}
    kept = []
    for report in reports:
        rows, curves = read_report_table(report)
        fresh = []
        for row, config in rows:
            where = _location(row["run"], report)
            if where not in found:
                found.add(where)
                fresh.append((row, config))
        loaded += fresh
        kept.append(curves[curves["run"].isin([row["run"] for row, _ in fresh])])
    if not loaded:
        raise UserError(f"no run directories (folders with .hydra/config.yaml) under {', '.join(map(str, paths))}")
    problem = folder_problem(out)
    if problem:
        raise UserError(f"--out {out}: the report needs a folder there ({problem}); give another --out")
    out.mkdir(parents=True, exist_ok=True)
    table = tidy_table(loaded)
    curves = curve_table(table, pd.concat(kept, ignore_index=True) if kept else None)
    configs = {row["run"]: config for row, config in loaded}
    for frame in (table, curves):
        frame["run"] = [_relative(run, out) for run in frame["run"]]
    summary = summarise(table)
    written = {
        "results": out / RESULTS_CSV,
        "summary": out / SUMMARY_CSV,
        "curves": out / CURVES_CSV,
        "configs": out / CONFIGS_JSONL,
        "markdown": out / REPORT_MD,
    }
    table.to_csv(written["results"], index=False)
    summary.to_csv(written["summary"], index=False)
    curves.to_csv(written["curves"], index=False)
    records.write_jsonl(
        written["configs"], [{"run": _relative(run, out), "config": config} for run, config in configs.items()]
    )

    done = summary[summary["seeds"] > 0]
    # a prompt-length or initialisation figure when one method's runs vary it
    varying_axes = [axis for axis in AXES if done.groupby("method")[axis].nunique().max() > 1] if len(done) else []
    methods = done["method"].nunique() > 1
    figures = []
    if len(done):
        for axis in varying_axes or ([] if methods else ["prompt_length"]):
            figures += draw_figure(summary, axis, reference, out / f"by_{axis}")
        if methods:
            figures += draw_methods(summary, "parameters", reference, out / "by_model_size")
            if (done["trainable_params"].fillna(0) > 0).any():
                figures += draw_methods(summary, "trainable_params", None, out / "by_trainable_params")
    # a curve is two evaluations or more
    if (curves[curves["status"] == "completed"].groupby("run")["step"].nunique() > 1).any():
        figures += draw_curves(curves, out / "dev_curves")
    searches = find_searches(folders)
    search_lines = ["## Optuna search", ""] if searches else []
    for folder, (search, trials) in searches.items():
        if len(trials):
            stem = "trials" if len(searches) == 1 else f"trials_{folder.name}"
            figures += draw_trials(trials, search, out / stem)
        search_lines += [describe_search(folder, search, trials), ""]

    counts = table["status"].value_counts()
    spread = [
        "" if _missing(mean) else f"{mean:.4f}" + ("" if _missing(std) else f" ± {std:.4f}")
        for mean, std in zip(summary["mean"], summary["std"])
    ]
    shown = summary.drop(columns=["mean", "std", "initial"]).assign(
        **{"mean ± std": spread, "initial": summary["initial"]}
    )
    lines = [
        "# softprompt report",
        "",
        f"{len(table)} runs from {', '.join(map(str, paths))}: "
        + ", ".join(f"{count} {status}" for status, count in counts.items())
        + ". The metric is each run's best evaluation on the validation split; `initial` is step 0.",
        "",
        "## Mean ± std over seeds",
        "",
        _markdown(shown),
        "",
    ]
    if figures:
        lines += (
            ["## Figures", ""] + [f"![{path.stem}]({path.name})" for path in figures if path.suffix == ".png"] + [""]
        )
    lines += search_lines
    failed = table[table["status"] != "completed"]
    if len(failed):
        lines += ["## Runs that did not complete", ""]
        lines += [
            f"- `{row.run}`: **{row.status}**" + (f": {row.reason}" if isinstance(row.reason, str) else "")
            for row in failed.itertuples()
        ]
        lines.append("")
    lines += ensemble_lines(folders)
    lines += ["## Runs", "", _markdown(table.drop(columns=["reason"])), ""]
    written["markdown"].write_text("\n".join(lines), encoding="utf-8")
    written.update({path.name: path for path in figures})
    return written


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="softprompt-report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "dirs",
        nargs="+",
        type=Path,
        help=f"sweep or run directories (searched recursively), or earlier reports' {RESULTS_CSV} (their runs are "
        "rows again, where their directories are not given)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"where the report goes (default: the directory, or the folder of the {RESULTS_CSV}, when only one is given)",
    )
    parser.add_argument(
        "--reference", type=Path, help="CSV of reference points to overlay: " + ", ".join(REFERENCE_COLUMNS)
    )
    args = parser.parse_args(argv)
    reference = read_reference(args.reference) if args.reference else None
    written = write_report(args.dirs, report_destination(args.dirs, args.out, "--out"), reference)
    for name in TABLES:
        print(f"{name}: {written[name]}")
    print("figures: " + ", ".join(str(path) for key, path in written.items() if key not in TABLES))


if __name__ == "__main__":
    main()
