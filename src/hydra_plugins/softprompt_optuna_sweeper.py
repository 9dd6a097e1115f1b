"""softprompt's Optuna sweeper (`hydra/sweeper=optuna`): Hydra's own, except that a search in which no trial
completed ends as any sweep whose jobs all failed does (its report, one line naming each failed job, exit
status 1) rather than in Optuna's traceback for a study without a best trial.

Hydra instantiates a sweeper only from the `hydra_plugins` package, hence this module's place; without the
optuna extra there is nothing to extend and Hydra's plugin scan finds nothing here.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    class SoftpromptOptunaSweeper(OptunaSweeper):
        def sweep(self, arguments: list[str]) -> None:
            try:
                return super().sweep(arguments)
            except ValueError as error:
                # optuna's study.best_trial: every trial failed, and each has said why already
                if "No trials are completed yet" not in str(error):
                    raise
                return None
