"""Compatibility layers: `mucs_fast.compat.reference` is a drop-in for the reference
implementation's MUCS Attributor (github sony/mucs) and reads/writes its files.

`python -m mucs_fast.compat SCRIPT.py ARGS...` runs one of the reference's scripts (e.g. attrib.py)
with omegaconf containers allowlisted for `torch.load(weights_only=True)`, so its checkpoints load.
"""
