"""softprompt from Python: train a run, report it and serve its prompt, with no command line.

    python docs/examples/python_api.py [OUTPUT_DIR]   # default: outputs/python_api

A few seconds on a CPU: a tiny random BERT (model=tiny-bert) on the embedded reviews task. For a real run, give
`softprompt.run` the overrides you would give softprompt-train (model=minilm-l6 task=sst2 ...).
"""

import sys
from pathlib import Path

import softprompt


def main(output: Path) -> None:
    # the same override strings as `softprompt-train ...`; the run directory is the one the command writes
    result = softprompt.run(
        [
            "model=tiny-bert",
            "prompt.length=4",
            "trainer.max_steps=20",
            "trainer.eval_every=10",
            "trainer.progress_bar=false",
            "task.builtin_size.train=64",
            "task.builtin_size.validation=24",
            f"hydra.run.dir={output / 'run'}",
        ]
    )
    metric = result["main_metric"]
    print(f"trained: {metric} {result['eval'][metric]:.4f} (step 0: {result['initial_eval'][metric]:.4f})")

    # a mistake is a UserError carrying the one line softprompt-train would print; nothing is written
    try:
        softprompt.run(["trainer.lr=fast"])
    except softprompt.UserError as error:
        print(f"refused: {error}")

    # softprompt-report: results.csv, summary.csv, report.md (and figures) for every run under the folder
    written = softprompt.report(output / "run", out=output / "report")
    print(f"report: {written['markdown']}")

    # the frozen backbone with the trained prompt; rows are strings (the template's one field) or mappings
    served = softprompt.load_run(output / "run")
    for row in served.predict(["a wonderful, moving film", {"text": "dull and far too long", "label": "negative"}]):
        print(f"predicted {row['prediction']!r} for {row['text']!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/python_api"))
