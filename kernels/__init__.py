"""Triton kernels of pmlm-engine, installed as ``pmlm_engine.kernels``."""
