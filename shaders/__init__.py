"""GLSL compute shaders; their SPIR-V is embedded in convbackends/backends/vulkan/spirv.py."""
