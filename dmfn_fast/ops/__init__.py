"""Custom ops, each in one file beside its PyTorch reference."""
