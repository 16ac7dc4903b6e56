"""A small NumPy training loop showing what normalization layers do for training.

The same deep MLP (``depth`` hidden layers of ``width`` units, ReLU, PyTorch's default
``nn.Linear`` initialization) is trained with plain SGD on the same seeded, generated data
(``spirals``: three interleaved 2-D spirals, lifted to 16 features by a fixed random linear map
with badly scaled columns), once per variant:

* ``plain``: Linear → ReLU;
* ``batchnorm``: Linear → :class:`rsnorm.nn.BatchNorm1d` → ReLU;
* ``layernorm``: Linear → :class:`rsnorm.nn.LayerNorm` → ReLU;
* ``groupnorm``: Linear → :class:`rsnorm.nn.GroupNorm` (8 groups) → ReLU.

Every variant starts from the same weights and sees the same mini-batches, so the loss curves
differ only by the normalization layer. With PyTorch's default initialization the signal of a
deep plain ReLU network shrinks layer by layer and SGD barely moves at first; batch norm
re-standardizes every layer, so the same learning rate trains it quickly (Ioffe & Szegedy 2015).

``run(steps=..., seed=..., plot=None)`` returns a dict and, when ``plot`` is a path and
matplotlib is installed, saves a PNG of the curves. ``examples/train_bn.py`` and ``rsnorm demo``
call it.
"""

from __future__ import annotations

import time

import numpy as np

from . import nn

__all__ = ["VARIANTS", "make_data", "run"]

VARIANTS = ("plain", "batchnorm", "layernorm", "groupnorm")


def make_data(n: int = 3000, seed: int = 0, features: int = 16, classes: int = 3):
    """Three interleaved spirals (``classes`` arms) in 2-D with noise, mapped to ``features``
    columns by a fixed random matrix whose columns are scaled from 0.1 to 10, float32."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, classes, n)
    t = rng.uniform(0.0, 1.0, n)
    r = t * 2.0
    ang = k * (2 * np.pi / classes) + t * 3.5 + rng.normal(0.0, 0.15, n)
    pts = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    lift = rng.standard_normal((2, features)) * np.logspace(-1, 1, features)
    x = np.tanh(pts @ rng.standard_normal((2, 2))) @ lift + pts @ lift
    return x.astype(np.float32), k.astype(np.int64)


class Linear:
    """y = x·Wᵀ + b, with PyTorch's default init U(−1/√fan_in, 1/√fan_in) for W and b.

    Products use ``np.einsum`` (NumPy's own loops), not BLAS: these matrices are small, and a
    multi-threaded BLAS on a busy 2-core machine can spin for milliseconds per product; einsum
    is also the same on every machine, so the seeded curves are reproducible.
    """

    def __init__(self, fan_in: int, fan_out: int, rng: np.random.Generator) -> None:
        bound = 1.0 / np.sqrt(fan_in)
        self.weight = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        self.bias = rng.uniform(-bound, bound, fan_out).astype(np.float32)
        self._x = None
        self._g: list[np.ndarray] = []

    def __call__(self, x):
        self._x = x
        return np.einsum("nk,ok->no", x, self.weight) + self.bias

    def backward(self, gy):
        self._g = [np.einsum("no,nk->ok", gy, self._x), gy.sum(axis=0)]
        return np.einsum("no,ok->nk", gy, self.weight)

    def parameters(self):
        return [self.weight, self.bias]

    def grads(self):
        return self._g

    def zero_grad(self):
        self._g = []

    def train(self, mode=True):
        return self

    def eval(self):
        return self


class ReLU:
    def __call__(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, gy):
        return gy * self._mask

    def parameters(self):
        return []

    def grads(self):
        return []

    def zero_grad(self):
        pass

    def train(self, mode=True):
        return self

    def eval(self):
        return self


def _norm_layer(variant: str, width: int):
    if variant == "batchnorm":
        return nn.BatchNorm1d(width)
    if variant == "layernorm":
        return nn.LayerNorm(width)
    if variant == "groupnorm":
        return nn.GroupNorm(8, width)
    return None


def build(variant: str, depth: int, width: int, features: int, classes: int, seed: int):
    """The MLP for ``variant``; the Linear weights depend only on ``seed``."""
    rng = np.random.default_rng(seed)
    layers = []
    fan_in = features
    for _ in range(depth):
        layers.append(Linear(fan_in, width, rng))
        norm = _norm_layer(variant, width)
        if norm is not None:
            layers.append(norm)
        layers.append(ReLU())
        fan_in = width
    layers.append(Linear(fan_in, classes, rng))
    return layers


def _softmax_xent(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    g = p
    g[np.arange(n), labels] -= 1.0
    return float(loss), (g / n).astype(np.float32)


def _forward(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def _train_one(variant, x, y, *, steps, lr, batch, depth, width, classes, seed):
    layers = build(variant, depth, width, x.shape[1], classes, seed)
    rng = np.random.default_rng(seed + 1)  # the same batches for every variant
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        logits = _forward(layers, x[idx])
        loss, g = _softmax_xent(logits, y[idx])
        losses.append(loss)
        for layer in reversed(layers):
            g = layer.backward(g)
        for layer in layers:
            for p, gp in zip(layer.parameters(), layer.grads()):
                p -= np.asarray(lr * gp, dtype=p.dtype)
            layer.zero_grad()
    for layer in layers:
        layer.eval()
    logits = _forward(layers, x)
    final_loss, _ = _softmax_xent(logits, y)
    acc = float((logits.argmax(axis=1) == y).mean())
    return losses, final_loss, acc


def run(steps: int = 300, seed: int = 0, plot: str | None = None, *,
        variants=VARIANTS, lr: float = 0.1, batch: int = 128, depth: int = 6,
        width: int = 64, verbose: bool = True) -> dict:
    """Trains the MLP once per variant and returns::

        {"steps": steps, "seed": seed, "variants": {name: {"losses": [float] * steps,
          "final_loss": float (full data, eval mode), "accuracy": float, "seconds": float}},
         "plot": path or None}

    Prints a table of the loss every ``steps // 10`` steps when ``verbose``. ``plot``: save a
    PNG of the curves there (skipped, with ``"plot": None``, when matplotlib is missing).
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
    classes = 3
    x, y = make_data(seed=seed, classes=classes)
    out: dict = {"steps": steps, "seed": seed, "variants": {}, "plot": None}
    for v in variants:
        t0 = time.perf_counter()
        losses, final, acc = _train_one(v, x, y, steps=steps, lr=lr, batch=batch, depth=depth,
                                        width=width, classes=classes, seed=seed)
        out["variants"][v] = {"losses": losses, "final_loss": final, "accuracy": acc,
                              "seconds": time.perf_counter() - t0}
    if verbose:
        _print_table(out)
    if plot is not None:
        out["plot"] = _plot(out, plot)
    return out


def _smooth(losses, k):
    return float(np.mean(losses[max(0, len(losses) - k):]))


def _print_table(out) -> None:
    names = list(out["variants"])
    steps = out["steps"]
    every = max(1, steps // 10)
    print(f"training a {len(names)}-way comparison, loss (mean of the last {every} steps):")
    print("step".rjust(6) + "".join(n.rjust(12) for n in names))
    for s in range(every, steps + 1, every):
        row = "".join(f"{_smooth(out['variants'][n]['losses'][:s], every):12.4f}" for n in names)
        print(f"{s:6d}{row}")
    print("final".rjust(6) + "".join(f"{out['variants'][n]['final_loss']:12.4f}" for n in names)
          + "   (full data, eval mode)")
    print("acc".rjust(6) + "".join(f"{out['variants'][n]['accuracy']:12.3f}" for n in names))
    print("secs".rjust(6) + "".join(f"{out['variants'][n]['seconds']:12.2f}" for n in names))


def _plot(out, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in out["variants"].items():
        losses = np.asarray(r["losses"])
        k = max(1, len(losses) // 50)
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k, sm, label=name)
    ax.set_xlabel("SGD step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Deep MLP on spirals: with and without normalization (rsnorm.nn)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def cli_hook(rn, args) -> bool:
    """A ``rsnorm demo`` section (``cli.DEMO_EXTRAS.append(demo_train.cli_hook)``): trains every
    variant, prints the curves (and saves ``args.train_plot`` / ``args.plot`` as a PNG when set
    and matplotlib is installed), and passes when batch norm ends below the plain network."""
    del rn
    steps = int(getattr(args, "train_steps", None) or 300)
    plot = getattr(args, "train_plot", None) or getattr(args, "plot", None)
    print()
    r = run(steps=steps, seed=0, plot=plot)
    if r["plot"]:
        print(f"loss curves saved to {r['plot']}")
    v = r["variants"]
    ok = v["batchnorm"]["final_loss"] < v["plain"]["final_loss"]
    print(f"batch norm {'speeds up' if ok else 'did NOT speed up'} training: final loss "
          f"{v['batchnorm']['final_loss']:.4f} vs {v['plain']['final_loss']:.4f} without")
    return ok
