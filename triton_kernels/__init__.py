"""Triton kernels of ckpt_ops (installed as ``ckpt_ops.triton_kernels``).

Nothing is imported here on purpose: the package imports the op modules (e.g. ``.norm``) lazily and only when
Triton is installed, so ``import ckpt_ops`` works without Triton. Inside this folder use relative imports only:
Triton's own repository publishes an unrelated top-level package named ``triton_kernels``.
"""
