"""Triton kernels: the fused DMFB's, and a convolution's bias + activation (bias_act.py). This top-level folder is installed as the package `dmfn_fast.kernels`
(setup.py's package_dir); dmfn_fast/ops/dmfb.py launches them. Importing needs triton."""
