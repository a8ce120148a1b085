"""conv_transpose2d on numpy: its stride phases as numpy conv2d layers, interleaved on the host (`_phases`)."""
from .._phases import prepare

__all__ = ["prepare"]
