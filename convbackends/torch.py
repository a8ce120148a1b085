"""PyTorch adapter (`pip install convbackends[torch]`): `DeformConv2d`, an nn.Module over convbackends'
deform_conv2d forward and backward, so a DCNv2 layer trains on any backend; `DeformConv2dFunction`, its
torch.autograd.Function; `deform_conv2d`, the functional form (torchvision's argument order).

torch is imported when one of these names is first used, not by `import convbackends` nor by importing this
module. CPU float32 tensors go in and come out without copies (`Tensor.numpy()` shares memory and the results
are wrapped by `torch.from_numpy`); a strided tensor is copied once, as any strided numpy input is. Tensors on
another torch device are copied to the CPU and the results back.
The backend runs the linear op: no fused activation (apply it in torch, which differentiates it).
"""
from __future__ import annotations

import threading

from .ops.deform_conv2d import DeformConv2d as _Layer

__all__ = ["DeformConv2d", "DeformConv2dFunction", "deform_conv2d"]

_built: dict = {}
_build_lock = threading.Lock()


def __getattr__(name: str):
    if name in __all__:
        with _build_lock:
            if not _built:
                _built.update(_build())
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _host(tensor):
    """A tensor's float32 CPU data as a numpy array sharing its memory (None stays None)."""
    if tensor is None:
        return None
    return tensor.detach().cpu().numpy()


class _Layers:
    """The prepared layer for a weight (and bias) tensor, prepared again only when either changes: a new
    tensor, or an in-place update (an optimizer step bumps the tensor's version counter)."""

    def __init__(self, options: dict):
        self.options = options
        self._key = None
        self._layer: _Layer | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _version(tensor):
        if tensor is None:
            return None
        if tensor.is_inference():  # made under torch.inference_mode: no version counter, so never reused
            return object()
        return id(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape)

    def get(self, weight, bias) -> _Layer:
        key = (self._version(weight), self._version(bias))
        with self._lock:
            # The previous layer is not closed here: a pending backward may hold it (it is released when collected).
            if key != self._key or self._layer is None:
                self._layer = _Layer(_host(weight), _host(bias), **self.options)
                self._key = key
            return self._layer


def _build() -> dict:
    import torch

    def tensor_out(array, like):
        out = torch.from_numpy(array)
        return out if like.device.type == "cpu" else out.to(like.device)

    class DeformConv2dFunction(torch.autograd.Function):
        """apply(x, offset, mask, weight, bias, layers): y, with gradients for all five tensors (mask and bias
        may be None). `layers` is a `_Layers` holding the layer's options (stride, padding, dilation, groups,
        backend, device)."""

        @staticmethod
        def forward(ctx, x, offset, mask, weight, bias, layers):
            layer = layers.get(weight, bias)
            ctx.save_for_backward(x, offset, mask)
            ctx.layer, ctx.has_bias = layer, bias is not None
            return tensor_out(layer(_host(x), _host(offset), _host(mask)), x)

        @staticmethod
        def backward(ctx, grad_y):
            x, offset, mask = ctx.saved_tensors
            grads = ctx.layer.backward(_host(grad_y), _host(x), _host(offset), _host(mask))
            grad_x, grad_offset, grad_mask, grad_w, grad_b = (None if g is None else tensor_out(g, x) for g in grads)
            return grad_x, grad_offset, grad_mask, grad_w, grad_b if ctx.has_bias else None, None

    class DeformConv2d(torch.nn.Module):
        """torchvision.ops.DeformConv2d's interface, run by a convbackends backend: `DeformConv2d(in_channels,
        out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True, *, backend="numpy",
        device=None)`, called as `layer(x, offset, mask=None)`. `device` picks the backend's device (an index,
        as everywhere in convbackends); the parameters are float32 CPU tensors, initialised as torchvision's."""

        def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                     groups: int = 1, bias: bool = True, *, backend: str = "numpy", device=None):
            super().__init__()
            kh, kw = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
            if in_channels % groups:
                raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
            self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
            self.bias = torch.nn.Parameter(torch.empty(out_channels)) if bias else None
            self.reset_parameters()
            self.options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, backend=backend,
                                device=device)
            self._layers = _Layers(self.options)

        def reset_parameters(self) -> None:
            torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
            if self.bias is not None:
                fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
                bound = 1 / fan_in ** 0.5
                torch.nn.init.uniform_(self.bias, -bound, bound)

        def forward(self, x, offset, mask=None):
            return DeformConv2dFunction.apply(x, offset, mask, self.weight, self.bias, self._layers)

        def extra_repr(self) -> str:
            o, cg, kh, kw = self.weight.shape
            options = ", ".join(f"{k}={v}" for k, v in self.options.items())
            return f"{cg * self.options['groups']}, {o}, kernel_size=({kh}, {kw}), bias={self.bias is not None}, {options}"

    def deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *, groups=1,
                      backend="numpy", device=None):
        """torchvision.ops.deform_conv2d's argument order (weight groups inferred there, given here)."""
        layers = _Layers(dict(stride=stride, padding=padding, dilation=dilation, groups=groups, backend=backend,
                              device=device))
        return DeformConv2dFunction.apply(x, offset, mask, weight, bias, layers)

    return {"DeformConv2d": DeformConv2d, "DeformConv2dFunction": DeformConv2dFunction,
            "deform_conv2d": deform_conv2d}

