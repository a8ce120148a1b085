"""OpenCL and CUDA implementations of the ops: one Plan per layer over the shared kernels/ sources."""
