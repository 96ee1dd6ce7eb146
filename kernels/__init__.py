"""Triton kernels of the fused DMFB. This top-level folder is installed as the package `dmfn_fast.kernels`
(setup.py's package_dir); dmfn_fast/ops/dmfb.py launches them. Importing needs triton."""
