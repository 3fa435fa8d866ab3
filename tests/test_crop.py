"""Patch cutting: pixels inside the box, placed where the receptive field lies."""

import numpy as np

from pipeline.crop import cut_patches, patch_size, shrink


def test_patches_hold_the_box_pixels_at_their_frame_offset_and_zero_elsewhere():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (3, 20, 20, 3), dtype=np.uint8)  # no zero pixels
    frame = (7, 5)
    boxes = np.array([[4, 6, 11, 11],    # interior: fills the frame
                      [0, 0, 4, 3],      # top-left corner: field runs off the image
                      [16, 17, 20, 20]])  # bottom-right corner
    offsets = np.array([[0, 0], [3, 2], [0, 0]])
    which = np.array([2, 0, 1])
    patches = cut_patches(images, which, boxes, offsets, frame)
    assert patches.shape == (3, 7, 5, 3)
    for e, ((y0, x0, y1, x1), (oy, ox), b) in enumerate(zip(boxes, offsets, which)):
        expected = np.zeros(frame + (3,), np.uint8)
        expected[oy:oy + y1 - y0, ox:ox + x1 - x0] = images[b, y0:y1, x0:x1]
        np.testing.assert_array_equal(patches[e], expected)


def test_patch_size_caps_large_frames_keeping_aspect():
    assert patch_size((40, 30), 64) == (40, 30)
    assert patch_size((224, 224), 64) == (64, 64)
    assert patch_size((200, 100), 50) == (50, 25)
    assert patch_size((224, 224), 0) == (224, 224)


def test_shrink_is_an_area_average():
    patch = np.zeros((1, 4, 4, 3), np.uint8)
    patch[0, :2, :2] = 200  # top-left quarter
    small = shrink(patch, (2, 2))
    assert small[0, 0, 0, 0] == 200 and small[0, 1, 1, 0] == 0
    assert shrink(patch, (1, 1))[0, 0, 0, 0] == 50


def test_outside_image_masks_match_the_cut_and_checker_replaces_only_that():
    from pipeline.render.patches import CHECKER_GREYS, CLIP_EDGE, clip_edge, inside_masks, show_outside

    images = np.full((1, 20, 20, 3), 255, np.uint8)
    frame = (7, 5)
    boxes = np.array([[4, 6, 11, 11], [0, 0, 4, 3], [16, 17, 20, 20]])
    starts = np.array([[0, 0], [3, 2], [0, 0]])
    cut = cut_patches(images, np.zeros(3, int), boxes, starts, frame)
    inside = inside_masks(boxes, starts, frame, frame)
    np.testing.assert_array_equal(inside, cut[..., 0] == 255)  # the cut's own zeros are the outside
    # at half size (the stored or displayed patch), a pixel is inside when its centre is
    big = (14, 10)
    np.testing.assert_array_equal(inside_masks(boxes, starts, frame, big), inside.repeat(2, 1).repeat(2, 2))
    shown = show_outside(cut, inside)
    np.testing.assert_array_equal(shown[inside], cut[inside])
    edge = clip_edge(inside)
    assert (shown[edge] == CLIP_EDGE).all()  # the clipped side outlined, just outside the box
    outside = shown[~inside & ~edge]
    assert set(np.unique(outside)) == set(CHECKER_GREYS)  # no black left: the checker, both greys
    # the outline: outside pixels with an inside 4-neighbour, known for each box
    want = np.zeros((3, 7, 5), bool)  # box 0 fills its frame: nothing clipped
    want[1, 2, 2:5] = want[1, 3:7, 1] = True  # box 1 covers rows 3-6, columns 2-4
    want[2, 4, 0:3] = want[2, 0:4, 3] = True  # box 2 covers rows 0-3, columns 0-2
    np.testing.assert_array_equal(edge, want)


def test_shared_patches_are_stored_once_and_read_back_as_every_slot(tmp_path):
    import h5py

    from pipeline.patch_frames import FRAMES, read_frames, write_patches
    from pipeline.store import WorkDir

    rng = np.random.default_rng(1)
    distinct = rng.integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    which = rng.integers(0, 5, (10, 3))  # 30 slots, 5 distinct (image, location, box)
    which[0] = [0, 4, 0]  # unit 0 shows two frames far apart: read one by one, not as a range
    keys = np.concatenate([which[..., None], np.zeros((10, 3, 6), np.int64)], axis=-1)
    out = distinct[which]
    work = WorkDir(tmp_path / "crop.work", "crop", {})
    with work.write(work.chunk_name(0)) as f:  # units 0-6 of conv in one chunk, 7-9 in the next
        write_patches(f, "conv", "patches", out[:7], keys[:7])
        plain = out[:7].copy()
        plain[0, 0, 0, 0, 0] ^= 1  # a slot that disagrees with its twins: nothing is shared
        write_patches(f, "other", "patches", plain, keys[:7])
    with work.write(work.chunk_name(1)) as f:
        write_patches(f, "conv", "patches", out[7:], keys[7:])
        write_patches(f, "other", "patches", out[7:], keys[7:])
    with h5py.File(tmp_path / "crop.h5", "w") as f:  # the stage's part over its chunks, as run() builds it
        work.assemble(f, skip=(FRAMES,))
    with h5py.File(tmp_path / "crop.h5", "r") as f:
        assert FRAMES not in f
        np.testing.assert_array_equal(f["layers/conv/patches"][()], out)
        np.testing.assert_array_equal(f["layers/conv/patches"][2:4, 1], out[2:4, 1])
        np.testing.assert_array_equal(f["layers/other/patches"][:7], plain)
        # read back as distinct frames and which slot shows which, across the chunk boundary
        for c0, c1, s0, s1 in ((0, 10, 0, 3), (2, 9, 1, 3), (7, 10, 0, 5), (3, 4, 2, 3), (0, 1, 0, 3)):
            frames, index = read_frames(f["layers/conv/patches"], c0, c1, s0, s1)
            np.testing.assert_array_equal(frames[index], out[c0:c1, s0:s1])
            assert len(frames) <= len(np.unique(which[c0:7, s0:s1])) + len(np.unique(which[7:c1, s0:s1]))
        assert read_frames(f["layers/other/patches"], 0, 10, 0, 3) is None  # one chunk stored it plainly
    with h5py.File(work.path / work.chunk_name(0), "r") as f:
        assert f[f"{FRAMES}/conv/patches"].shape[0] == len(np.unique(which[:7]))
        assert f["layers/conv/patches"].is_virtual and not f["layers/other/patches"].is_virtual
