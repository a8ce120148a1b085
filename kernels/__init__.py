"""Kernel sources in one C dialect shared by OpenCL and CUDA (see prelude.h)."""
