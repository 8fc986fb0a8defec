"""A small generated data set a model can learn in minutes on a CPU: coloured shapes on noise.

One generator, three views of the same kind of images:

- classification (mmpretrain ``CustomDataset`` layout): ``cls/{train,val}/<class>/*.png``, one shape
  per image, the label is its class;
- detection / instance segmentation (mmdet ``CocoDataset``): ``det/{train,val}/*.png`` with
  ``det/annotations/{train,val}.json`` (boxes and polygon masks), 1 to 3 shapes per image;
- semantic segmentation (mmseg ``BaseSegDataset``): ``seg/img_dir/{train,val}/*.png`` with label maps
  ``seg/ann_dir/{train,val}/*.png`` (0 background, ``1..C`` the shape classes).

Everything is written atomically (a temporary folder renamed into place), so an interrupted run
never leaves a half-written data set; an existing complete data set is reused. Nothing that was
not generated here is ever deleted: a folder that is not empty and is no generated data set (its
marker file ``.complete``, and nothing but ``cls``, ``det``, ``seg`` beside it) is refused.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ..errors import PathError

CLASSES = ('circle', 'square', 'triangle')
_DONE = '.complete'
_GENERATED = {_DONE, 'cls', 'det', 'seg'}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == 'circle':
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    elif kind == 'square':
        t = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi + angle
    else:
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * np.pi + angle
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).astype(np.float32)


def _background(rng, size):
    base = rng.integers(0, 80, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _draw(rng, size, n_shapes, first_class=None):
    """An image, its shapes as (class index, polygon), and its label map."""
    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    shapes = []
    for j in range(n_shapes):
        cls = int(rng.integers(len(CLASSES))) if j or first_class is None else first_class
        r = rng.uniform(0.12, 0.22) * size if n_shapes > 1 else rng.uniform(0.2, 0.35) * size
        cx, cy = rng.uniform(r, size - r, 2)
        poly = _polygon(CLASSES[cls], cx, cy, r, rng.uniform(0, np.pi / 2))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        pts = np.round(poly).astype(np.int32)
        cv2.fillPoly(img, [pts], color)
        cv2.fillPoly(label, [pts], cls + 1)
        shapes.append((cls, poly))
    return img, shapes, label


def _write_classification(root: Path, rng, split: str, n: int, size: int):
    for i in range(n):
        img, shapes, _ = _draw(rng, size, 1, first_class=i % len(CLASSES))
        folder = root / 'cls' / split / CLASSES[shapes[0][0]]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f'{i:05d}.png'), img)


def _write_detection_and_segmentation(root: Path, rng, split: str, n: int, size: int):
    images, annotations = [], []
    for d in (root / 'det' / split, root / 'seg' / 'img_dir' / split,
              root / 'seg' / 'ann_dir' / split, root / 'det' / 'annotations'):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, shapes, label = _draw(rng, size, int(rng.integers(1, 4)))
        name = f'{i:05d}.png'
        cv2.imwrite(str(root / 'det' / split / name), img)
        cv2.imwrite(str(root / 'seg' / 'img_dir' / split / name), img)
        cv2.imwrite(str(root / 'seg' / 'ann_dir' / split / name), label)
        images.append(dict(id=i, file_name=name, width=size, height=size))
        for cls, poly in shapes:
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            x0, y0 = max(float(x0), 0.0), max(float(y0), 0.0)
            w, h = min(float(x1), size) - x0, min(float(y1), size) - y0
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i, category_id=cls + 1, iscrowd=0,
                bbox=[x0, y0, w, h], area=float(cv2.contourArea(poly)),
                segmentation=[[float(v) for v in poly.reshape(-1)]]))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=c) for i, c in enumerate(CLASSES)])
    with open(root / 'det' / 'annotations' / f'{split}.json', 'w') as f:
        json.dump(coco, f)


def _marker(root: Path):
    """The parameters a data set under ``root`` was generated with, or None if it is none."""
    try:
        params = json.loads((root / _DONE).read_text())
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) and 'classes' in params else None


def _check_replaceable(root: Path) -> None:
    """``root`` may be (re)generated: it does not exist, is an empty folder, or holds a data set
    generated here and nothing else. Else :class:`PathError` naming it (nothing is deleted)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise PathError(f'data root {root} is not a directory')
    entries = {p.name for p in root.iterdir()}
    if not entries:
        return
    if _marker(root) is None:
        raise PathError(f'data root {root} is not empty and holds no generated shapes data set '
                        f'(no {_DONE} marker): choose a new or empty folder')
    foreign = sorted(entries - _GENERATED)
    if foreign:
        raise PathError(f'data root {root} holds {root / foreign[0]}, which was not generated '
                        'here: move it, or choose a new or empty folder')


def make_shapes_dataset(root, num_train: int = 96, num_val: int = 32, size: int = 64,
                        seed: int = 0) -> Path:
    """Generate (or reuse) the shapes data set under ``root``; returns ``root`` as a Path."""
    root = Path(root)
    params = dict(num_train=num_train, num_val=num_val, size=size, seed=seed, classes=CLASSES)
    if _marker(root) == json.loads(json.dumps(params)):
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        for split, n in (('train', num_train), ('val', num_val)):
            _write_classification(tmp, rng, split, n, size)
            _write_detection_and_segmentation(tmp, rng, split, n, size)
        (tmp / _DONE).write_text(json.dumps(params))
        if root.exists() and any(root.iterdir()):  # a data set generated here (checked above)
            shutil.rmtree(root)
        os.replace(tmp, root)  # onto an empty folder, or none
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
