"""rsnorm.nn layers: PyTorch's constructor defaults and state-dict keys, train/eval semantics,
running statistics in closed form, backward and gradient bookkeeping, errors."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import rsnorm as rn
import rsnorm.nn as rnn


def bn_ref(x, mean, var, w, b, eps=1e-5, axis=1):
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda a: np.asarray(a, np.float64).reshape(shape)
    return (x.astype(np.float64) - r(mean)) / np.sqrt(r(var) + eps) * r(w) + r(b)


# ---------------------------------------------------------------------------------------------
# Construction and state dicts
# ---------------------------------------------------------------------------------------------


def test_defaults_and_keys_match_pytorch():
    bn = rnn.BatchNorm2d(5)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, 0.1, True, True)
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert sd["weight"].dtype == np.float32 and np.all(sd["weight"] == 1)
    assert np.all(sd["bias"] == 0) and np.all(sd["running_mean"] == 0)
    assert np.all(sd["running_var"] == 1)
    assert sd["num_batches_tracked"].shape == () and sd["num_batches_tracked"].dtype == np.int64

    assert list(rnn.BatchNorm1d(3, affine=False).state_dict()) == [
        "running_mean", "running_var", "num_batches_tracked"]
    assert list(rnn.BatchNorm3d(3, track_running_stats=False).state_dict()) == ["weight", "bias"]
    inn = rnn.InstanceNorm2d(4)
    assert (inn.affine, inn.track_running_stats) == (False, False)
    assert list(inn.state_dict()) == []
    assert list(rnn.InstanceNorm1d(4, affine=True, track_running_stats=True).state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    ln = rnn.LayerNorm((3, 4))
    assert {k: v.shape for k, v in ln.state_dict().items()} == {"weight": (3, 4), "bias": (3, 4)}
    assert list(rnn.LayerNorm(4, bias=False).state_dict()) == ["weight"]
    assert list(rnn.LayerNorm(4, elementwise_affine=False).state_dict()) == []
    rms = rnn.RMSNorm(6)
    assert rms.eps is None and list(rms.state_dict()) == ["weight"]
    gn = rnn.GroupNorm(2, 6)
    assert gn.eps == 1e-5 and gn.state_dict()["weight"].shape == (6,)
    assert rnn.BatchNorm1d(3, dtype=np.float64).weight.dtype == np.float64


def _trained_bn(rng, steps=3):
    bn = rnn.BatchNorm2d(4)
    for _ in range(steps):
        y = bn(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 2 + 1)
        bn.backward(np.ones_like(y))
        for p, g in zip(bn.parameters(), bn.grads()):
            p -= 0.1 * g
    return bn


def test_state_dict_round_trip(rng):
    bn = _trained_bn(rng)
    sd = bn.state_dict()
    other = rnn.BatchNorm2d(4)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert v.dtype == sd[k].dtype and v.tobytes() == sd[k].tobytes(), k
    # state_dict returns copies: changing them leaves the layer alone.
    sd["weight"][...] = 42
    assert not np.any(bn.weight == 42)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    bn.eval()
    other.eval()
    assert bn(x).tobytes() == other(x).tobytes()


def test_pytorch_style_numpy_checkpoint_loads_unchanged(rng):
    # What `{k: v.numpy() for k, v in torch_bn.state_dict().items()}` gives.
    ckpt = {
        "weight": rng.uniform(0.5, 2, 4).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
        "running_mean": rng.standard_normal(4).astype(np.float32),
        "running_var": rng.uniform(0.5, 2, 4).astype(np.float32),
        "num_batches_tracked": np.array(17, dtype=np.int64),
    }
    bn = rnn.BatchNorm2d(4).eval()
    bn.load_state_dict(ckpt)
    assert int(bn.num_batches_tracked) == 17
    x = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(
        bn(x), bn_ref(x, ckpt["running_mean"], ckpt["running_var"], ckpt["weight"],
                      ckpt["bias"]), rtol=1e-5, atol=1e-5)
    # A float64 checkpoint is cast into the layer's float32 arrays.
    bn.load_state_dict({k: v.astype(np.float64) if v.dtype == np.float32 else v
                        for k, v in ckpt.items()})
    assert bn.weight.dtype == np.float32


def test_real_pytorch_checkpoint(rng):
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(rng.uniform(0.5, 2, 4)))
        tbn.bias.copy_(torch.tensor(rng.standard_normal(4)))
    for _ in range(3):
        tbn(torch.tensor(rng.standard_normal((6, 4, 3, 3)), dtype=torch.float32))
    tbn.eval()
    bn = rnn.BatchNorm2d(4, momentum=0.3).eval()
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(bn(x), tbn(torch.tensor(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    gn_t = torch.nn.GroupNorm(2, 4)
    gn = rnn.GroupNorm(2, 4)
    gn.load_state_dict({k: v.detach().numpy() for k, v in gn_t.state_dict().items()})


def test_training_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    for tl, ours in [(torch.nn.BatchNorm1d(3), rnn.BatchNorm1d(3)),
                     (torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
                      rnn.InstanceNorm1d(3, affine=True, track_running_stats=True)),
                     (torch.nn.GroupNorm(3, 6), rnn.GroupNorm(3, 6)),
                     (torch.nn.LayerNorm(5), rnn.LayerNorm(5))]:
        tl = tl.double()
        ours = type(ours)(*_ctor_args(ours), dtype=np.float64)
        c = 6 if isinstance(ours, rnn.GroupNorm) else 3
        for _ in range(2):
            x = rng.standard_normal((4, c, 5)) * 2 + 1
            gy = rng.standard_normal(x.shape)
            xt = torch.tensor(x, requires_grad=True)
            yt = tl(xt)
            yt.backward(torch.tensor(gy))
            y = ours(x)
            dx = ours.backward(gy)
            np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-8, atol=1e-9)
        tsd = tl.state_dict()
        for k, v in ours.state_dict().items():
            np.testing.assert_allclose(v, tsd[k].numpy(), rtol=1e-10, err_msg=k)
        tg = {k: p.grad.numpy() for k, p in tl.named_parameters()}
        for k, g in ours.named_grads().items():
            # Accumulated over the two backward calls, as PyTorch's .grad.
            np.testing.assert_allclose(g, tg[k], rtol=1e-8, atol=1e-9, err_msg=k)


def _ctor_args(layer):
    if isinstance(layer, rnn.GroupNorm):
        return (layer.num_groups, layer.num_channels)
    if isinstance(layer, rnn.LayerNorm):
        return (layer.normalized_shape,)
    return (layer.num_features, layer.eps, layer.momentum, layer.affine,
            layer.track_running_stats)


def test_load_state_dict_errors(rng):
    bn = rnn.BatchNorm2d(4)
    good = bn.state_dict()
    before = {k: v.copy() for k, v in good.items()}
    bad_shape = dict(good, running_var=np.ones(5, np.float32), weight=np.ones(4, np.float32) * 3)
    with pytest.raises(rn.RsnormError,
                       match=r"size mismatch for running_var: expected shape \(4,\), got \(5,\)"):
        bn.load_state_dict(bad_shape)
    # Nothing was copied, not even the valid entries.
    for k, v in bn.state_dict().items():
        assert v.tobytes() == before[k].tobytes()
    missing = {k: v for k, v in good.items() if k != "running_mean"}
    with pytest.raises(rn.RsnormError, match="missing key\\(s\\): running_mean"):
        bn.load_state_dict(missing)
    with pytest.raises(rn.RsnormError, match="unexpected key\\(s\\): running_meen"):
        bn.load_state_dict(dict(good, running_meen=np.zeros(4)))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.load_state_dict(dict(good, num_batches_tracked=np.array(1.5)))
    # strict=False ignores missing/unexpected keys, never shape mismatches.
    bn.load_state_dict({"weight": np.full(4, 2.0), "extra": np.zeros(1)}, strict=False)
    assert np.all(bn.weight == 2)
    with pytest.raises(rn.RsnormError, match="size mismatch"):
        bn.load_state_dict({"bias": np.zeros(3)}, strict=False)
    with pytest.raises(rn.RsnormError, match="missing"):
        rnn.LayerNorm(4).load_state_dict({"weight": np.ones(4)})


# ---------------------------------------------------------------------------------------------
# Train / eval and running statistics
# ---------------------------------------------------------------------------------------------


def test_train_eval_switch_changes_the_statistics_used(rng):
    bn = rnn.BatchNorm1d(3)
    bn.running_mean[...] = [1.0, -2.0, 0.5]
    bn.running_var[...] = [4.0, 0.25, 1.0]
    x = (rng.standard_normal((16, 3)) * 3 + 5).astype(np.float32)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    bn.eval()
    assert not bn.training
    y_eval = bn(x)
    np.testing.assert_allclose(y_eval, bn_ref(x, rm0, rv0, bn.weight, bn.bias), rtol=1e-5,
                               atol=1e-5)
    assert bn.running_mean.tobytes() == rm0.tobytes()  # eval leaves the running stats alone
    assert int(bn.num_batches_tracked) == 0
    bn.train()
    y_train = bn(x)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(y_train, bn_ref(x, xd.mean(0), xd.var(0), bn.weight, bn.bias),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_train, y_eval)
    assert int(bn.num_batches_tracked) == 1
    # Backward follows the mode: eval is the affine map w·rstd(running_var)·dy.
    bn.eval()
    bn(x)
    gy = np.ones_like(x)
    rv1 = bn.running_var.astype(np.float64)
    np.testing.assert_allclose(bn.backward(gy), np.broadcast_to(1 / np.sqrt(rv1 + 1e-5), x.shape),
                               rtol=1e-6)
    bn.train()
    bn(x)
    np.testing.assert_allclose(bn.backward(gy), 0, atol=1e-6)  # through the batch mean

    # Without tracked statistics, eval also normalizes with the batch statistics (PyTorch).
    bn2 = rnn.BatchNorm1d(3, track_running_stats=False).eval()
    np.testing.assert_allclose(bn2(x), bn_ref(x, xd.mean(0), xd.var(0), 1, 0), rtol=1e-5,
                               atol=1e-5)

    inn = rnn.InstanceNorm1d(3, track_running_stats=True)
    x3 = rng.standard_normal((4, 3, 6)) + 2
    inn(x3)
    assert not np.all(inn.running_mean == 0)
    inn.eval()
    np.testing.assert_allclose(inn(x3), bn_ref(x3, inn.running_mean, inn.running_var, 1, 0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_after_k_steps_closed_form(rng, momentum):
    k = 5
    bn = rnn.BatchNorm2d(3, momentum=momentum, dtype=np.float64)
    batches = [rng.standard_normal((4, 3, 2, 3)) * (i + 1) + i for i in range(k)]
    for xb in batches:
        bn(xb)
    means = np.array([xb.mean(axis=(0, 2, 3)) for xb in batches])
    n = 4 * 2 * 3
    uvars = np.array([xb.var(axis=(0, 2, 3)) * n / (n - 1) for xb in batches])
    if momentum is None:
        # Cumulative average: the plain mean of the k batch statistics (and the initial value
        # weighs nothing once a batch was seen).
        em, ev = means.mean(0), uvars.mean(0)
    else:
        m = momentum
        wts = np.array([m * (1 - m) ** (k - 1 - i) for i in range(k)])
        em = (wts[:, None] * means).sum(0)  # initial mean 0
        ev = (1 - m) ** k * 1.0 + (wts[:, None] * uvars).sum(0)  # initial var 1
    np.testing.assert_allclose(bn.running_mean, em, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.running_var, ev, rtol=1e-12)
    assert bn.num_batches_tracked.shape == () and int(bn.num_batches_tracked) == k


def test_instance_norm_running_stats_closed_form(rng):
    inn = rnn.InstanceNorm2d(2, momentum=0.2, track_running_stats=True, dtype=np.float64)
    xs = [rng.standard_normal((3, 2, 4, 4)) + i for i in range(3)]
    for x in xs:
        inn(x)
    m = 0.2
    em, ev = np.zeros(2), np.ones(2)
    for x in xs:
        em = (1 - m) * em + m * x.mean(axis=(2, 3)).mean(0)
        ev = (1 - m) * ev + m * x.var(axis=(2, 3), ddof=1).mean(0)
    np.testing.assert_allclose(inn.running_mean, em, rtol=1e-12)
    np.testing.assert_allclose(inn.running_var, ev, rtol=1e-12)
    assert int(inn.num_batches_tracked) == 0  # PyTorch never advances it for instance norm


# ---------------------------------------------------------------------------------------------
# Backward and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [
    (lambda: rnn.BatchNorm2d(3, dtype=np.float64), (4, 3, 2, 2)),
    (lambda: rnn.LayerNorm((2, 5), dtype=np.float64), (4, 2, 5)),
    (lambda: rnn.RMSNorm(5, dtype=np.float64), (4, 2, 5)),
    (lambda: rnn.GroupNorm(2, 4, dtype=np.float64), (3, 4, 5)),
    (lambda: rnn.InstanceNorm1d(3, affine=True, dtype=np.float64), (2, 3, 6)),
])
def test_layer_backward_equals_functional_and_accumulates(rng, make, shape):
    layer = make()
    for p in layer.parameters():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(shape)
    layer(x)
    dx = layer.backward(gy)
    w = layer.weight
    b = getattr(layer, "bias", None)
    if isinstance(layer, rnn.BatchNorm2d):
        ref = rn.batch_norm_backward(gy, x, None, None, w, b, True)
    elif isinstance(layer, rnn.LayerNorm):
        ref = rn.layer_norm_backward(gy, x, (2, 5), w, b)
    elif isinstance(layer, rnn.RMSNorm):
        ref = rn.rms_norm_backward(gy, x, 5, w)
    elif isinstance(layer, rnn.GroupNorm):
        ref = rn.group_norm_backward(gy, x, 2, w, b)
    else:
        ref = rn.instance_norm_backward(gy, x, None, None, w, b)
    assert dx.tobytes() == ref.x.tobytes()
    names = [k for k, _ in layer.named_parameters()]
    for name, g in zip(names, layer.grads()):
        assert g.tobytes() == getattr(ref, name).tobytes(), name
    layer(x)
    layer.backward(gy)
    for name, g in zip(names, layer.grads()):
        np.testing.assert_allclose(g, 2 * getattr(ref, name), rtol=1e-15)
    layer.zero_grad()
    assert all(np.all(g == 0) for g in layer.grads())
    assert len(layer.grads()) == len(layer.parameters())


def test_unbatched_instance_norm(rng):
    inn = rnn.InstanceNorm1d(3, affine=True)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    y = inn(x)
    assert y.shape == (3, 7)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    dx = inn.backward(gy)
    assert dx.shape == (3, 7)
    assert y.tobytes() == inn(x[None])[0].tobytes()
    assert dx.tobytes() == inn.backward(gy[None])[0].tobytes()


def test_channels_last_axis(rng):
    x = rng.standard_normal((4, 5, 5, 6)).astype(np.float32)
    a = rnn.BatchNorm2d(6, axis=-1)
    b = rnn.BatchNorm2d(6)
    ya = a(x)
    yb = b(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    assert np.moveaxis(ya, -1, 1).tobytes() == np.ascontiguousarray(yb).tobytes()
    np.testing.assert_array_equal(a.running_var, b.running_var)


def test_layer_errors(rng):
    with pytest.raises(rn.RsnormError, match=r"expected 4D input \(got 3D input\)"):
        rnn.BatchNorm2d(3)(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(rn.RsnormError, match=r"expected 2D or 3D input"):
        rnn.BatchNorm1d(3)(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        rnn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    with pytest.raises(rn.RsnormError, match="divisible"):
        rnn.GroupNorm(4, 6)
    with pytest.raises(rn.RsnormError, match="backward called before a forward"):
        rnn.LayerNorm(3).backward(np.zeros((2, 3)))
    with pytest.raises(rn.ShapeError, match=r"must have shape \(3,\) for an input of shape"):
        rnn.BatchNorm2d(4)(np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        rnn.LayerNorm(3, dtype=np.int32)


def test_attribute_assignment_replaces_parameter(rng):
    ln = rnn.LayerNorm(3)
    ln.weight = np.full(3, 2.0, np.float32)
    assert ln.state_dict()["weight"].tolist() == [2.0, 2.0, 2.0]
    np.testing.assert_allclose(ln(np.float32([[1, 2, 3]])), 2 * rn.layer_norm(
        np.float32([[1, 2, 3]]), 3), rtol=1e-6)
    assert "LayerNorm((3,)" in repr(ln)


# ---------------------------------------------------------------------------------------------
# Channel-mixing layers (present when the build has those ops)
# ---------------------------------------------------------------------------------------------

needs_mixing = pytest.mark.skipif(
    not hasattr(rn, "filter_response_norm_backward"),
    reason="this build has no channel-mixing ops (LRN/FRN/TLU)")


def _fd_layer_check(layer, x, rng):
    """Layer backward (input and every parameter) against central differences of its forward."""
    gy = rng.standard_normal(x.shape)
    layer(x)
    layer.zero_grad()
    dx = layer.backward(gy)
    h = 1e-6

    def loss():
        return float(np.sum(layer(x) * gy))

    for arr, got in [(x, dx)] + list(zip(layer.parameters(), layer.grads())):
        flat = arr.reshape(-1)
        num = np.zeros(flat.size)
        for i in range(flat.size):
            v = flat[i]
            flat[i] = v + h
            p = loss()
            flat[i] = v - h
            m = loss()
            flat[i] = v
            num[i] = (p - m) / (2 * h)
        np.testing.assert_allclose(np.asarray(got).reshape(-1), num, rtol=1e-3, atol=1e-5)


@needs_mixing
def test_mixing_layers_gradcheck_and_state(rng):
    lrn = rnn.LocalResponseNorm(3, alpha=0.5, k=2.0)
    assert lrn.state_dict() == OrderedDict() or list(lrn.state_dict()) == []
    _fd_layer_check(lrn, rng.standard_normal((2, 5, 3)), rng)
    tlu = rnn.TLU(4, dtype=np.float64)
    tlu.tau[...] = rng.standard_normal(4) * 0.3
    assert list(tlu.state_dict()) == ["tau"]
    _fd_layer_check(tlu, rng.standard_normal((3, 4, 5)), rng)
    frn = rnn.FilterResponseNorm(3, learnable_eps=True, dtype=np.float64)
    assert list(frn.state_dict()) == ["weight", "bias", "tau", "learned_eps"]
    frn.weight[...] = rng.uniform(0.5, 1.5, 3)
    frn.bias[...] = rng.standard_normal(3) * 0.1
    frn.tau[...] = -0.5
    _fd_layer_check(frn, rng.standard_normal((2, 3, 4, 2)), rng)
    other = rnn.FilterResponseNorm(3, learnable_eps=True, dtype=np.float64)
    other.load_state_dict(frn.state_dict())
    x = rng.standard_normal((2, 3, 4, 2))
    assert other(x).tobytes() == frn(x).tobytes()
    assert list(rnn.FilterResponseNorm(3, tlu=False).state_dict()) == ["weight", "bias"]


@pytest.mark.skipif(not hasattr(rn, "iter_norm_backward"), reason="no iter_norm in this build")
def test_iter_norm_layer(rng):
    m = rnn.IterNorm(4, num_groups=2, T=3, dtype=np.float64)
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        "weight": (1, 4, 1, 1), "bias": (1, 4, 1, 1), "running_mean": (2, 2, 1),
        "running_wm": (2, 2, 2)}
    m.weight[...] = rng.uniform(0.5, 1.5, (1, 4, 1, 1))
    m.bias[...] = rng.standard_normal((1, 4, 1, 1))
    x = rng.standard_normal((6, 4, 2, 2)) * 2 + 1
    _fd_layer_check(m, x, rng)  # training: through the batch whitening
    assert not np.allclose(m.running_wm, np.eye(2))  # updated by the forwards
    m.eval()
    _fd_layer_check(m, x, rng)  # eval: the fixed running whitening
    other = rnn.IterNorm(4, num_groups=2, T=3, dtype=np.float64).eval()
    other.load_state_dict(m.state_dict())
    assert other(x).tobytes() == m(x).tobytes()
    with pytest.raises(rn.RsnormError, match="expected 4D input"):
        m(x[0])


@pytest.mark.skipif(not hasattr(rn, "gdn_backward"), reason="no gdn in this build")
def test_gdn_layer(rng):
    m = rnn.GDN(3, dtype=np.float64)
    assert list(m.state_dict()) == [
        "beta", "gamma", "beta_reparam.pedestal", "beta_reparam.lower_bound.bound",
        "gamma_reparam.pedestal", "gamma_reparam.lower_bound.bound"]
    beta, gamma = m.effective()
    np.testing.assert_allclose(beta, 1.0, rtol=1e-12)
    np.testing.assert_allclose(gamma, 0.1 * np.eye(3), atol=1e-12)
    m.gamma[...] += rng.uniform(0.01, 0.2, (3, 3))
    x = rng.standard_normal((2, 3, 2, 2))
    _fd_layer_check(m, x, rng)
    for kw in ({"inverse": True}, {"variant": "gdn1"}):
        mk = rnn.GDN(3, dtype=np.float64, **kw)
        mk.load_state_dict(m.state_dict())
        _fd_layer_check(mk, x, rng)


@pytest.mark.parametrize("make,shape", [
    (lambda: rnn.BatchNorm1d(8), (64, 8)),
    (lambda: rnn.LayerNorm(64), (16, 64)),
    (lambda: rnn.GroupNorm(2, 8), (4, 8, 16)),
    (lambda: rnn.InstanceNorm1d(8), (4, 8, 16)),
])
def test_float32_layers_are_exact_far_from_zero(rng, make, shape):
    # float32 statistics would lose ~6e-4 here (the mean's rounding at 1e4); the layers let the
    # backward recompute them in float64 instead.
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    layer = make()
    layer(x)
    dx = layer.backward(gy)
    # The same layer in float64 on the same values.
    r64 = {"BatchNorm1d": lambda: rnn.BatchNorm1d(8, dtype=np.float64),
           "LayerNorm": lambda: rnn.LayerNorm(64, dtype=np.float64),
           "GroupNorm": lambda: rnn.GroupNorm(2, 8, dtype=np.float64),
           "InstanceNorm1d": lambda: rnn.InstanceNorm1d(8, dtype=np.float64)}[type(layer).__name__]()
    r64(x.astype(np.float64))
    expect = r64.backward(gy.astype(np.float64))
    err = np.abs(dx.astype(np.float64) - expect).max() / np.abs(expect).max()
    assert err < 1e-6, err
