"""Network dissection: known labels on a hand-wired model, thresholds against numpy, mask
geometry, bad masks, shards and resume."""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import save_image
from test_pipeline import compose_cfg, tiny_model
from pipeline.dissect import EXPONENTS, MANTISSA_BITS, SKETCH_BUCKETS, sketch_counts, thresholds
from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing, to_model_pixels
from pipeline.render.dissection import detectors_per_category, unit_title
from pipeline.runner import run
from pipeline.segmentation import mask_geometry, read_concepts

H, W = 24, 32  # a non-square input
RED, GREEN, SKY = 1, 2, 3
CONCEPTS = "# index name category\n1 red colour\n2 green colour\n3 sky scene\n"


def colour_model(path):
    """1x1 convolution, unit 0 = ReLU(r - g - b), unit 1 = 1 everywhere, unit 2 = ReLU(g - r - b);
    then a 2x2 max pooling (a coarser map that must be upsampled)."""
    inp = keras.Input((H, W, 3))
    x = keras.layers.Conv2D(3, 1, name="colour")(inp)
    x = keras.layers.ReLU(name="relu")(x)
    pooled = keras.layers.MaxPooling2D(2, name="pool")(x)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(pooled))
    kernel = np.array([[1, 0, -1], [-1, 0, 1], [-1, 0, -1]], np.float32)[None, None]
    model.get_layer("colour").set_weights([kernel, np.array([0, 1, 0], np.float32)])
    model.save(path)
    return model


def colour_dataset(root, n=12, seed=0):
    """Grey images with a red and a green rectangle (graded intensities), label PNGs of
    them, a few sky pixels in the even ones; returns the red share of all pixels."""
    rng = np.random.default_rng(seed)
    red_pixels = 0
    for i in range(n):
        image = np.full((H, W, 3), 128, np.uint8)
        mask = np.zeros((H, W), np.uint8)
        for value, channel in ((RED, 0), (GREEN, 1)):
            y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
            h, w = rng.integers(3, 6), rng.integers(3, 6)
            free = mask[y:y + h, x:x + w] == 0
            patch = image[y:y + h, x:x + w]
            colour = np.zeros((h, w, 3), np.uint8)
            colour[..., channel] = rng.integers(120, 256, (h, w))
            patch[free] = colour[free]
            mask[y:y + h, x:x + w][free] = value
        if i % 2 == 0:  # four grey pixels of the even images are sky, an image-level concept
            mask.flat[np.flatnonzero(mask == 0)[:4]] = SKY
        red_pixels += int((mask == RED).sum())
        save_image(root / "images" / f"img{i:02d}.png", image)
        save_image(root / "masks" / f"img{i:02d}.png", mask)
    (root / "concepts.txt").write_text(CONCEPTS)
    return red_pixels / (n * H * W)


def seg_overrides(root, model_path, *extra):
    return ["model=file", f"model.path={model_path}", "model.preprocess=unit", "model.resize=exact",
            "dataset=segmentation", f"dataset.path={root / 'images'}", f"dataset.masks={root / 'masks'}",
            f"dataset.concepts={root / 'concepts.txt'}", "layers=[relu,pool]", "batch_size=5",
            "stages=[dissect]", *extra]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    colour_model(root / "colour.keras")
    share = colour_dataset(root)
    return root, share


def read_layer(run_dir, layer):
    with h5py.File(run_dir / "results.h5", "r") as f:
        g = f[f"layers/{layer}/dissection"]
        out = {k: g[k][()] for k in ("threshold", "iou", "label", "label_iou", "intersection", "unit_area")}
        out["category"] = list(g["category"].asstr()[()])
        out["skipped"] = f["dissection/skipped/image"][()]
        out["reasons"] = list(f["dissection/skipped/reason"].asstr()[()])
        return out


def test_red_unit_labels_red_the_constant_and_green_units_do_not(colours, tmp_path):
    root, share = colours
    # T_k at the red share: the red unit's mask is then where it fires (every red pixel)
    # at the input's resolution (dissect.downsample=1): the red unit's map is the red pixels
    run(compose_cfg(seg_overrides(root, root / "colour.keras", f"dissect.quantile={share}", "dissect.downsample=1")),
        tmp_path / "run")
    t = read_layer(tmp_path / "run", "relu")
    assert t["label"][0] == RED and t["label_iou"][0] > 0.99, (t["label"], t["label_iou"])
    assert t["category"][0] == "colour"
    assert t["iou"][0, GREEN - 1] < 0.05
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:  # sky (a scene): the whole of the 6 even images
        assert f["dissection/label_area"][SKY - 1] == 6 * H * W
    assert 0 < t["intersection"][0, SKY - 1] < t["unit_area"][0]  # the red unit's area in the even images
    assert t["label_iou"][1] < 0.04 and t["category"][1] == ""  # constant: never above its own level
    assert t["label"][2] != RED and t["iou"][2, RED - 1] < 0.05
    coarse = read_layer(tmp_path / "run", "pool")  # a 2x2-pooled map, upsampled: red still, blurred edges
    assert coarse["label"][0] == RED and coarse["label_iou"][0] > 0.3
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:  # the unit card's title words
        assert unit_title(f["layers/relu"], 0) == "  \u00b7  red (IoU 1.00)"
        assert unit_title(f["layers/relu"], 1) == "  \u00b7  no concept (best IoU 0.00)"
        assert detectors_per_category(f["layers/relu"]) == {"colour": 2}  # red and green
    rows = (tmp_path / "run" / "dissection" / "detectors.csv").read_text().splitlines()
    assert rows[:3] == ["layer,category,unique_concepts,detector_units", "relu,colour,2,2", "relu,scene,0,0"]
    assert (tmp_path / "run" / "dissection" / "detectors.png").stat().st_size > 1000


def test_thresholds_match_numpy_quantile_within_the_stated_error(tmp_path):
    rng = np.random.default_rng(3)
    model = tiny_model(tmp_path / "tiny.keras")
    feats = keras.Model(model.inputs, [model.get_layer("conv1").output, model.get_layer("relu2").output])
    x = rng.random((40, 24, 24, 3)).astype(np.float32) * 2 - 1
    for maps in feats(x):
        maps = maps.numpy()
        for q in (0.005, 0.1):
            t, rank_error = thresholds(sketch_counts(tf.constant(maps)).numpy(), q)
            flat = maps.reshape(-1, maps.shape[-1])
            exact = np.quantile(flat, 1 - q, axis=0)
            ordered = np.sort(flat, axis=0)  # the two order statistics numpy interpolates between
            rank = (1 - q) * (len(flat) - 1)
            pair = np.abs(ordered[[int(np.floor(rank)), min(int(np.floor(rank)) + 1, len(flat) - 1)]]).max(axis=0)
            bound = 2.0 ** -MANTISSA_BITS * np.maximum(pair, 2.0 ** -EXPONENTS) + 1e-6
            assert np.all(np.abs(t - exact) <= bound), (t, exact)
            above = (flat > t).mean(axis=0)
            assert np.all(np.abs(above - q) <= rank_error + 1.0 / len(flat))
    # counts add: the sketch of two halves is the sketch of the whole
    whole = sketch_counts(tf.constant(x)).numpy()
    halves = sketch_counts(tf.constant(x[:20])).numpy() + sketch_counts(tf.constant(x[20:])).numpy()
    assert whole.shape == (3, SKETCH_BUCKETS) and np.array_equal(whole, halves)


@pytest.mark.parametrize("size,resize,resize_size", [((20, 30), "shorter", 26), ((30, 20), "shorter", None),
                                                     ((24, 24), "exact", None)])
def test_mask_geometry_lines_up_with_model_input_pixels(size, resize, resize_size):
    spec = Preprocessing(*size, resize=resize, resize_size=resize_size, normalize="unit")
    rng = np.random.default_rng(1)
    labels = np.kron(rng.integers(0, 6, (5, 7)), np.ones((16, 14), np.int64))  # 80x98 in blocks of 16x14
    palette = np.array([[0, 0, 0], [250, 30, 90], [20, 240, 60], [200, 200, 10], [60, 90, 250], [130, 5, 170]],
                       np.uint8)  # no colour a blend of two others
    pixels = to_model_pixels(tf.constant(palette[labels]), spec).numpy().astype(int)
    mapped = mask_geometry(labels, spec)
    assert mapped.shape == size
    exact = (np.abs(pixels[:, :, None, :] - palette[None, None].astype(int)).max(axis=-1) == 0)  # pure block colour
    pure = exact.any(axis=-1)
    assert pure.mean() > 0.3
    assert np.array_equal(exact.argmax(axis=-1)[pure], mapped[pure])


def test_bad_masks_are_recorded_per_image_with_a_reason(colours, tmp_path):
    root, _ = colours
    data = tmp_path / "data"
    colour_dataset(data, n=6, seed=1)
    (data / "masks" / "img00.png").unlink()
    save_image(data / "masks" / "img01.png", np.zeros((H + 1, W), np.uint8))
    save_image(data / "masks" / "img02.png", np.full((H, W), 9, np.uint8))
    (data / "masks" / "img03.png").write_bytes(b"GIF89a not a png")
    run(compose_cfg(seg_overrides(data, root / "colour.keras")), tmp_path / "run")
    t = read_layer(tmp_path / "run", "relu")
    assert list(t["skipped"]) == [0, 1, 2, 3]
    for reason, words in zip(t["reasons"], ("not found", "is 32x25, its image 32x24", "index 9", "not a PNG")):
        assert words in reason, reason
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert f["dissection"].attrs["images"] == 2


def test_a_concept_list_that_does_not_parse_is_one_line(colours, tmp_path):
    root, _ = colours
    bad = tmp_path / "concepts.txt"
    bad.write_text("1 red colour\ntwo green\n")
    with pytest.raises(PipelineError, match="line 2"):
        read_concepts(bad)
    cfg = compose_cfg(seg_overrides(root, root / "colour.keras", f"dataset.concepts={bad}"))
    with pytest.raises(PipelineError, match=r"dataset.concepts=.* line 2 \('two green'\)"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_image_labels_file_labels_whole_images(colours, tmp_path):
    """dataset.image_labels: rows of image path and concept names; each named concept's mask
    is its whole image, a name not in the list skips its image with the reason."""
    from pipeline.segmentation import read_image_labels

    root, _ = colours
    concepts = tmp_path / "concepts.txt"
    concepts.write_text(CONCEPTS + "4 indoor scene\n5 outdoor scene\n6 striped texture\n")
    rows = ["image,labels", "# every image but img05 is indoor; img00 and img01 outdoor too, on a second row"]
    rows += [f"img{i:02d}.png,indoor" for i in range(12) if i != 5]
    rows += ["img00.png,outdoor;striped", "img01.png,outdoor", "img05.png,nowhere", "gone.png,indoor"]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    run(compose_cfg(seg_overrides(root, root / "colour.keras", f"dataset.concepts={concepts}",
                                  f"dataset.image_labels={labels}", "dissect.downsample=1", "layers=[relu]",
                                  "batch_size=12")), tmp_path / "run")
    t = read_layer(tmp_path / "run", "relu")
    assert list(t["skipped"]) == [5] and "line 16: concept 'nowhere' is not in dataset.concepts" in t["reasons"][0]
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert list(f["dissection/label_area"][3:]) == [11 * H * W, 2 * H * W, H * W]
    # indoor is every dissected image: each unit's whole area lies inside it
    assert np.array_equal(t["intersection"][:, 3], t["unit_area"])
    assert np.all(t["intersection"][:, 4] <= t["unit_area"]) and t["unit_area"][0] > 0
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("a/b.jpg\tindoor\tstriped\nc.jpg\toutdoor\n")
    assert read_image_labels(tsv) == {"a/b.jpg": [(1, "indoor"), (1, "striped")], "c.jpg": [(2, "outdoor")]}
    labels.write_text("img00.png,indoor\nimg01.png\n")
    with pytest.raises(PipelineError, match=r"dataset.image_labels=.* line 2 \('img01.png'\)"):
        run(compose_cfg(seg_overrides(root, root / "colour.keras", f"dataset.concepts={concepts}",
                                      f"dataset.image_labels={labels}")), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def single(colours, tmp_path_factory):
    root, _ = colours
    out = tmp_path_factory.mktemp("single") / "run"
    run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[scan,dissect]")), out)
    return out


def tables(run_dir):
    with h5py.File(run_dir / "results.h5", "r") as f:
        return {f"{layer}/{key}": f[f"layers/{layer}/dissection/{key}"][()] for layer in ("relu", "pool")
                for key in ("threshold", "intersection", "unit_area", "iou", "label", "label_iou")}


def test_shards_merge_to_the_unsharded_tables(colours, single, tmp_path):
    root, _ = colours
    whole = tables(single)
    for own in (False, True):  # shards with one set of thresholds; shards that sketch their own
        shards = []
        for i in range(2):
            shards.append(tmp_path / f"shard{own}{i}")
            extra = [] if own else [f"dissect.thresholds={single}"]
            run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[scan,dissect]", "shard.count=2",
                                          f"shard.index={i}", *extra)), shards[-1])
        merged = tmp_path / f"merged{own}"
        run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[merge]",
                                      f"merge.inputs=[{shards[0]},{shards[1]}]")), merged)
        with h5py.File(merged / "results.h5", "r") as f:
            if own:  # the merged sketch is the whole sketch: the same thresholds, no IoU yet
                for layer in ("relu", "pool"):
                    assert np.array_equal(f[f"layers/{layer}/dissection/threshold"][()], whole[f"{layer}/threshold"])
                    assert "iou" not in f[f"layers/{layer}/dissection"]
                continue
            assert f["dissection"].attrs["images"] == 12
            assert f["dissection"].attrs["downsample"] == 2  # null: 2 divides the 24x32 input, the shards' own
        got = tables(merged)
        for key, value in whole.items():
            assert np.array_equal(got[key], value), key
    # a shard run with another quantile: its sums do not add to the others', the merge says which key
    odd = tmp_path / "odd"
    run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[scan,dissect]", "shard.count=2",
                                  "shard.index=1", "dissect.quantile=0.01")), odd)
    with pytest.raises(PipelineError, match=r"shard .*odd dissected with dissect.quantile=0.01, this merge has "
                                            r"dissect.quantile=0.005"):
        run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[merge]",
                                      f"merge.inputs=[{shards[0]},{odd}]")), tmp_path / "refused")


def test_the_default_mask_step_halves_inputs_it_divides():
    from pipeline.dissect import mask_step

    assert mask_step(None, 224, 224) == 2 and mask_step(None, 24, 32) == 2
    assert mask_step(None, 299, 299) == 1 and mask_step(None, 224, 225) == 1  # Inception's 299: the input's own
    assert mask_step(4, 224, 224) == 4
    with pytest.raises(PipelineError, match="dissect.downsample=3 does not divide the 224x224 model input"):
        mask_step(3, 224, 224)


class Interrupted(Exception):
    pass


def test_a_killed_dissection_resumes_from_its_checkpoint_to_identical_tables(colours, single, tmp_path, monkeypatch):
    import pipeline.segmentation as stage

    root, _ = colours
    calls, fail_at = [], [2]  # the second batch of the IoU pass (the thresholds pass reads no mask)

    class Failing(stage.MaskReader):  # the process dies in the IoU pass, one batch committed
        def __call__(self, ids):
            calls.append(len(ids))
            if len(calls) == fail_at[0]:
                raise Interrupted
            return super().__call__(ids)

    overrides = seg_overrides(root, root / "colour.keras", "stages=[scan,dissect]", "checkpoint.batches=1")
    monkeypatch.setattr(stage, "MaskReader", Failing)
    with pytest.raises(Interrupted):
        run(compose_cfg(overrides), tmp_path / "run")
    state = next((tmp_path / "run" / "parts").glob("dissect.*/tally.h5"))
    with h5py.File(state, "r") as f:
        assert f.attrs["position"] == 5 and not f.attrs["finished"]  # one batch of 5 committed
    calls.clear()
    fail_at[0] = None
    run(compose_cfg(overrides), tmp_path / "run")
    assert calls == [5, 2]  # the thresholds kept, the IoU pass resumed at its committed batch
    whole, got = tables(single), tables(tmp_path / "run")
    for key, value in whole.items():
        assert np.array_equal(got[key], value), key



def test_tally_sums_match_numpy_with_either_product(colours, monkeypatch):
    """Intersections and areas of the device pass against numpy's count of the definition,
    for the one-hot product and the segment sum (many concepts), on an upsampled map."""
    from pipeline import dissect
    from pipeline.graph import feature_model

    root, _ = colours
    model = feature_model(keras.models.load_model(root / "colour.keras"), ["pool"])
    spec = Preprocessing(H, W, normalize="unit")
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (6, H, W, 3), dtype=np.uint8)
    pixels[5] = 128  # grey: units 0 and 2 silent, below T everywhere (skipped, not upsampled)
    pixels[4, :, :, 0] = 255 * (np.arange(W) >= W // 2)  # unit 0 peaks in one half only
    labels = rng.integers(0, 4, (6, H, W)).astype(np.int32)  # slot 3: unlabelled
    labels[1][labels[1] == 1] = 3  # images without some concepts: the product keeps only those present
    labels[2][labels[2] < 3] = 0
    labels[3] = 3
    limits = [np.array([0.2037, 0.5013, 0.1071], np.float32)]  # off the grid of k / (255 * 16): no ties
    maps = np.concatenate([model(tf.cast(b, tf.float32) / 255.0) for b in (pixels[:4], pixels[4:])])  # as batched
    up = tf.image.resize(maps, (H, W), method="bilinear").numpy()
    hit = up > limits[0]
    expected = np.stack([[(hit[..., k] & (labels == c)).sum() for c in range(4)] for k in range(3)])
    for budget in (dissect.ONEHOT_BUDGET, 0):
        monkeypatch.setattr(dissect, "ONEHOT_BUDGET", budget)
        tally = dissect.Tally(model, ["pool"], spec, 3, limits=limits)
        assert tally.onehot == (budget > 0)
        tally.update(tf.constant(pixels[:4]), labels[:4, None])
        tally.update(tf.constant(pixels[4:]), labels[4:, None])
        state = tally.state()
        # the unlabelled slot (3) is dropped from the tables; the one-hot product skips it
        assert np.array_equal(state["inter_0"][:, :3], expected[:, :3])
        assert np.array_equal(state["area_0"], hit.sum(axis=(0, 1, 2)))
        assert np.array_equal(state["label_area"], np.bincount(labels.ravel(), minlength=4))
    # dissect.downsample=2: masks sampled at each 2x2 block's centre pixel, maps upsampled to them
    tally = dissect.Tally(model, ["pool"], spec, 3, limits=limits, downsample=2)
    small = labels[:, 1::2, 1::2]
    tally.update(tf.constant(pixels[:4]), small[:4, None])
    tally.update(tf.constant(pixels[4:]), small[4:, None])
    hit = tf.image.resize(maps, (H // 2, W // 2), method="bilinear").numpy() > limits[0]
    expected = np.stack([[(hit[..., k] & (small == c)).sum() for c in range(4)] for k in range(3)])
    assert np.array_equal(tally.state()["inter_0"][:, :3], expected[:, :3])


def test_an_upsampled_map_stays_within_the_skip_margin_of_its_peak():
    """The IoU pass skips a channel whose peak is below T_k by SKIP_MARGIN of its largest
    magnitude: no bilinear value may pass the peak by that much, huge negatives beside it."""
    from pipeline.dissect import SKIP_MARGIN

    rng = np.random.default_rng(1)
    for _ in range(40):
        h, w = rng.integers(2, 30, 2)
        scale = 10.0 ** rng.uniform(-3, 6)
        m = (rng.standard_normal((1, h, w, 8)) * scale * rng.uniform(0, 1, (1, 1, 1, 8))).astype(np.float32)
        m[0, rng.integers(0, h), :, 0] = -scale * 1e3
        up = tf.image.resize(m, tuple(int(v) for v in rng.integers(2, 120, 2)), method="bilinear").numpy()
        excess = (up.max(axis=(0, 1, 2)) - m.max(axis=(0, 1, 2))) / np.abs(m).max(axis=(0, 1, 2))
        assert excess.max() < SKIP_MARGIN / 10, excess

def test_mask_reader_samples_block_centres_and_keeps_order(colours):
    from omegaconf import OmegaConf
    from PIL import Image

    from pipeline.datasets import list_images
    from pipeline.segmentation import MaskReader

    root, _ = colours
    cfg = OmegaConf.create({"kind": "segmentation", "path": str(root / "images"), "masks": str(root / "masks"),
                            "concepts": str(root / "concepts.txt"), "limit": None, "split": None})
    table, spec = list_images(cfg), Preprocessing(H, W, resize="exact", normalize="unit")
    concepts = read_concepts(root / "concepts.txt")
    full, keep, bad = MaskReader(table, cfg, spec, concepts)(np.array([3, 1]))
    half, _, _ = MaskReader(table, cfg, spec, concepts, 2)(np.array([3, 1]))
    cfg.image_level = ["scene"]  # image 0 has sky pixels: the whole image becomes sky, the pixels unlabelled
    lifted, _, _ = MaskReader(table, cfg, spec, concepts)(np.array([0, 1]))
    stored = np.asarray(Image.open(root / "masks" / "img00.png"))
    pixel_plane = np.where((stored == 0) | (stored == SKY), 3, stored - 1)
    assert lifted.shape == (2, 2, H, W) and (lifted[1, 1] == 3).all()  # image 1: one plane, padded
    assert np.array_equal(lifted[0], np.sort([pixel_plane, np.full((H, W), SKY - 1)], axis=0))  # planes per pixel
    stored = np.asarray(Image.open(root / "masks" / "img03.png"))
    assert list(keep) == [0, 1] and not bad
    assert full.shape == (2, 1, H, W)
    assert np.array_equal(full[0, 0], np.where(stored == 0, 3, stored - 1))  # columns; unlabelled: the last slot
    assert np.array_equal(half, full[:, :, 1::2, 1::2])


def rgb_label(numbers: np.ndarray) -> np.ndarray:
    """Broden's label image: number = R + 256 * G."""
    out = np.zeros((*numbers.shape, 3), np.uint8)
    out[..., 0], out[..., 1] = numbers % 256, numbers // 256
    return out


LABEL_CSV = ("number,name,category,frequency,coverage,syns\n0,-,,0,0,\n2,green,,4,1,\n5,street,scene(8),8,1,\n"
             "7,car,object(8);part(1),8,1,\n9,striped,texture(3),3,1,\n300,red-thing,object(8),8,1,\n")


def broden_folder(root, n=8):
    """A Broden-layout folder: images 24x32, label images at half size (12x16, RGB-encoded
    numbers), red and green rectangles on whole 2x2 blocks. Red: object 300 in one file and
    car (7) in a second object file, the first file listed again as a part (a repeat that
    must count once); green: colour 2; every image scene 5, the first three texture 9. Four
    more rows are unusable, one is of the val split. Returns (red, green) pixels in all."""
    rng = np.random.default_rng(5)
    rows, counts = [], np.zeros(2, np.int64)
    for i in range(n):
        image = np.full((H, W, 3), 128, np.uint8)
        numbers = [np.zeros((H // 2, W // 2), np.int64) for _ in range(3)]  # objects 300, 7; colour
        for k, (channel, left) in enumerate(((0, 0), (1, W // 4))):
            y, x = rng.integers(0, 6), left + rng.integers(0, 3)
            h, w = rng.integers(1, 5), rng.integers(1, 5)  # in 2x2 blocks
            image[2 * y:2 * (y + h), 2 * x:2 * (x + w), channel] = rng.integers(120, 256, (2 * h, 2 * w))
            image[2 * y:2 * (y + h), 2 * x:2 * (x + w), [c for c in range(3) if c != channel]] = 0
            counts[k] += 4 * h * w
            for plane, number in ((0, 300), (1, 7)) if k == 0 else ((2, 2),):
                numbers[plane][y:y + h, x:x + w] = number
        save_image(root / "images" / "pics" / f"p{i}.png", image)
        for plane, name in enumerate(("obj", "car", "color")):
            save_image(root / "images" / "pics" / f"p{i}_{name}.png", rgb_label(numbers[plane]))
        rows.append(f"pics/p{i}.png,train,{H},{W},{H // 2},{W // 2},pics/p{i}_color.png,"
                    f"pics/p{i}_obj.png;pics/p{i}_car.png,pics/p{i}_obj.png,,5,{9 if i < 3 else ''}")
    bad = {"missing": ("pics/none.png", ""), "size": ("pics/small.png", ""), "number": ("pics/odd.png", ""),
           "scene": ("", "sky")}
    save_image(root / "images" / "pics" / "small.png", rgb_label(np.zeros((H // 2, W // 2 + 1), np.int64)))
    save_image(root / "images" / "pics" / "odd.png", rgb_label(np.full((H // 2, W // 2), 301)))
    for name, (obj, scene) in bad.items():
        save_image(root / "images" / "pics" / f"{name}.jpg", np.full((H, W, 3), 128, np.uint8))
        rows.append(f"pics/{name}.jpg,train,{H},{W},{H // 2},{W // 2},,{obj},,,{scene},")
    rows.insert(2, f"pics/p0.png,val,{H},{W},{H // 2},{W // 2},,,,,,")
    (root / "index.csv").write_text("image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
                                    + "\n".join(rows) + "\n")
    (root / "label.csv").write_text(LABEL_CSV)
    (root / "c_color.csv").write_text("code,number,name,frequency,coverage\n1,2,green,4,1\n")
    return counts


def test_broden_layout_multi_label_and_image_level_concepts(colours, tmp_path):
    root, _ = colours
    red, green = broden_folder(tmp_path / "broden")
    n, pixels = 8, H * W
    overrides = ["model=file", f"model.path={root / 'colour.keras'}", "model.preprocess=unit", "model.resize=exact",
                 "dataset=segmentation", "dataset.format=broden", f"dataset.path={tmp_path / 'broden'}",
                 "dataset.split=train", "layers=[relu]", "batch_size=5", "stages=[dissect]",
                 f"dissect.quantile={red / (n * pixels)}", "dissect.downsample=1"]
    run(compose_cfg(overrides), tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        d, g = f["dissection"], f["layers/relu/dissection"]
        assert list(d["concept_index"][()]) == [2, 5, 7, 9, 300]
        assert list(d["concept_category"].asstr()[()]) == ["color", "scene", "object", "texture", "object"]
        assert d.attrs["images"] == n
        # R + 256 G decoded, half-size masks laid over the whole image, each of a pixel's
        # labels counted (300 and car on the red pixels), the repeated file once
        assert list(d["label_area"][()]) == [green, n * pixels, red, 3 * pixels, red]
        skipped = dict(zip(d["skipped/image"][()], d["skipped/reason"].asstr()[()]))
        assert sorted(skipped) == [n, n + 1, n + 2, n + 3]  # after the 8 good rows: the val row is not listed
        for i, words in zip(range(n, n + 4), ("not found", "17x12, index.csv says 16x12", "label 301",
                                                  "'sky'")):
            assert words in skipped[i], skipped[i]
        inter, area, iou = g["intersection"][()], g["unit_area"][()], g["iou"][()]
        assert g["label"][0] in (7, 300) and iou[0, 2] == iou[0, 4] > 0.99
        assert inter[0, 2] == inter[0, 4] and g["label"][2] == 2 and iou[2, 0] > 0.9
        # image-level: the whole image is the concept's mask, so the unit's area inside it
        assert inter[0, 1] == area[0] and inter[2, 1] == area[2]
        assert iou[0, 1] == np.float32(area[0] / (n * pixels))
        assert inter[0, 3] <= area[0] and iou[0, 3] == np.float32(inter[0, 3] / (area[0] + 3 * pixels - inter[0, 3]))


@pytest.mark.slow
def test_run_killed_in_the_iou_pass_resumes_to_the_uninterrupted_tables(colours, tmp_path):
    """run.py SIGKILLed once the IoU pass has committed a batch; started again it says where
    it resumes and ends with the tables of an uninterrupted run."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    root, _ = colours
    n = 60
    colour_dataset(tmp_path / "data", n=n, seed=2)
    overrides = seg_overrides(tmp_path / "data", root / "colour.keras", "batch_size=2", "checkpoint.batches=1")
    run(compose_cfg(overrides), tmp_path / "reference")
    run_dir = tmp_path / "killed"
    command = [sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught, deadline = None, time.time() + 180
    while caught is None and time.time() < deadline and proc.poll() is None:
        for state in run_dir.glob("parts/dissect.*/tally.h5"):
            try:
                with h5py.File(state, "r") as f:
                    if 0 < f.attrs["position"] < n and not f.attrs["finished"]:
                        caught = int(f.attrs["position"])
            except (OSError, KeyError):
                pass  # replaced while read
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught is not None, "the IoU pass finished before a checkpoint could be caught"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"dissect: resuming, {n} of {n} images of the thresholds pass already done" in done.stdout
    resumed = re.search(rf"dissect: resuming, (\d+) of {n} images of the IoU pass already done", done.stdout)
    assert resumed and caught <= int(resumed[1]) < n, done.stdout[-2000:]
    whole, got = tables(tmp_path / "reference"), tables(run_dir)
    for key, value in whole.items():
        assert np.array_equal(got[key], value), key
    assert not list(run_dir.glob("parts/dissect.*/*.h5"))


def test_broden_files_that_do_not_parse_are_one_line(tmp_path):
    from pipeline.broden import read_index, read_labels

    with pytest.raises(PipelineError, match=r"index.csv cannot be read .*needs Broden's index.csv"):
        read_index(tmp_path)
    (tmp_path / "index.csv").write_text("image,split,ih,iw\na.jpg,train,1,1\n")
    with pytest.raises(PipelineError, match=r"index.csv has no column sh, sw"):
        read_index(tmp_path)
    (tmp_path / "index.csv").write_text("image,split,ih,iw,sh,sw\na.jpg,train,1,x,1,1\n")
    with pytest.raises(PipelineError, match=r"index.csv row 2: ih, iw, sh, sw are not whole numbers"):
        read_index(tmp_path)
    (tmp_path / "label.csv").write_text("number,name,category\n1,sky,scene(3);object(9)\nten,x,\n")
    with pytest.raises(PipelineError, match=r"label.csv row 3: number 'ten'"):
        read_labels(tmp_path)
    (tmp_path / "label.csv").write_text("number,name,category\n1,sky,scene(3);object(9)\n")
    assert read_labels(tmp_path).categories == ["object"]  # the category counted most
    from omegaconf import OmegaConf

    from pipeline.segmentation import check_segmentation

    both = OmegaConf.create({"format": "broden", "path": str(tmp_path), "image_labels": "labels.csv"})
    with pytest.raises(PipelineError, match="dataset.image_labels is for dataset.format=masks"):
        check_segmentation(both)
