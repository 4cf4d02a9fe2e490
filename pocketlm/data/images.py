"""Image sets for the vision model, read with numpy (and Pillow for image files), no torchvision.

Every loader returns (images uint8 (N, H, W), labels int64 (N,)). The folders are those of
/work/shared/data (each has a README with its source and license):

    mnist_train_5k   5,000 digits, one gzipped CSV (784 pixels then the label per line)
    mnist_test       the official 10,000-digit test set (IDX): evaluation only, never training
    fashion_mnist    60,000 clothing images (IDX): make the validation split from it
    uci_optdigits    5,620 digits as 8x8 counts 0-16 (CSV), scaled here to 0-255
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np

from pocketlm.errors import PocketLMError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_WORDS = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MAX_IMAGE_PIXELS = 4096 * 4096  # a decoded image larger than this is refused (a decompression bomb)


class ImageDataError(PocketLMError):
    pass


def data_root() -> Path:
    """$POCKETLM_SHARED_DATA, else the shared/data folder beside (or above) the checkout."""
    if os.environ.get("POCKETLM_SHARED_DATA"):
        return Path(os.environ["POCKETLM_SHARED_DATA"])
    repo = Path(__file__).resolve().parents[2]
    for base in (repo.parent, repo.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return repo.parent / "shared" / "data"


def _folder(name: str, root) -> Path:
    path = Path(root or data_root()) / name
    if not path.is_dir():
        raise ImageDataError(f"{path}: no such folder (set POCKETLM_SHARED_DATA to the folder holding {name}/)")
    return path


def read_idx(file, magic: int, dims: int) -> np.ndarray:
    """A gzipped IDX file: a big-endian magic number, `dims` sizes, then uint8 data."""
    raw = gzip.open(file).read()
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ImageDataError(f"{file}: not an IDX file with magic {magic:#010x}")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if len(raw) - header != int(np.prod(shape)):
        raise ImageDataError(f"{file}: header says {shape} ({int(np.prod(shape))} bytes), holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_pair(folder: Path, prefix: str):
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, 3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x801, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ImageDataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _csv(file, width: int, pixels: int, scale: float):
    """CSV rows of `pixels` values then the label; images (N, width, width) uint8."""
    opener = gzip.open if str(file).endswith(".gz") else open
    with opener(file, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if rows.shape[1] != pixels + 1:
        raise ImageDataError(f"{file}: expected {pixels + 1} columns per row ({pixels} pixels and a label), got {rows.shape[1]}")
    images = np.clip(rows[:, :pixels] * scale, 0, 255).round().astype(np.uint8).reshape(-1, width, width)
    return images, rows[:, pixels].astype(np.int64)


def load_mnist_train_5k(root=None):
    return _csv(_folder("mnist_train_5k", root) / "mnist_5k.csv.gz", 28, 784, 1.0)


def load_mnist_test(root=None):
    return _idx_pair(_folder("mnist_test", root), "t10k")


def load_fashion_mnist(root=None):
    return _idx_pair(_folder("fashion_mnist", root), "train")


def load_optdigits(split: str = "train", root=None):
    names = {"train": "optdigits.tra", "test": "optdigits.tes"}
    if split not in names:
        raise ImageDataError(f"optdigits split: expected one of {sorted(names)}, got {split!r}")
    return _csv(_folder("uci_optdigits", root) / names[split], 8, 64, 255 / 16)


def split(images, labels, val_fraction: float = 0.1, seed: int = 0):
    """((train images, labels), (val images, labels)): a seeded split, the same share of each class."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        where = rng.permutation(np.flatnonzero(labels == c))
        val[where[:round(len(where) * val_fraction)]] = True
    return (images[~val], labels[~val]), (images[val], labels[val])


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """PNG/JPEG/... bytes -> uint8 array (H, W) for grey or (H, W, 3) for colour. Anything Pillow
    cannot read, or larger than MAX_IMAGE_PIXELS, is an ImageDataError naming the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageDataError(f"{what}: {w}x{h} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels")
            img.load()
            grey = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            return np.asarray(img.convert("L" if grey else "RGB"))
    except UnidentifiedImageError:
        raise ImageDataError(f"{what}: not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageDataError):
            raise
        raise ImageDataError(f"{what}: a corrupt or truncated image ({e})") from None


def decode_data_url(url: str, what: str = "image_url.url") -> np.ndarray:
    """An OpenAI image part's url -> uint8 array. Only `data:image/...;base64,` URLs: a server
    fetches nothing on a client's behalf, so http(s) and every other scheme are refused."""
    import base64
    import binascii

    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else "no scheme"
        raise ImageDataError(f"{what}: only data: URLs (data:image/png;base64,...) are accepted, not {scheme!r}; "
                             f"remote images are not fetched")
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64") or not header.startswith("image/"):
        raise ImageDataError(f"{what}: expected data:image/<type>;base64,<data>, got data:{header[:40]}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDataError(f"{what}: the base64 data is corrupt") from None
    return decode_image(data, what)


def labelled_splits(name: str, seed: int = 0, root=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "val", "test"} -> (images, labels) for one of the recipe's image sets:

        mnist    train/val: mnist_train_5k, 10% held out; test: the official 10,000 (mnist_test)
        fashion  test: a fixed 10% of the 60k (the same for every seed); train/val: the rest, 10% held out

    Tune on "val"; "test" is for the reported figure only."""
    if name == "mnist":
        train, val = split(*load_mnist_train_5k(root), 0.1, seed)
        return {"train": train, "val": val, "test": load_mnist_test(root)}
    if name == "fashion":
        rest, test = split(*load_fashion_mnist(root), 0.1, seed=20261202)
        train, val = split(*rest, 0.1, seed)
        return {"train": train, "val": val, "test": test}
    raise ImageDataError(f"image set: expected 'mnist' or 'fashion', got {name!r}")
