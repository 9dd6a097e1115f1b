"""Run identity and module layering: config keys stay what they were (existing sweeps resume by them), one
definition serves sweeps, checkpoints and the report, and no import cycle joins the package's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT
from softprompt import checkpoint, identity, sweep
from softprompt.cli import compose_config
from softprompt.config import validate

PACKAGE = ROOT / "src" / "softprompt"

# keys and job folders as the version before the identity module computed them: a change here would make
# every existing sweep train its finished jobs again
PINNED = {
    (): ("1a22829dd7", "minilm-l6_reviews_len20_class_labels_seed0_1a22829dd7"),
    ("model=tiny-bert",): ("76a3b134bd", "tiny-bert_reviews_len20_class_labels_seed0_76a3b134bd"),
    ("model=tiny-gpt2", "method=lora"): ("162c9a905d", "tiny-gpt2_reviews_lora_r8_seed0_162c9a905d"),
    ("method=lora", "method.target_modules=[q,v]"): ("9a318a6490", "minilm-l6_reviews_lora_r8_seed0_9a318a6490"),
    ("model=tiny-llama", "method=prompt_design_k4"): (
        "9c3ed07ab8",
        "tiny-llama_reviews_prompt_design_k4_seed0_9c3ed07ab8",
    ),
    ("model=tiny-t5", "method=prefix_tuning", "prompt.length=4"): (
        "e0f8f95e01",
        "tiny-t5_reviews_prefix_tuning_len4_seed0_e0f8f95e01",
    ),
    ("method=p_tuning",): ("7a67e3ff47", "minilm-l6_reviews_p_tuning_len20_seed0_7a67e3ff47"),
    ("method=model_tuning", "trainer=lester"): ("3999fc4d11", "minilm-l6_reviews_model_tuning_seed0_3999fc4d11"),
}


@pytest.mark.parametrize("overrides", list(PINNED))
def test_config_keys_and_job_names_stay_as_they_were(overrides):
    cfg = compose_config(list(overrides))
    key, name = PINNED[overrides]
    assert sweep.config_key(cfg) == key
    assert sweep.job_name(cfg) == name


def test_one_identity_for_sweeps_checkpoints_and_the_report():
    composed = compose_config(["model=tiny-gpt2", "method=lora", "trainer.progress_bar=false"])
    validated = validate(composed)
    # the composed config (what a sweep job sees) and the validated one (what a checkpoint stores) agree
    assert identity.config_key(composed) == identity.config_key(validated) == sweep.config_key(composed)
    assert checkpoint.comparable_config(validated) == identity.comparable_config(composed)
    flat = identity.comparable_config(validated)
    assert not set(identity.NON_RESULT_KEYS) & set(flat)
    assert flat["method.lora_r"] == 8 and flat["trainer.lr"] == 1e-3
    # keys that cannot change a result do not change the key
    quiet = compose_config(["model=tiny-gpt2", "method=lora", "trainer.log_every=1", "output_root=elsewhere"])
    assert identity.config_key(quiet) == identity.config_key(composed)
    assert identity.config_key(compose_config(["model=tiny-gpt2", "method=lora", "seed=1"])) != identity.config_key(
        composed
    )
    # a key added later is left out at the value earlier runs had, and counts at any other (null included)
    later = {
        "task.encoding": "latin-1",
        "task.target_field": "answer",
        "task.eval_rows": 100,
        "task.carve_by": "label",
        "trainer.head_lr": 0.001,
    }
    assert set(later) == set(identity.LATER_KEYS)
    for key, value in later.items():
        other = compose_config(["model=tiny-gpt2", "method=lora", f"{key}={value}"])
        assert identity.config_key(other) != identity.config_key(composed), key
        assert identity.comparable_config(other)[key] == value
        assert key not in identity.comparable_config(composed)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "softprompt"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions (lazy imports count too)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [
                    alias.name.removeprefix("softprompt.")
                    for alias in node.names
                    if alias.name.startswith("softprompt.")
                ]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package != "softprompt" else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    source = ".".join([*base, *([node.module] if node.module else [])])
                elif node.module and (node.module == "softprompt" or node.module.startswith("softprompt.")):
                    source = node.module.removeprefix("softprompt").removeprefix(".")
                else:
                    continue
                # `from softprompt import run_dir`: the module named; `from softprompt.config import X`: config
                named = [f"{source}.{alias.name}".lstrip(".") for alias in node.names]
                targets = [module for module in named if module in modules] or [source]
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_module_graph_has_no_cycle():
    graph = import_graph()
    # the parser sees the edges that exist (lazy ones included)
    assert "identity" in graph["sweep"] and "identity" in graph["checkpoint"] and "identity" in graph["report"]
    assert "report" in graph["sweep"], "ReportCallback's import inside its method is an edge too"
    assert "registry" in graph["config"] and "config" not in graph["registry"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
