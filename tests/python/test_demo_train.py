"""The training demo (rsnorm.demo_train): batch norm must visibly speed up training."""

from __future__ import annotations

import time

import numpy as np
import pytest
from rsnorm import demo_train


def test_batch_norm_trains_faster_than_plain():
    t0 = time.perf_counter()
    r = demo_train.run(steps=150, seed=0, variants=("plain", "batchnorm"), verbose=False)
    elapsed = time.perf_counter() - t0
    plain, bn = r["variants"]["plain"], r["variants"]["batchnorm"]
    assert len(plain["losses"]) == len(bn["losses"]) == 150
    # Same start: same weights and batch, so the first losses agree closely.
    assert abs(plain["losses"][0] - bn["losses"][0]) < 0.5
    # After the same number of steps, batch norm is far ahead: at most half the loss, on the
    # last 30 training batches and on the full data in eval mode (running statistics).
    assert np.mean(bn["losses"][-30:]) < 0.5 * np.mean(plain["losses"][-30:])
    assert bn["final_loss"] < 0.5 * plain["final_loss"]
    assert bn["accuracy"] > plain["accuracy"] + 0.1
    assert elapsed < 15, f"the demo test took {elapsed:.1f} s"


def test_seeded_runs_repeat_exactly():
    a = demo_train.run(steps=5, seed=3, variants=("layernorm", "groupnorm"), verbose=False)
    b = demo_train.run(steps=5, seed=3, variants=("layernorm", "groupnorm"), verbose=False)
    for v in ("layernorm", "groupnorm"):
        assert a["variants"][v]["losses"] == b["variants"][v]["losses"]
        assert np.isfinite(a["variants"][v]["final_loss"])


def test_prints_table_and_saves_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    r = demo_train.run(steps=10, seed=0, plot=str(path), variants=("plain", "batchnorm"))
    out = capsys.readouterr().out
    assert "batchnorm" in out and "final" in out
    assert r["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        demo_train.run(steps=1, variants=("dropout",))


def test_cli_hook(capsys):
    import argparse

    import rsnorm as rn

    assert demo_train.cli_hook(rn, argparse.Namespace(train_steps=40)) is True
    assert "batch norm speeds up training" in capsys.readouterr().out
