"""Triton kernels, installed as ``effkern.triton_kernels``. Each module holds @triton.jit kernels and their
host launchers; the launchers take the normalised arguments of the matching ``effkern.ops`` op."""
