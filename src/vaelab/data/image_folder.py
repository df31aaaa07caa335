"""Any folder of images as a LightningDataModule.

Files are decoded once (in parallel), converted to `channels` x `image_size`^2 uint8 and kept in a
cache file beside the images, keyed by the file list, their sizes and mtimes and the transform: a
second run, and every epoch, reads tensors, never images. Small sets are held in memory, large
ones are served from the memory-mapped cache file.
"""

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from vaelab.data.tensor_images import TensorDataModule, TensorImages
from vaelab.errors import BadValue, MissingFile, Unwritable

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
UNREADABLE = -1  # label of a file that failed to decode (dropped)


def find_images(root: Path) -> list[Path]:
    """Image files under root (by extension, any depth, hidden files and folders skipped).
    Folder links are not followed (no loops); a file link that leads nowhere (dangling, or a
    loop) is skipped with a warning."""
    files, broken = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in EXTENSIONS:
                continue
            (files if path.is_file() else broken).append(path)
    if broken:
        log.warning("%d links in %s lead to no file and were skipped, e.g. %s", len(broken),
                    root, ", ".join(ascii(str(p)) for p in broken[:5]))
    return files


def user_cache_dir(root: Path) -> Path:
    """Where a read-only folder's decoded tensors go: the user's cache, one folder per path."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:16]
    return base / "vaelab" / "image_folders" / digest


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def save_atomically(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as file:
        np.save(file, array)
    os.replace(partial, path)


def to_mode(image: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """RGB or L, with transparency composited onto `background` and 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def decode(path: Path, size: int, channels: int, background) -> np.ndarray | None:
    """One file as a uint8 [C, size, size] array (resized and centre-cropped), or None."""
    try:
        with Image.open(path) as image:
            image.load()
            square = ImageOps.fit(to_mode(image, channels, background), (size, size),
                                  Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    array = np.asarray(square, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode_many(args) -> list[np.ndarray | None]:
    paths, size, channels, background = args
    return [decode(p, size, channels, background) for p in paths]


def stable_split(relative: str, seed: int, fractions: tuple[float, float]) -> str:
    """train / val / test from a hash of the file's own path: adding files elsewhere never moves
    a file to another split."""
    # fsencode: the file name's own bytes, also for names that are not valid UTF-8
    digest = hashlib.sha256(f"{seed}:".encode() + os.fsencode(relative)).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    val, test = fractions
    return "val" if u < val else "test" if u < val + test else "train"


class ImageFolderDataModule(TensorDataModule):
    """A directory tree of images. `train/ val/ test/` subfolders are used as the split when
    present, else a seeded, per-file stable split by `val_fraction` / `test_fraction`. Class
    subfolders (below the split folders, if any) become labels 0..K-1 in sorted order; images
    directly in the root get label -1 (no label)."""

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        background: tuple[int, int, int] | list[int] = (255, 255, 255),
        strict: bool = False,
        cache_dir: str | None = None,
        memory_limit_gb: float = 4.0,
        decode_workers: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        on_device: bool = True,
        corruption: str | None = None,
        corruption_strength: float = 0.25,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, on_device, corruption,
                         corruption_strength)
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
                and val_fraction + test_fraction < 1):
            raise BadValue(f"data.val_fraction + data.test_fraction must leave training "
                           f"images, got {val_fraction} + {test_fraction}")
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise MissingFile(f"data.path={self.root} is not a folder: point it at a "
                              f"folder of images")
        self.image_size, self.channels = image_size, channels
        self.shape = (channels, image_size, image_size)
        self.fractions = (val_fraction, test_fraction)
        self.background = tuple(int(c) for c in background)
        self.strict = strict
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".vaelab_cache"
        if not cache_dir and not writable_dir(self.cache_dir):
            self.cache_dir = user_cache_dir(self.root)
            log.info("%s is read-only: decoded images are cached in %s (data.cache_dir to "
                     "choose)", self.root, self.cache_dir)
        self.memory_limit = memory_limit_gb * 2**30
        self.decode_workers = decode_workers or os.cpu_count() or 1
        # Fail at once on an empty folder, before any training is set up.
        self.files = find_images(self.root)
        if not self.files:
            raise MissingFile(
                f"data.path={self.root} holds no images ({', '.join(sorted(EXTENSIONS))})")
        _, labels, classes, _ = self._layout()
        self.num_classes = len(classes) or None  # class subfolders; None: no labels
        self.unlabelled = labels.count(-1)  # images directly in the root (label -1)

    def _layout(self) -> tuple[list[str], list[int], list[str], list[str]]:
        """Per file: its split, label; and the class names."""
        rel = [f.relative_to(self.root) for f in self.files]
        explicit = any(r.parts[0] in SPLITS and len(r.parts) > 1 for r in rel)
        splits, inner = [], []
        for r in rel:
            if explicit and r.parts[0] in SPLITS:
                splits.append(r.parts[0])
                inner.append(Path(*r.parts[1:]))
            else:
                splits.append(stable_split(r.as_posix(), self.seed, self.fractions))
                inner.append(r)
        classes = sorted({p.parts[0] for p in inner if len(p.parts) > 1})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.parts[0]] if len(p.parts) > 1 else -1 for p in inner]
        return splits, labels, classes, [r.as_posix() for r in rel]

    def _cache_key(self, names: list[str]) -> str:
        stats = [(n, f.stat().st_size, f.stat().st_mtime_ns) for n, f in zip(names, self.files,
                                                                         strict=True)]
        spec = {"files": stats, "size": self.image_size, "channels": self.channels,
                "background": self.background, "version": 1}
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]

    def _decode_all(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, C, S, S] (memory-mapped from the cache file) and an ok-mask [N]."""
        key = self._cache_key(names)
        images_path = self.cache_dir / f"{key}.npy"
        ok_path = self.cache_dir / f"{key}.ok.npy"
        if images_path.is_file() and ok_path.is_file():
            try:
                return np.load(images_path, mmap_mode="c"), np.load(ok_path)
            except (OSError, ValueError, EOFError) as err:
                log.warning("the cache %s is damaged (%s); decoding the images again",
                            images_path, err)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Unwritable(f"cannot write the decoded-image cache {self.cache_dir} ({err}); set "
                             f"data.cache_dir to a writable folder") from err
        n, shape = len(self.files), self.shape
        partial = images_path.with_suffix(f".{os.getpid()}.partial.npy")
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                           shape=(n, *shape))
        ok = np.zeros(n, dtype=bool)
        chunk = 64
        jobs = [(self.files[i:i + chunk], self.image_size, self.channels, self.background)
                for i in range(0, n, chunk)]
        with ProcessPoolExecutor(min(self.decode_workers, len(jobs))) as pool:
            for start, arrays in zip(range(0, n, chunk), pool.map(_decode_many, jobs),
                                     strict=True):
                for i, array in enumerate(arrays, start):
                    if array is not None:
                        images[i], ok[i] = array, True
        images.flush()
        del images
        os.replace(partial, images_path)  # never a half-written cache under the real name
        save_atomically(ok_path, ok)
        log.info("decoded %d images from %s into %s", int(ok.sum()), self.root, images_path)
        return np.load(images_path, mmap_mode="c"), ok

    def prepare_data(self):
        self._decode_all(self._layout()[3])  # one process decodes and writes the cache

    def setup(self, stage: str | None = None):
        if hasattr(self, "train_set"):
            return
        splits, labels, self.classes, names = self._layout()
        images, ok = self._decode_all(names)
        bad = [names[i] for i in np.flatnonzero(~ok)]
        if bad:
            message = (f"{len(bad)} of {len(names)} files in {self.root} could not be read as "
                       f"images and were skipped, e.g. {', '.join(ascii(b) for b in bad[:5])}")
            if self.strict:
                raise BadValue(message + " (data.strict=true)")
            log.warning(message)
        if not ok.any():
            raise BadValue(f"data.path={self.root}: none of its {len(names)} image files "
                           f"could be read")
        in_memory = images.nbytes <= self.memory_limit
        tensor = torch.from_numpy(np.array(images) if in_memory else images)
        label_tensor = torch.tensor(labels)
        for i, split in enumerate(SPLITS):
            keep = torch.from_numpy(np.flatnonzero(ok & (np.array(splits) == split)))
            if split == "train" and len(keep) == 0:
                raise BadValue(
                    f"data.path={self.root}: none of its {int(ok.sum())} readable images fell "
                    f"into the training split (the seeded split sends each file to val with "
                    f"probability data.val_fraction={self.fractions[0]} and to test with "
                    f"data.test_fraction={self.fractions[1]}); add images, or set both to 0")
            noise = {"corruption": self.corruption, "fresh_noise": split == "train",
                     "seed": self.seed + i}
            data = TensorImages(tensor[keep], label_tensor[keep], **noise) if in_memory else \
                TensorImages(tensor, label_tensor, rows=keep, **noise)
            if in_memory:
                self.place(data)
            setattr(self, f"{split}_set", data)
