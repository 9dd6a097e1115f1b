"""softprompt: soft prompt tuning experiments on frozen transformers (Lester et al., 2021)."""

__version__ = "0.1.0"
