"""The libraries the benchmark measures convbackends against, behind one small interface.

A peer answers `unavailable()` (None, or why it cannot run here) and `supports(case)` (the ops it has: every
peer runs forwards only), then per layer `prepare(case, w, b)` once (graph/net/session built and weights
loaded) and returns a runner whose `profile(x, *case.inputs())` returns (y, None): numpy in, numpy out, like the
backends' op objects. Each library is imported inside its peer, so a missing one only makes that peer
unavailable.
"""
from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
from abc import ABC, abstractmethod

import numpy as np

from .bench import geometry
from .parity import Case
from .runtime.numpy import workers
from .spec import Activation


class _Runner:
    """A prepared peer layer: `run(x, *inputs) -> y` and what to release afterwards."""

    def __init__(self, run, close=None):
        self._run = run
        self._close = close

    def profile(self, *arguments):
        return self._run(*arguments), None

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


class Peer(ABC):
    """A library the benchmark compares against. `device` names what it runs on once probed."""

    name = ""
    kind = "peer"
    install = "pip install 'convbackends[peers]'"  # what makes the library importable
    ops = ("conv2d", "conv_transpose2d")  # the ops (Case.op) it has a forward for

    def __init__(self) -> None:
        self.device = "CPU"
        self._reason: str | None | bool = False  # False: not probed yet

    @property
    def id(self) -> str:
        return self.name

    def __getstate__(self) -> dict:
        # A probe holds for one process: the benchmark's worker process imports and probes anew, so
        # that the library's import and set-up stay out of the first layer's cold time.
        return {**self.__dict__, "_reason": False}

    def unavailable(self) -> str | None:
        """None when the peer runs here, else why not (probed once per process: imports the library)."""
        if self._reason is False:
            try:
                self._reason = self._probe()
            except ModuleNotFoundError as exc:
                self._reason = f"{exc.name} is not installed: {self.install}"
            except (ImportError, OSError) as exc:
                self._reason = f"{type(exc).__name__}: {exc}"
        return self._reason

    @abstractmethod
    def _probe(self) -> str | None:
        """Import the library and find the device: None, or the reason the peer cannot run."""

    def supports(self, case: Case) -> str | None:
        if case.op not in self.ops:
            return f"{self.name} has no {case.op}"
        if case.backward:
            return f"{self.name}: no backward here (the benchmark times peers' forwards only)"
        return None

    @abstractmethod
    def prepare(self, case: Case, w, b) -> _Runner:
        """Build the one-layer net/graph/session with w and b loaded, ready to run many times."""


@contextlib.contextmanager
def _silenced(*fds: int):
    """Mute what C libraries print straight to these file descriptors (ncnn's GPU listing, OpenCV's
    OpenCL build logs), so stdout keeps only the report; errors still arrive as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    try:
        with open(os.devnull, "w") as null:
            for fd in fds:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)


def _onnx_model(case: Case, w, b) -> bytes:
    """The project's one-node float32 ONNX graph of the case's op (reference.py), for cv2.dnn and onnxruntime
    alike."""
    from .reference import onnx_conv_model, onnx_conv_transpose_model, onnx_deform_conv_model

    if case.op == "deform_conv2d":
        return onnx_deform_conv_model(geometry(case), w, b, Activation(), np.float32)
    build = {"conv2d": onnx_conv_model, "conv_transpose2d": onnx_conv_transpose_model}[case.op]
    return build(geometry(case), w, b, Activation())


def _cv2_forward(net):
    def run(x):
        net.setInput(x)
        return net.forward()

    return run


class Cv2Dnn(Peer):
    """cv2.dnn on the CPU with its normal settings (default engine, Winograd on): the baseline."""

    name = "cv2dnn"
    install = "pip install 'convbackends[reference]'"

    def _probe(self) -> str | None:
        import cv2
        import onnx  # noqa: F401  (the graph is built with it)

        self.device = f"CPU, OpenCV {cv2.__version__}"
        return None

    def prepare(self, case, w, b):
        import cv2

        from .reference import cv2_net

        cv2.setNumThreads(workers())

        if case.op == "conv2d":
            return _Runner(_cv2_forward(cv2_net(geometry(case), w, b, Activation(), winograd=True)))
        return _Runner(_cv2_forward(cv2.dnn.readNetFromONNX(np.frombuffer(_onnx_model(case, w, b), np.uint8))))


class Cv2DnnOpenCL(Peer):
    """cv2.dnn's OpenCL target (classic engine; the new one ignores targets).

    OpenCV reads OPENCV_DNN_OPENCL_ALLOW_ALL_DEVICES and OPENCV_OPENCL_DEVICE once, when it first
    touches OpenCL, and refuses CPU OpenCL devices (PoCL) without them. The probe therefore sets
    them (unless the user did) before anything else in the process uses cv2: ALLOW_ALL_DEVICES
    always, and OPENCV_OPENCL_DEVICE=:CPU: only where convbackends' OpenCL backend lists no GPU.
    """

    name = "cv2dnn-opencl"
    install = Cv2Dnn.install

    def _probe(self) -> str | None:
        os.environ.setdefault("OPENCV_DNN_OPENCL_ALLOW_ALL_DEVICES", "1")
        if "OPENCV_OPENCL_DEVICE" not in os.environ and not _opencl_has_gpu():
            os.environ["OPENCV_OPENCL_DEVICE"] = ":CPU:"
        import cv2

        if not cv2.ocl.haveOpenCL():
            return "OpenCV finds no OpenCL runtime"
        cv2.ocl.setUseOpenCL(True)
        name = cv2.ocl.Device.getDefault().name()
        if not name:
            return ("OpenCV opened no OpenCL device (for a CPU device set OPENCV_DNN_OPENCL_ALLOW_ALL_DEVICES=1 and "
                    "OPENCV_OPENCL_DEVICE=:CPU: before cv2 first uses OpenCL)")
        self.device = name
        return None

    def prepare(self, case, w, b):
        import cv2

        # The buffer overload of readNetFromONNX ignores `engine` (OpenCV 5.0): go through a file.
        with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
            f.write(_onnx_model(case, w, b))
            f.flush()
            net = cv2.dnn.readNetFromONNX(f.name, cv2.dnn.ENGINE_CLASSIC)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_OPENCL)
        run = _cv2_forward(net)
        # The first forward builds the OpenCL programs, and OpenCV prints their build logs and
        # tuning hints to stdout and stderr: build here, quietly (it still counts as cold time).
        with _silenced(1, 2):
            run(np.zeros(geometry(case).input_shape, np.float32))
        return _Runner(run)


def _opencl_has_gpu() -> bool:
    from .runtime import BackendUnavailable, get_backend

    try:
        return any(d.type != "cpu" for d in get_backend("opencl").devices())
    except BackendUnavailable:
        return False


class Torch(Peer):
    """torch.nn.functional.conv2d / conv_transpose2d under inference_mode, on the CPU with as many threads as
    the numpy backend (`get_num_threads`: the cores by default); TF32 off on CUDA so it stays float32."""

    install = "pip install torch (its CPU or its CUDA wheel)"

    def __init__(self, device: str) -> None:
        super().__init__()
        self.torch_device = device
        self.name = "torch" if device == "cpu" else f"torch-{device}"

    def _probe(self) -> str | None:
        import torch

        if self.torch_device == "cuda":
            if not torch.cuda.is_available():
                return f"torch {torch.__version__} sees no CUDA device"
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            self.device = torch.cuda.get_device_name()
        else:
            self.device = f"CPU, torch {torch.__version__}"
        return None

    def prepare(self, case, w, b):
        import torch
        import torch.nn.functional as F

        g = geometry(case)
        dev = torch.device(self.torch_device)
        if self.torch_device == "cpu":
            torch.set_num_threads(workers())
        wt = torch.from_numpy(w).to(dev)
        bt = None if b is None else torch.from_numpy(b).to(dev)
        symmetric = (g.pt, g.pl) == (g.pb, g.pr)
        pads = (g.pt, g.pl) if symmetric else 0

        if case.op == "conv_transpose2d":
            def layer(xt):
                # torch pads symmetrically only: an asymmetric layer runs unpadded and is cropped.
                y = F.conv_transpose2d(xt, wt, bt, (g.sh, g.sw), pads, (g.oph, g.opw), g.groups, (g.dh, g.dw))
                return y if symmetric else y[:, :, g.pt:g.pt + g.oh, g.pl:g.pl + g.ow]
        else:
            def layer(xt):
                if not symmetric:
                    xt = F.pad(xt, (g.pl, g.pr, g.pt, g.pb))
                return F.conv2d(xt, wt, bt, (g.sh, g.sw), pads, (g.dh, g.dw), g.groups)

        def run(x):
            with torch.inference_mode():
                return layer(torch.from_numpy(x).to(dev)).cpu().numpy()  # .cpu() waits for the device

        return _Runner(run)


class TorchVision(Peer):
    """torchvision.ops.deform_conv2d on the CPU (a thread per core), forward and backward: the deform suite's
    backward peer. PyPI's torchvision loads only beside the torch build it was made for (the CUDA one, several
    GB), so it lives in a benchmark venv, not in CI. Its backward is autograd's: each timed backward call
    also runs the forward that builds the graph (torchvision has no separate backward call), about a sixth
    of the backward's time on the suite's layers."""

    name = "torchvision"
    ops = ("deform_conv2d",)
    install = "pip install torch torchvision (a matching pair: torchvision's wheel pins its torch build)"

    def _probe(self) -> str | None:
        import torch
        import torchvision
        from torchvision.ops import deform_conv2d  # noqa: F401  (fails where its C++ ops do not load)

        self.device = f"CPU, torchvision {torchvision.__version__}, torch {torch.__version__}"
        return None

    def supports(self, case: Case) -> str | None:
        return None if case.op in self.ops else f"{self.name} has no {case.op}"

    def prepare(self, case, w, b):
        import torch
        import torch.nn.functional as F
        from torchvision.ops import deform_conv2d

        torch.set_num_threads(workers())
        g = geometry(case)
        symmetric = (g.pt, g.pl) == (g.pb, g.pr)

        def forward(x, offset, mask, weight, bias):
            if not symmetric:  # torchvision pads symmetrically only; explicit pads keep every sample point
                x = F.pad(x, (g.pl, g.pr, g.pt, g.pb))
            return deform_conv2d(x, offset, weight, bias, stride=(g.sh, g.sw), padding=(g.pt, g.pl) if symmetric
                                 else 0, dilation=(g.dh, g.dw), mask=mask)

        def tensors(*arrays):
            return [None if a is None else torch.from_numpy(a) for a in arrays]

        if not case.backward:
            def run(x, offset, mask):
                with torch.inference_mode():
                    return forward(*tensors(x, offset, mask, w, b)).numpy()
            return _Runner(run)

        def gradients(grad_y, x, offset, mask):
            leaves = [None if t is None else t.requires_grad_()
                      for t in tensors(x, offset, mask, w, np.zeros(g.o, np.float32))]
            y = forward(*leaves)
            wanted = [t for t in leaves if t is not None]
            return tuple(t.numpy() for t in torch.autograd.grad(y, wanted, torch.from_numpy(grad_y)))

        return _Runner(gradients)


class OnnxRuntime(Peer):
    """onnxruntime's CPU provider: Conv, ConvTranspose and DeformConv (opset 19), the deform suite's peer."""

    name = "onnxruntime"
    ops = (*Peer.ops, "deform_conv2d")

    def _probe(self) -> str | None:
        import onnxruntime

        self.device = f"CPU, onnxruntime {onnxruntime.__version__}"
        return None

    def prepare(self, case, w, b):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = workers()
        session = onnxruntime.InferenceSession(_onnx_model(case, w, b), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]  # x, then the case's inputs (offset, mask) in order
        return _Runner(lambda *arguments: session.run(None, dict(zip(names, arguments)))[0])


class Ncnn(Peer):
    """ncnn's Convolution / ConvolutionDepthWise (Deconvolution / DeconvolutionDepthWise for conv_transpose2d)
    layer in a one-layer net built in memory.

    fp16 and bf16 storage and arithmetic are off, so it is float32 like everything else. ncnn has
    no batch dimension: a batch runs as one extraction per image.
    """

    def __init__(self, vulkan: bool) -> None:
        super().__init__()
        self.vulkan = vulkan
        self.name = "ncnn-vulkan" if vulkan else "ncnn"

    def _probe(self) -> str | None:
        import ncnn

        self.device = f"CPU, ncnn {ncnn.__version__}"
        if self.vulkan:
            with _silenced(2):
                count = ncnn.get_gpu_count()
            if count == 0:
                return "ncnn sees no Vulkan device"
            self.device = ncnn.get_gpu_info(ncnn.get_default_gpu_index()).device_name()
        return None

    def prepare(self, case, w, b):
        import ncnn

        g = geometry(case)
        layer = "Convolution" if case.op == "conv2d" else "Deconvolution"
        if g.groups > 1:
            layer += "DepthWise"  # ncnn's grouped layers, depthwise or not
        params = (f"0={g.o} 1={g.kw} 11={g.kh} 2={g.dw} 12={g.dh} 3={g.sw} 13={g.sh} "
                  f"4={g.pl} 14={g.pt} 15={g.pr} 16={g.pb} 5={int(b is not None)} 6={w.size}")
        if g.groups > 1:
            params += f" 7={g.groups}"
        if case.op == "conv_transpose2d":
            params += f" 18={g.opw} 19={g.oph}"
            # ncnn's deconvolution weights are (groups, O/groups, C/groups, kh, kw); ONNX's (C, O/groups, kh, kw).
            cg, og = g.c // g.groups, g.o // g.groups
            w = w.reshape(g.groups, cg, og, g.kh, g.kw).transpose(0, 2, 1, 3, 4)
        net = ncnn.Net()
        opt = net.opt
        opt.use_vulkan_compute = self.vulkan
        opt.num_threads = workers()
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_bf16_packed", "use_int8_inference"):
            setattr(opt, flag, False)
        net.load_param_mem(f"7767517\n2 2\nInput in 0 1 in\n{layer} conv 1 1 in out {params}\n")
        # Weights carry a 4-byte tag (0: raw float32); the bias follows untagged.
        blob = struct.pack("<I", 0) + np.ascontiguousarray(w).tobytes()
        if b is not None:
            blob += np.ascontiguousarray(b).tobytes()
        net.load_model_mem(blob)

        def run(x):
            out = []
            for image in x:
                extractor = net.create_extractor()
                # clone(): ncnn.Mat(numpy) keeps an unaligned channel step, which ncnn's Vulkan upload misreads.
                extractor.input("in", ncnn.Mat(image).clone())
                _, y = extractor.extract("out")
                out.append(np.array(y))
            return np.stack(out)

        return _Runner(run, net.clear)


def all_peers() -> dict[str, Peer]:
    """Every peer by name, not yet probed; cv2dnn (the baseline) first."""
    peers = [Cv2Dnn(), Cv2DnnOpenCL(), Torch("cpu"), Torch("cuda"), TorchVision(), OnnxRuntime(), Ncnn(False),
             Ncnn(True)]
    return {p.name: p for p in peers}


PEER_NAMES = tuple(all_peers())


def select(names: str | None) -> list[Peer]:
    """The baseline cv2dnn plus the named peers ("torch,ncnn", "all", "none"; None is all)."""
    peers = all_peers()
    if names is None or names.strip().lower() == "all":
        return list(peers.values())
    wanted = [] if names.strip().lower() == "none" else [n.strip().lower() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in peers]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r} (peers: {', '.join(peers)}, all, none)")
    return [p for name, p in peers.items() if name == "cv2dnn" or name in wanted]
