"""Train a deep NumPy MLP with and without normalization layers and compare the loss curves.

    python examples/train_bn.py [--steps 300] [--seed 0] [--plot curves.png]

The network, data and loop are in :mod:`rsnorm.demo_train` (plain NumPy: Linear layers,
ReLU, softmax cross-entropy, SGD) with :mod:`rsnorm.nn` layers for the normalization. Every
variant starts from the same weights and sees the same batches, so the curves differ only by
the normalization layer. ``rsnorm demo`` runs the same comparison.
"""

from __future__ import annotations

import argparse

from rsnorm.demo_train import VARIANTS, run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="save the loss curves as a PNG here")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()
    r = run(steps=args.steps, seed=args.seed, plot=args.plot, variants=tuple(args.variants))
    if args.plot and r["plot"] is None:
        print("matplotlib is not installed: no plot saved")
    elif r["plot"]:
        print(f"loss curves saved to {r['plot']}")
    v = r["variants"]
    if "plain" in v and "batchnorm" in v:
        print(f"final loss without / with batch norm: {v['plain']['final_loss']:.4f} / "
              f"{v['batchnorm']['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
