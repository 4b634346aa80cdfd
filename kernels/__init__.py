"""Triton kernels, one op per file (kernel + host launcher; registration lives in mucs_fast.ops)."""
