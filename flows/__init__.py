"""Prefect flows: one per stage, and `pipeline`, which runs them in order."""
