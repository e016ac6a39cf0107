"""The DeepSpeed JSON configs shipped with aurora_ds (package data; see aurora_ds.engine.dsconfig).

This folder is an importable package only so that an installed wheel carries the JSON files;
``--ds-config zero3`` finds them through ``importlib.resources``.
"""
