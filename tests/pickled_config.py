"""A config file for tests that run the CLI: `--config=tests/pickled_config.py:/path/cfg.pkl` loads a
ConfigDict a test pickled (any config a test built, passed to subprocesses exactly)."""

import pickle


def get_config(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)
