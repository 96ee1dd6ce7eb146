"""Triton kernels, installed as `dmfn_fast.kernels`. Importing needs triton."""
