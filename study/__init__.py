"""study: sweeps of mann models with Ray Tune + Optuna + ASHA, tracked in MLflow.

The only package that imports ray (lazily, inside the functions that need it).
"""
