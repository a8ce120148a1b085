"""Vulkan implementations of the ops: embedded SPIR-V pipelines recorded once per input geometry."""
