"""Top-k bookkeeping against brute force over all activations, ties included."""

import numpy as np
import tensorflow as tf

from pipeline.topk import TopK, merge_batch, merge_topk, topk_from_maps


def _tied_maps(seed, n=12, h=5, w=4, c=6):
    # few distinct levels -> many ties within and across images
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, size=(n, h, w, c)).astype(np.float32)


def _brute_force(maps, ids, k):
    """Rank every (image, channel) by its spatial max with explicit Python sorting."""
    n, h, w, c = maps.shape
    out = TopK.empty(c, k)
    for ch in range(c):
        rows = []
        for i in range(n):
            m = maps[i, :, :, ch]
            best = m.max()
            y, x = min(zip(*np.nonzero(m == best)))
            rows.append((-best, ids[i], y, x))
        rows.sort()
        for slot, (neg, img, y, x) in enumerate(rows[:k]):
            out.value[ch, slot], out.image[ch, slot], out.y[ch, slot], out.x[ch, slot] = -neg, img, y, x
    return out


def _assert_same(a, b):
    np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.x, b.x)


def test_numpy_reference_matches_explicit_sort_with_ties():
    maps = _tied_maps(0)
    ids = np.arange(len(maps)) * 3 + 5
    _assert_same(topk_from_maps(maps, ids, 4), _brute_force(maps, ids, 4))


def test_fewer_images_than_k_leaves_empty_slots():
    maps = _tied_maps(1, n=3)
    top = topk_from_maps(maps, np.arange(3), 5)
    assert (top.image[:, 3:] == -1).all() and (top.value[:, 3:] == -np.inf).all()
    assert (top.image[:, :3] >= 0).all()


def test_merge_of_shards_equals_top_k_of_union():
    maps = _tied_maps(2, n=20)
    ids = np.arange(20)
    full = topk_from_maps(maps, ids, 5)
    # shards in an interleaved, out-of-order split
    parts = [topk_from_maps(maps[s], ids[s], 5) for s in (slice(1, None, 3), slice(0, None, 3), slice(2, None, 3))]
    merged = merge_topk(merge_topk(parts[0], parts[1]), parts[2])
    _assert_same(merged, full)


def _device_scan(maps, ids, k, batch, order):
    c = maps.shape[-1]
    value = tf.fill((c, k), -np.inf)
    image = tf.fill((c, k), tf.constant(-1, tf.int64))
    pos = tf.fill((c, k), -1)
    for start in range(0, len(order), batch):
        sel = order[start:start + batch]
        value, image, pos, _ = merge_batch(value, image, pos, tf.constant(maps[sel]), tf.constant(ids[sel], tf.int64))
    w = maps.shape[2]
    return TopK(value.numpy(), image.numpy(), (pos.numpy() // w).astype(np.int32), (pos.numpy() % w).astype(np.int32))


def test_device_update_over_batches_equals_brute_force():
    maps = _tied_maps(3, n=23)
    ids = np.arange(23)
    # batches in a shuffled order: the result must not depend on arrival order
    order = np.random.default_rng(0).permutation(23)
    _assert_same(_device_scan(maps, ids, 9, 4, order), _brute_force(maps, ids, 9))
    _assert_same(_device_scan(maps, ids, 3, 7, np.arange(23)), _brute_force(maps, ids, 3))


def test_device_update_takes_lowest_row_major_position_on_ties():
    maps = np.zeros((2, 3, 3, 2), np.float32)
    # image 0, channel 0: max in row 1 at column 2 and in row 2 at column 0
    maps[0, 2, 0, 0] = maps[0, 1, 2, 0] = 7.0
    maps[1, :, :, 0] = 7.0  # image 1: flat at the same value -> ties with image 0, loses on id
    top = _device_scan(maps, np.array([0, 1]), 2, 2, np.array([1, 0]))
    assert list(top.image[0]) == [0, 1]
    assert (top.y[0, 0], top.x[0, 0]) == (1, 2) and (top.y[0, 1], top.x[0, 1]) == (0, 0)
    assert (top.y[1] == 0).all() and (top.x[1] == 0).all()  # all-zero channel: first position
