"""mucs_fast: fast MUCS training-data attribution for diffusion models."""

__version__ = "0.1.0"
