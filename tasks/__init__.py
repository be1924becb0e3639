"""Prefect tasks: one stage on one shard, dispatched through a backend."""
