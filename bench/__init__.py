"""ckpt_ops benchmarks: ``python -m bench --help``."""
