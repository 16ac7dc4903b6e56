"""WGSL sources of :mod:`rsnorm.gpu`, loaded through :mod:`importlib.resources`.

Each shader is a plain ``.wgsl`` file with a header comment listing its bindings and dispatch
shape. :func:`load_wgsl` returns the text once per process; :func:`shader_source` prepends the
storage-dtype prelude (``alias T = f32`` or ``f16`` plus ``to_t``) and ``common.wgsl``. That alias
is the only text substitution: everything else is set through WGSL ``override`` constants.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["load_wgsl", "shader_source"]

_PRELUDE_F32 = """\
alias T = f32;
fn to_t(v: f32) -> T {
    return v;
}
"""

# f32 -> f16 of a value outside the f16 range is indeterminate in WGSL, so overflow is made
# explicit:
# 65520 is the first value that rounds to infinity under round-to-nearest, and a run-time f16
# product 65504 * 2 overflows to infinity. NaN converts to NaN on every backend we know.
_PRELUDE_F16 = """\
enable f16;
alias T = f16;
fn to_t(v: f32) -> T {
    if (abs(v) >= 65520.0 && (bitcast<u32>(v) & 0x7fffffffu) <= 0x7f800000u) {
        let m = f16(select(65504.0, -65504.0, v < 0.0));
        return m * f16(2.0);
    }
    return f16(v);
}
"""


@functools.cache
def load_wgsl(name: str) -> str:
    """Return the text of ``<name>.wgsl`` shipped in this package (read once, then cached)."""
    return resources.files(__name__).joinpath(f"{name}.wgsl").read_text(encoding="utf-8")


@functools.cache
def shader_source(name: str, storage: str) -> str:
    """Full source of shader ``name`` for storage dtype ``storage`` (``"f32"`` or ``"f16"``)."""
    if storage == "f32":
        prelude = _PRELUDE_F32
    elif storage == "f16":
        prelude = _PRELUDE_F16
    else:
        raise ValueError(f"unknown storage dtype {storage!r}")
    return prelude + load_wgsl("common") + load_wgsl(name)
