"""Kernels for the DHSPG step (installed as ``otofx.kernels``); the fused step lands with the optimizer."""
