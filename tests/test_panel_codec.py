"""int8 panel codes with a per-panel scale (pipeline.panel_codec): known answers."""

import io

import h5py
import numpy as np

from pipeline.panel_codec import LEVELS, decode_panels, encode_panels


def test_round_trip_within_half_a_code_of_each_panels_own_scale():
    rng = np.random.default_rng(0)
    panels = rng.normal(size=(4, 9, 11, 11, 3)).astype(np.float32)
    panels[1] *= 1e-6  # a tiny panel beside large ones keeps its own precision
    panels[2] *= 1e4
    panels[3, 5] = 0.0  # an all-zero panel
    codes, scale = encode_panels(panels, panel_dims=3)
    assert codes.dtype == np.int8 and codes.shape == panels.shape
    assert scale.shape == (4, 9) and scale.dtype == np.float32
    np.testing.assert_allclose(scale, np.abs(panels).max(axis=(2, 3, 4)))
    back = decode_panels(codes, scale)
    err = np.abs(back - panels).max(axis=(2, 3, 4))
    assert (err <= scale / LEVELS + 1e-12).all()  # the largest step of the square-root code, halved
    assert (back[3, 5] == 0).all() and scale[3, 5] == 0
    assert (np.sign(back) == np.sign(np.where(codes == 0, 0, panels))).all()  # signs kept
    assert codes.max() == LEVELS and codes.min() == -LEVELS  # each panel's extreme is the extreme code


def test_small_values_keep_their_relative_precision():
    """A value at 1/50 of the panel's maximum, where the drawn panels' contrast often lies, to 6 %."""
    values = np.array([[1.0, 0.02, -0.02, 0.005, 0.0]], np.float32)
    codes, scale = encode_panels(values, panel_dims=1)
    back = decode_panels(codes, scale)[0]
    np.testing.assert_allclose(back[:3], [1.0, 0.02, -0.02], rtol=0.06)
    assert back[4] == 0.0 and 0 < back[3] < 0.01


def test_norm_panels_use_the_positive_codes_and_gzip_well_below_float16():
    rng = np.random.default_rng(1)
    sparse = np.abs(rng.normal(size=(8, 9, 40, 40))).astype(np.float32) * (rng.random((8, 9, 40, 40)) < 0.3)
    codes, scale = encode_panels(sparse, panel_dims=2)
    assert codes.min() == 0 and codes.max() == LEVELS

    def stored(a):
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            f.create_dataset("x", data=a, compression="gzip", shuffle=True, chunks=(1,) + a.shape[1:])
        return len(buf.getvalue())

    # random values (incompressible mantissas): 0.53 of float16; real panels of the default job: 0.41
    assert stored(codes) + scale.nbytes < 0.6 * stored(sparse.astype(np.float16))
