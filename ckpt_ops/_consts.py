"""Codes shared between Python and the kernels (keep in sync with csrc/include/ckpt_ops/*.h)."""

# activation name -> (kernel code, gated). Kernel codes: 0 gelu (erf), 1 gelu_tanh, 2 relu, 3 silu.
# Gated: swiglu = silu(gate) * up, geglu = gelu_tanh(gate) * up.
ACTIVATIONS = {
    "gelu": (0, False),
    "gelu_tanh": (1, False),
    "relu": (2, False),
    "silu": (3, False),
    "swiglu": (3, True),
    "geglu": (1, True),
}
