"""The arena: suites of cells run through Optuna's storage, reported side by side."""
