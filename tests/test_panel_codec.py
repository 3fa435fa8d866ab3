"""int8 panel codes with a per-panel scale (pipeline.panel_codec): known answers."""

import io

import h5py
import numpy as np

from pipeline.panel_codec import LEVELS, decode_panels, encode_panels, read_panels


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


def test_read_panels_decodes_stored_codes_and_reads_float16_files_as_they_are():
    rng = np.random.default_rng(2)
    panels = rng.normal(size=(3, 4, 5, 5, 3)).astype(np.float32)
    with h5py.File(io.BytesIO(), "w") as f:
        codes, scale = encode_panels(panels)
        f["new/panels/guided"], f["new/panels/guided_scale"] = codes, scale
        f["old/panels/guided"] = panels.astype(np.float16)  # a results.h5 from before the codec
        got = read_panels(f["new"], "panels/guided", slice(1, 3), slice(0, 2))
        np.testing.assert_array_equal(got, decode_panels(codes, scale)[1:3, :2])
        assert (np.abs(got - panels[1:3, :2]) <= scale[1:3, :2, None, None, None] / LEVELS + 1e-7).all()
        np.testing.assert_array_equal(read_panels(f["old"], "panels/guided", 2, 1), panels[2, 1].astype(np.float16))


def test_drawn_panels_are_drawn_from_the_decoded_values():
    """layer_patches (cards, viewer, toolbox export) draws the float panels, not their codes:
    a graded panel drawn from its codes would be brighter at mid values (sqrt coding)."""
    from pipeline.render.patches import layer_patches, panel_image

    ramp = np.linspace(-1.0, 1.0, 6 * 6 * 3, dtype=np.float32).reshape(6, 6, 3) ** 3  # mid values matter
    panels = np.stack([np.stack([ramp * (c + 1), ramp[::-1] * 1e-4]) for c in range(2)])  # (2, 2, 6, 6, 3)
    with h5py.File(io.BytesIO(), "w") as f:
        g = f.create_group("layers/conv")
        g["topk/image"] = np.zeros((2, 2), np.int64)
        g["panels/deconv"], g["panels/deconv_scale"] = encode_panels(panels)
        drawn = layer_patches(g, "panels/deconv", 0, 2, 2, (6, 6))
        codes = g["panels/deconv"][()].astype(np.float32)
    assert np.abs(drawn.astype(int) - panel_image(panels)).max() <= 2  # within the codec's bound
    assert np.abs(drawn.astype(int) - panel_image(codes)).max() > 20
