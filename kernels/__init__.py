"""Triton kernels: the fused DMFB's (dmfb_branches.py, instance_norm.py) and a convolution's bias + activation
(bias_act.py). This top-level folder is installed as the package `dmfn_fast.kernels` (setup.py's package_dir);
dmfn_fast/ops/dmfb.py and dmfn_fast/ops/bias_act.py launch them. Importing needs triton."""
