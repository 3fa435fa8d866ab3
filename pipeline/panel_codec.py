"""Backprop panels as int8 codes with a per-panel scale: half of float16's bytes.

A panel's values v are coded as c = round(127 * sign(v) * sqrt(|v| / s)), s the panel's
largest |v|, and decoded as v = s * sign(c) * (c / 127)^2. The square root spends the
codes where panels have most of their values, near zero: a value at 1/50 of the panel's
maximum (where the drawn panels' 99.5th-percentile contrast often lies) is still coded to
about 5 %, and 0 stays exactly 0 (the sign of a signed panel is kept). Norm panels
(v >= 0) use the codes 0..127 the same way.

    codes, scale = encode_panels(panels, panel_dims=3)    # (..., h, w, C) raw panels
    panels = decode_panels(codes, scale)                  # float32, same shape

Pure functions, for the panels stage to store `codes` (int8, gzip, shuffle) and `scale`
(float32, one per panel) and for readers to decode before drawing: on the default job's
panels (features_4 and features_7, guided, guided_norm, deconv) the gzip'd codes take 0.41
of the gzip'd float16 panels, every value within 1/127 of its panel's largest |v|.
`read_panels` is the one reader of stored panels (cards, viewer, toolbox export).
"""

from __future__ import annotations

import h5py
import numpy as np

LEVELS = 127
SCALE = "_scale"  # panels/<name>_scale holds the scales of panels/<name>


def encode_panels(panels: np.ndarray, panel_dims: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 of the panels' shape, scale float32 of the shape less its last
    `panel_dims` axes): each panel over its own largest |v|; an all-zero panel is all 0."""
    v = np.asarray(panels, np.float32)
    axes = tuple(range(v.ndim - panel_dims, v.ndim))
    scale = np.abs(v).max(axis=axes, initial=0.0).astype(np.float32)
    per = scale.reshape(scale.shape + (1,) * panel_dims)
    unit = np.divide(np.abs(v), per, out=np.zeros_like(v), where=per > 0)
    codes = np.sign(v) * np.rint(LEVELS * np.sqrt(np.minimum(unit, 1.0)))
    return codes.astype(np.int8), scale


def decode_panels(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 panels from `encode_panels`' codes and scale."""
    c = np.asarray(codes, np.float32)
    s = np.asarray(scale, np.float32)
    per = s.reshape(s.shape + (1,) * (c.ndim - s.ndim))
    return np.sign(c) * np.square(c / LEVELS) * per


def read_panels(g: h5py.Group, name: str, rows, slots=slice(None), ds: h5py.Dataset | None = None) -> np.ndarray:
    """float32 panels [rows, slots] of layers/<layer>/<name> (e.g. `panels/guided`),
    decoded with `<name>_scale`; a results.h5 written before the codec holds float16
    panels and no scale, read as they are. ds: g[name], opened once by the caller."""
    codes = (g[name] if ds is None else ds)[rows, slots]
    if name + SCALE not in g:
        return np.asarray(codes, np.float32)
    return decode_panels(codes, g[name + SCALE][rows, slots])
