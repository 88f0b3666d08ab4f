"""Experiment configs: each module has `get_config(arg)` returning an ml_collections ConfigDict."""
