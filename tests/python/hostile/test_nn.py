"""Hostile inputs through the stateful layers of ``rsnorm.nn`` (when it is public): the same
errors as the functional ops, strided input = contiguous bitwise, empty batches, backward before
forward, and state never corrupted by a refused call."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

nn = pytest.importorskip("rsnorm.nn", reason="rsnorm.nn not merged yet")

F32 = np.float32
SHAPE = (4, 6, 5, 3)
LAYERS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "LayerNorm": lambda: nn.LayerNorm((5, 3)),
    "RMSNorm": lambda: nn.RMSNorm((5, 3)),
    "GroupNorm": lambda: nn.GroupNorm(3, 6),
    "LocalResponseNorm": lambda: nn.LocalResponseNorm(3),
    "FilterResponseNorm": lambda: nn.FilterResponseNorm(6),
    "TLU": lambda: nn.TLU(6),
    "GDN": lambda: nn.GDN(6),
    "IterNorm": lambda: nn.IterNorm(6, num_groups=2),
}


def _x(seed=0, shape=SHAPE):
    return ref.make_input(np.random.default_rng(seed), shape, F32)


def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def test_every_layer_class_is_listed():
    classes = {n for n in dir(nn) if isinstance(getattr(nn, n), type)
               and issubclass(getattr(nn, n), nn.Module) and not n.startswith("_")
               and n != "Module" and getattr(nn, n).__module__ == nn.__name__}
    assert classes <= set(LAYERS) | {"BatchNorm1d", "BatchNorm3d", "InstanceNorm1d",
                                     "InstanceNorm3d"}, classes - set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_bad_dtype_is_type_error_and_state_untouched(name):
    layer = LAYERS[name]()
    before = _state(layer)
    with pytest.raises(TypeError):
        layer(_x().astype(np.int32))
    after = _state(layer)
    assert before.keys() == after.keys()
    for k in before:
        ref.assert_bitwise_equal(after[k], before[k], k)


@pytest.mark.parametrize("name", sorted(set(LAYERS) - {"LocalResponseNorm"}))  # any C there
def test_layer_wrong_channels_is_value_error_and_state_untouched(name):
    layer = LAYERS[name]()
    layer(_x())  # one good step first
    before = _state(layer)
    with pytest.raises(ValueError):
        layer(_x(shape=(4, 7, 4, 2)))
    for k, v in _state(layer).items():
        ref.assert_bitwise_equal(v, before[k], k)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_backward_before_forward_is_value_error(name):
    with pytest.raises(rn.RsnormError, match=r"before a forward"):
        LAYERS[name]().backward(_x())


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_strided_input_equals_contiguous_bitwise(name):
    x = _x()
    a, b = LAYERS[name](), LAYERS[name]()
    view = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)[::-1][::-1]
    ref.assert_bitwise_equal(a(view), b(x), name)
    gy = _x(1)
    ref.assert_bitwise_equal(a.backward(gy[:, :, ::-1][:, :, ::-1]), b.backward(gy), name)
    for k, v in a.state_dict().items():
        ref.assert_bitwise_equal(v, b.state_dict()[k], k)
