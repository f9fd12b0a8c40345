"""Datasets: the bundled ImageNet sample (``labels.csv``) and ImageFolder trees.

Split convention for the bundled images: even label = calibration pool, odd label =
evaluation split. Images are decoded with the model's timm transform.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from .errors import ConfigError, DataError

__all__ = ["assets_dir", "asset_model_file", "ImageDataset", "load_images", "IMAGE_EXTS", "as_tensor_data",
           "split_calibration", "fitness_part", "resolve_device"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def assets_dir(required: bool = True) -> Path | None:
    """The assets folder: ``$EVOLQ_ASSETS``, else ``../shared/assets`` beside the project
    (or beside the current directory)."""
    env = os.environ.get("EVOLQ_ASSETS")
    cands = [Path(env)] if env else []
    cands += [_PROJECT_ROOT.parent / "shared" / "assets", Path.cwd().parent / "shared" / "assets"]
    for c in cands:
        if (c / "imagenet-sample").is_dir() or (c / "models").is_dir():
            return c
    if required:
        raise DataError("assets not found: set EVOLQ_ASSETS to the folder holding models/ and imagenet-sample/")
    return None


def asset_model_file(name: str) -> Path | None:
    """A weights file in ``assets/models`` whose name starts with the timm model name."""
    root = assets_dir(required=False)
    if root is None or not (root / "models").is_dir():
        return None
    base = name.split(".")[0]
    for f in sorted((root / "models").iterdir()):
        if f.name.startswith(base + ".") and f.suffix in (".safetensors", ".pth", ".pt", ".bin"):
            return f
    return None


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image folder.

    Two layouts are read: a folder with ``labels.csv`` (columns ``file``, ``label``),
    or an ImageFolder tree (one sub-folder per class; class index = sorted order).

    Args:
        root: the folder.
        transform: callable PIL image -> tensor (e.g. timm's eval transform).
        split: ``"all"``, ``"calib"`` (even labels) or ``"eval"`` (odd labels);
            only for the ``labels.csv`` layout.
        limit: keep at most this many images (the first ones, in file order).
    """

    def __init__(self, root, transform=None, split="all", limit=None):
        root = Path(root)
        if not root.exists():
            raise DataError(f"data folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {str(root)!r} is not a folder")
        if split not in ("all", "calib", "eval"):
            raise DataError(f"split must be all, calib or eval, got {split!r}")
        self.root, self.transform = root, transform
        labels_csv = root / "labels.csv"
        if labels_csv.exists():
            items = self._read_csv(labels_csv)
        else:
            items = self._read_tree(root)
        if split == "calib":
            items = [it for it in items if it[1] % 2 == 0]
        elif split == "eval":
            items = [it for it in items if it[1] % 2 == 1]
        if limit is not None:
            if limit < 1:
                raise DataError(f"limit must be positive, got {limit}")
            items = items[:limit]
        if not items:
            raise DataError(f"no labelled images in {str(root)!r} (split {split!r})")
        self.items = items

    def _read_csv(self, path):
        items = []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path} needs the columns 'file' and 'label'")
            for row in reader:
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise DataError(f"{path}: label {row['label']!r} of {row['file']!r} is not an integer") from None
                items.append((self.root / row["file"], label))
        return items

    def _read_tree(self, root):
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        items = []
        for idx, c in enumerate(classes):
            for f in sorted((root / c).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS:
                    items.append((f, idx))
        if not classes:
            loose = [f for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTS]
            if loose:
                raise DataError(f"{str(root)!r} has images but no labels: add labels.csv or one folder per class")
        return items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"image {str(path)!r} listed but missing") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {str(path)!r}: {e}") from None
        x = self.transform(img) if self.transform is not None else img
        return x, label


def load_images(root, transform, split="all", limit=None, progress=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a dataset into one tensor of images and one of labels."""
    ds = ImageDataset(root, transform, split=split, limit=limit)
    xs, ys = [], []
    it = range(len(ds))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"loading {split} images", leave=False)
    for i in it:
        x, y = ds[i]
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


# -- user data as tensors ---------------------------------------------------------
def as_tensor_data(data, name: str = "calibration data") -> torch.Tensor:
    """Turn a tensor, a DataLoader (batches) or a dataset (single samples), each item a
    tensor or an (input, label) pair, into one float tensor of inputs; check it."""
    if isinstance(data, torch.Tensor):
        x = data
    else:
        try:
            parts = [item[0] if isinstance(item, (tuple, list)) else item for item in data]
        except TypeError:
            raise DataError(f"{name} must be a tensor, a dataset or a DataLoader, got {type(data).__name__}") from None
        if not parts:
            raise DataError(f"{name} is empty")
        bad = [type(p).__name__ for p in parts if not isinstance(p, torch.Tensor)]
        if bad:
            raise DataError(f"{name} yields {bad[0]}, expected tensors or (tensor, label) pairs")
        batched = isinstance(data, torch.utils.data.DataLoader)
        shapes = {tuple(p.shape[1:] if batched else p.shape) for p in parts}
        if len(shapes) > 1:
            raise DataError(f"{name} has inconsistent sample shapes: {sorted(shapes)[:3]}")
        x = torch.cat(parts) if batched else torch.stack(parts)
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{name} is empty")
    if not x.is_floating_point():
        raise DataError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or inf values")
    return x.float()


def fitness_part(x: torch.Tensor, search) -> torch.Tensor:
    """The part of ``x`` a search with ``search`` (a ``SearchConfig``) fits on: calibrate a
    ``QModel`` on this before passing it to ``quantize_model`` (the rest is its hold-out)."""
    return split_calibration(x, search.holdout, search.seed)[0]


def split_calibration(x: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split into (fitness set, hold-out set)."""
    n = x.shape[0]
    n_hold = int(round(n * holdout))
    if holdout > 0 and n_hold == 0 and n >= 2:
        n_hold = 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return x[perm[n_hold:]], x[perm[:n_hold]]


def resolve_device(name) -> torch.device:
    try:
        dev = torch.device(name)
        torch.zeros(1, device=dev)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ConfigError(f"device {name!r} is not usable here ({first})") from None
    return dev
