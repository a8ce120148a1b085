"""convbackends.torch: the nn.Module and autograd.Function over deform_conv2d, on every backend and device: its
forward against the float64 oracle, its autograd gradients against finite differences of the oracle, CPU tensors
shared with numpy, and a DCNv2 block (offsets and mask predicted by a torch conv) that trains."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import convbackends.torch as cbt  # noqa: E402
from convbackends.parity import compare  # noqa: E402
from convbackends.reference import deform_conv2d_float64  # noqa: E402
from test_deform_conv2d import numerical_gradients, offsets_away_from_kinks  # noqa: E402


def _inputs(seed=0, n=2, c=4, h=6, w=5, offset_groups=2, taps=9):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=gen) * 2 - 1
    offset = (torch.rand(n, 2 * offset_groups * taps, h, w, generator=gen) * 2 - 1) * 3
    mask = torch.rand(n, offset_groups * taps, h, w, generator=gen)
    return x, offset, mask


def test_forward_matches_the_oracle_and_shares_cpu_memory(target):
    backend, device = target
    x, offset, mask = _inputs()
    layer = cbt.DeformConv2d(4, 6, 3, padding=1, groups=2, backend=backend, device=device)
    y = layer(x, offset, mask)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (2, 6, 6, 5)
    ref = deform_conv2d_float64(x.numpy(), offset.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(),
                                mask.numpy(), padding=1, groups=2)
    assert compare(y.detach().numpy(), ref)[3]
    assert cbt._host(x).ctypes.data == x.data_ptr()  # the backend reads the tensor's own memory
    assert "backend=" in repr(layer)


def test_autograd_gradients_match_finite_differences(target):
    backend, device = target
    x, _, mask = _inputs(1, n=1, c=4, h=5, w=5, offset_groups=2)
    layer = cbt.DeformConv2d(4, 3, 3, padding=1, backend=backend, device=device)
    from convbackends.ops.deform_conv2d import DeformConv2dSpec

    geom = DeformConv2dSpec.create(layer.weight.detach().numpy(), padding=1).geometry((1, 4, 5, 5), (1, 36, 5, 5))
    offset = torch.from_numpy(offsets_away_from_kinks(geom, np.random.default_rng(3)))
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    grad_y = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(4)) - 0.5
    layer(*leaves).backward(grad_y)
    want = numerical_gradients(x.numpy(), offset.numpy(), mask.numpy(), layer.weight.detach().numpy(),
                               grad_y.numpy(), dict(padding=1))
    got = [t.grad for t in leaves] + [layer.weight.grad, layer.bias.grad]
    for name, g, ref in zip(("x", "offset", "mask", "weight", "bias"), got, want):
        assert g is not None and g.dtype == torch.float32, name
        assert compare(g.numpy(), ref)[3], name


def test_v1_without_mask_and_without_bias():
    x, offset, _ = _inputs(2, offset_groups=1)
    layer = cbt.DeformConv2d(4, 2, (3, 3), padding=1, bias=False)
    x.requires_grad_()
    offset.requires_grad_()
    y = layer(x, offset)
    y.sum().backward()
    assert layer.bias is None and x.grad.shape == x.shape and offset.grad.shape == offset.shape
    ref = deform_conv2d_float64(x.detach().numpy(), offset.detach().numpy(), layer.weight.detach().numpy(), padding=1)
    assert compare(y.detach().numpy(), ref)[3]


def test_inference_mode_tensors():
    """Tensors made under torch.inference_mode carry no version counter: the layer is prepared for each call."""
    x, offset, mask = _inputs(6)
    with torch.inference_mode():
        weight = torch.rand(4, 4, 3, 3) - 0.5
        first = cbt.deform_conv2d(x, offset, weight, padding=1, mask=mask)
        weight.mul_(2)  # in place, inside inference mode
        second = cbt.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    ref = deform_conv2d_float64(x.numpy(), offset.numpy(), weight.numpy(), None, mask.numpy(), padding=1)
    assert compare(second.numpy(), ref)[3] and compare(first.numpy(), ref / 2)[3]


def test_functional_form_in_torchvisions_order():
    x, offset, mask = _inputs(5)
    weight = torch.rand(4, 4, 3, 3) - 0.5
    bias = torch.rand(4) - 0.5
    y = cbt.deform_conv2d(x, offset, weight, bias, padding=(1, 1), mask=mask)
    ref = deform_conv2d_float64(x.numpy(), offset.numpy(), weight.numpy(), bias.numpy(), mask.numpy(), padding=1)
    assert compare(y.numpy(), ref)[3]


def test_a_dcnv2_block_trains_and_each_step_runs_the_new_weights(target):
    """Offsets and mask come from a torch conv (as in DCNv2), so their gradients train that conv too."""
    backend, device = target
    torch.manual_seed(0)
    offset_conv = torch.nn.Conv2d(4, 27, 3, padding=1)
    deform = cbt.DeformConv2d(4, 4, 3, padding=1, backend=backend, device=device)
    target_net = torch.nn.Conv2d(4, 4, 3, padding=1)
    params = list(offset_conv.parameters()) + list(deform.parameters())
    optimizer = torch.optim.Adam(params, lr=0.02)
    x = torch.rand(4, 4, 8, 8) * 2 - 1
    with torch.no_grad():
        goal = target_net(x)
    losses = []
    for _ in range(25):
        predicted = offset_conv(x)
        offset, mask = predicted[:, :18], torch.sigmoid(predicted[:, 18:])
        loss = ((deform(x, offset, mask) - goal) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert offset_conv.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():  # after the steps, the layer runs the updated weights
        predicted = offset_conv(x)
        offset, mask = predicted[:, :18], torch.sigmoid(predicted[:, 18:])
        ref = deform_conv2d_float64(x.numpy(), offset.numpy(), deform.weight.numpy(), deform.bias.numpy(),
                                    mask.numpy(), padding=1)
        assert compare(deform(x, offset, mask).numpy(), ref)[3]


def test_bad_inputs_are_the_cores_errors():
    x, offset, mask = _inputs(6)
    layer = cbt.DeformConv2d(4, 2, 3, padding=1)
    with pytest.raises(TypeError, match="x must be float32"):
        layer(x.double(), offset, mask)
    with pytest.raises(ValueError, match="offset has 30 channels"):
        layer(x, offset[:, :30], mask)
