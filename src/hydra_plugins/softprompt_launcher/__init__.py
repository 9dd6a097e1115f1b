"""softprompt's Hydra launcher (`hydra/launcher=accelerate`); Hydra finds launchers only under `hydra_plugins`."""
