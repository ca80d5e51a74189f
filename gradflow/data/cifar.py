"""CIFAR as uint8 tensors on the device, augmented in whole batches there (airbench style).

Reads the standard python-pickle release of CIFAR-10 and CIFAR-100: the tarball
(``cifar-10-python.tar.gz``) or its extracted folder (``cifar-10-batches-py``),
checking each file's md5 against the list torchvision uses. No DataLoader, no
workers: the whole training set sits on the device as ``uint8 [N, 3, 32, 32]``
(150 MB for CIFAR-10) and each batch is cropped, flipped and normalised there.

The data order and the augmentation of an epoch are drawn from a CPU generator
seeded by ``(seed, epoch)``, so batch ``i`` of epoch ``e`` is the same whatever
the number of processes and whether or not the run was resumed.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradflow.errors import GradflowError

# (folder, tarball, label key, train files, test files, meta file) with torchvision's md5s.
CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py", tarball="cifar-10-python.tar.gz", labels="labels",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", num_classes=10,
        train=[("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
        test=[("test_batch", "40351d587109b95175f43aff81a1287e")],
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")),
    "cifar100": dict(
        folder="cifar-100-python", tarball="cifar-100-python.tar.gz", labels="fine_labels",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", num_classes=100,
        train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
        test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        meta=("meta", "7973b15100ade9c7d40fb424638fde48")),
}


@dataclass
class CifarArrays:
    """One CIFAR release in memory: images uint8 [N, 3, 32, 32], labels int64 [N]."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


def _spec(dataset: str) -> dict:
    if dataset not in CIFAR:
        raise GradflowError(f"dataset={dataset!r} is not one of: {', '.join(CIFAR)}")
    return CIFAR[dataset]


def _where_to_put(dataset: str, root: Path) -> str:
    s = _spec(dataset)
    return (f"put {s['tarball']} (from {s['url']}) or its extracted {s['folder']}/ folder in "
            f"{root}, or pass --download on a machine with internet")


def _find(dataset: str, root: Path):
    """Return ('dir', folder) or ('tar', tarball) for the release under ``root``, else None."""
    s = _spec(dataset)
    first = s["train"][0][0]
    if root.is_file() and tarfile.is_tarfile(root):
        return "tar", root
    for folder in (root, root / s["folder"]):
        if (folder / first).is_file():
            return "dir", folder
    if (root / s["tarball"]).is_file():
        return "tar", root / s["tarball"]
    return None


def _read_files(kind: str, where: Path, names: list[str]) -> dict[str, bytes]:
    if kind == "dir":
        return {n: (where / n).read_bytes() for n in names if (where / n).is_file()}
    out = {}
    with tarfile.open(where) as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and name in names:
                out[name] = tar.extractfile(m).read()
    return out


def load_cifar(dataset: str, root: str | Path, download: bool = False,
               verify: bool = True) -> CifarArrays:
    """Read CIFAR-10/100 from ``root`` (the tarball, its folder, or a folder holding either).

    ``verify`` checks every file's md5 as torchvision does; ``download`` fetches the
    release through torchvision first. Missing or corrupt data raises a
    GradflowError that says where the files should go.
    """
    s, root = _spec(dataset), Path(root).expanduser()
    if download:
        _download(dataset, root)
    if not root.exists():
        raise GradflowError(f"--data {root}: no such folder or file; {_where_to_put(dataset, root)} "
                            "(or train on generated data with --synthetic)")
    found = _find(dataset, root)
    if found is None:
        raise GradflowError(f"{dataset} not found at {root}: {_where_to_put(dataset, root)}")
    kind, where = found
    wanted = s["train"] + s["test"] + [s["meta"]]
    try:
        blobs = _read_files(kind, where, [n for n, _ in wanted])
    except (OSError, tarfile.TarError, EOFError) as e:
        raise GradflowError(f"cannot read {dataset} from {where} ({e}): {_where_to_put(dataset, root)}")
    for name, md5 in wanted:
        if name not in blobs:
            raise GradflowError(f"{dataset} file {name!r} is missing from {where}: "
                                f"{_where_to_put(dataset, root)}")
        if verify and hashlib.md5(blobs[name]).hexdigest() != md5:
            raise GradflowError(f"{dataset} file {name!r} in {where} does not have the official release's "
                                f"md5: for re-packed or subset data that is expected, pass --no-verify "
                                f"(verify_data=False); otherwise the file is corrupt: "
                                f"{_where_to_put(dataset, root)}")
    train = [read_cifar_file(blobs[n], n, s["labels"], where) for n, _ in s["train"]]
    test = [read_cifar_file(blobs[n], n, s["labels"], where) for n, _ in s["test"]]
    arrays = CifarArrays(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
                         torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]),
                         s["num_classes"])
    for y, part in ((arrays.train_y, "train"), (arrays.test_y, "test")):
        if y.numel() and (y.min() < 0 or y.max() >= s["num_classes"]):
            raise GradflowError(f"{dataset} {part} labels in {where} fall outside 0..{s['num_classes'] - 1}: "
                                f"is this the right dataset? {_where_to_put(dataset, root)}")
    return arrays


# The globals the CIFAR python release's pickles name: numpy's array reconstructors
# (numpy 1 and 2 spell the module differently) and, in protocol-2 pickles made by
# Python 3, _codecs.encode for bytes; an empty array's bytes pickle as bytes() (spelt
# __builtin__.bytes in protocol 2), and numpy writes arrays through _frombuffer in
# protocol 5. Each builds data from data; nothing else may be called while unpickling.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("__builtin__", "bytes"), ("builtins", "bytes"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, str, bytes, numbers and numpy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(blob: bytes, name: str, where: Path | str) -> object:
    """Unpickle a CIFAR release file without running code: only the types the release holds.

    Args:
        blob: the file's bytes.
        name: the file's name, for messages.
        where: its folder or tarball, for messages.

    Returns:
        The unpickled object (a dict for every file of the release).

    Raises:
        GradflowError naming what a refused file asked for (``os.system``, ...).
    """
    try:
        return _CifarUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("it asks for"):
            raise GradflowError(
                f"refused to unpickle {name!r} in {where}: {e}, which the CIFAR python release does "
                "not contain (it holds only dicts, lists, str, bytes, ints and numpy uint8 arrays). "
                "The file is not the CIFAR release, or was crafted to run code when loaded; "
                "replace it with the official file") from None
        raise GradflowError(f"cannot unpickle {name!r} in {where} (UnpicklingError: {e}); the file is "
                            "corrupt or not the CIFAR python release") from None
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file fails in many ways)
        raise GradflowError(f"cannot unpickle {name!r} in {where} ({type(e).__name__}: {e}); the file is "
                            "corrupt or not the CIFAR python release") from None


def read_cifar_file(blob: bytes, name: str, label_key: str, where: Path | str) -> tuple[Tensor, Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] from one pickled CIFAR file.

    The file must hold what the release holds: ``data`` a uint8 array [N, 3072]
    (values 0-255, rows red, green, blue planes) and ``label_key`` N integers.
    Anything else (float images in [0, 1], int16, another shape) is refused, not cast.
    """
    d = safe_unpickle(blob, name, where)
    if not isinstance(d, dict):
        raise GradflowError(f"{name!r} in {where} holds a {type(d).__name__}, not the release's dict: "
                            "not a CIFAR python file")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    for key in ("data", label_key):
        if key not in d:
            raise GradflowError(f"{name!r} in {where} has no {key!r} entry (keys: {sorted(map(str, d))}): "
                                "not a CIFAR python file, or the other dataset (--dataset)")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", type(x).__name__)
        raise GradflowError(
            f"{name!r} in {where} holds images of dtype {dtype} and shape {shape}; the CIFAR python "
            "release holds uint8 [N, 3072] (values 0-255, red then green then blue plane per row). "
            "Nothing is cast silently: re-pack the images as uint8 rows (gradflow.data.cifar.write_cifar)")
    if len(x) == 0:
        raise GradflowError(f"{name!r} in {where} is a CIFAR python file that holds no images (data is "
                            "[0, 3072]); the release's files hold 10,000 each: replace it with the official "
                            "file, or re-pack your images (gradflow.data.cifar.write_cifar)")
    try:
        y = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise GradflowError(f"{name!r} in {where}: the {label_key!r} entry is not a list of integers ({e})") from None
    if y.ndim != 1 or len(x) != len(y):
        raise GradflowError(f"{name!r} in {where} holds {len(x)} images but {y.size} labels")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def _download(dataset: str, root: Path) -> None:
    try:
        from torchvision import datasets
    except ImportError:
        raise GradflowError("--download needs torchvision: pip install torchvision, "
                            f"or {_where_to_put(dataset, root)}") from None
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001  (network errors come in many types)
        raise GradflowError(f"downloading {dataset} into {root} failed ({type(e).__name__}: {e}); "
                            f"no internet? {_where_to_put(dataset, root).split(', or')[0]}") from None


def write_cifar(root: str | Path, dataset: str, train: tuple, test: tuple,
                tarball: bool = False) -> Path:
    """Write images (uint8 [N, 3, 32, 32]) and labels in the exact CIFAR pickle layout.

    For tests and synthetic tasks. CIFAR-10 splits the training set over five
    ``data_batch_*`` files as the release does. Returns the folder (or tarball) written.
    """
    s, root = _spec(dataset), Path(root)
    folder = root / s["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    x, y = (np.asarray(t) for t in train)
    chunks = np.array_split(np.arange(len(y)), len(s["train"]))
    parts = [(n, x[i], y[i]) for (n, _), i in zip(s["train"], chunks)]
    parts.append((s["test"][0][0], np.asarray(test[0]), np.asarray(test[1])))
    for name, xi, yi in parts:
        d = {"data": xi.reshape(len(xi), -1).astype(np.uint8), s["labels"]: [int(v) for v in yi],
             "filenames": [f"{i}.png" for i in range(len(yi))], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    names = [f"class_{i}" for i in range(s["num_classes"])]
    key = "label_names" if dataset == "cifar10" else "fine_label_names"
    (folder / s["meta"][0]).write_bytes(pickle.dumps({key: names}, protocol=2))
    if not tarball:
        return folder
    path = root / s["tarball"]
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=s["folder"])
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return path


# --- on the device: whole-batch augmentation ------------------------------------------

def channel_stats(images: Tensor, what: str = "the images") -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images [N, 3, H, W], in [0, 1] units: two [3] tensors.

    Images constant in a channel cannot be normalised (std 0): a GradflowError says so,
    naming ``what`` and the pixel value, before any NaN reaches a model.
    """
    x = images.to(torch.float64) / 255.0
    mean, std = x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).float()
    if len(images) and not bool((std > 0).all()):
        flat = [c for c in range(len(std)) if std[c] == 0]
        raise GradflowError(
            f"{what} are constant in channel(s) {flat} (every pixel "
            f"{[round(float(mean[c]) * 255) for c in flat]} of 255): that is not image data and "
            "cannot be normalised; check --data (a blank or mis-packed file?)")
    return mean, std


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W], (x / 255 - mean) / std per channel."""
    return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def crop_flip(images: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Zero-pad by ``pad``, crop back to H x W at offsets (dy, dx) in [0, 2 pad], flip where ``flip``.

    images [B, C, H, W] (any dtype); dx, dy int64 [B]; flip bool [B]. The crop of
    sample b is padded[b, :, dy[b]:dy[b]+H, dx[b]:dx[b]+W], as torchvision's
    RandomCrop(H, padding=pad) on a zero-padded image.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (dy.view(b, 1) + torch.arange(h, device=images.device)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=images.device))
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols).view(b, 1, 1, w)
    return padded[torch.arange(b, device=images.device).view(b, 1, 1, 1),
                  torch.arange(c, device=images.device).view(1, c, 1, 1), rows, cols]


@dataclass
class EpochPlan:
    """The order and augmentation of one epoch, all [N]: indices, crop offsets, flips."""

    order: Tensor
    dx: Tensor
    dy: Tensor
    flip: Tensor


def epoch_plan(n: int, seed: int, epoch: int, pad: int = 4) -> EpochPlan:
    """Draw epoch ``epoch``'s permutation and augmentation from a CPU generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g).bool()
    return EpochPlan(order, dx, dy, flip)


class DeviceCifar:
    """The dataset on the device; hands out augmented, normalised batches without workers.

    The global batch ``index`` of epoch ``epoch`` is positions
    [index * batch, (index + 1) * batch) of the epoch's order; process ``rank`` of
    ``world`` takes its equal slice of it, so the union over processes is the
    single-process batch. The last partial batch of an epoch is dropped.
    """

    def __init__(self, arrays: CifarArrays, device: torch.device, seed: int = 0,
                 train_subset: int = 0, test_subset: int = 0):
        tx, ty = arrays.train_x, arrays.train_y
        vx, vy = arrays.test_x, arrays.test_y
        if train_subset:
            tx, ty = tx[:train_subset], ty[:train_subset]
        if test_subset:
            vx, vy = vx[:test_subset], vy[:test_subset]
        self.device, self.seed, self.num_classes = device, seed, arrays.num_classes
        self.train_x, self.train_y = tx.to(device), ty.to(device)
        self.test_x, self.test_y = vx.to(device), vy.to(device)
        mean, std = channel_stats(tx, "the training images")
        self.mean, self.std = mean.to(device), std.to(device)
        self._plan: tuple[int, EpochPlan] | None = None

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    def iters_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def train_batch(self, epoch: int, index: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> tuple[Tensor, Tensor]:
        """Augmented float32 images [batch/world, 3, 32, 32] and labels for this process."""
        if self._plan is None or self._plan[0] != epoch:
            p = epoch_plan(self.train_size, self.seed, epoch)
            self._plan = (epoch, EpochPlan(*(t.to(self.device) for t in (p.order, p.dx, p.dy, p.flip))))
        plan = self._plan[1]
        local = batch_size // world
        lo = index * batch_size + rank * local
        pos = slice(lo, lo + local)
        idx = plan.order[pos]
        x = crop_flip(self.train_x[idx], plan.dx[pos], plan.dy[pos], plan.flip[pos])
        return normalise(x, self.mean, self.std), self.train_y[idx]

    def test_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """This process's share of the test set, normalised, in batches: (x, y) pairs."""
        x, y = self.test_x[rank::world], self.test_y[rank::world]
        for i in range(0, len(y), batch_size):
            yield normalise(x[i:i + batch_size], self.mean, self.std), y[i:i + batch_size]


def _synthetic_splits(n_train: int, n_test: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    palette = rng.permutation(np.array(np.meshgrid([30, 130, 230], [30, 130, 230], [30, 130, 230]))
                              .reshape(3, -1).T)[:classes]

    def split(n: int):
        y = rng.integers(0, classes, n)
        noise = rng.normal(0, 20, (n, 3, 32, 32))
        x = np.clip(palette[y][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        return x, y

    return split(n_train), split(n_test)


def synthetic_cifar(root: str | Path, n_train: int = 1024, n_test: int = 256, classes: int = 4,
                    dataset: str = "cifar10", seed: int = 0, tarball: bool = False) -> Path:
    """Write a learnable stand-in for CIFAR in the release's exact format (for tests and smoke runs).

    Class c is a noisy image whose colour is the c-th of ``classes`` well separated
    colours; crops and flips keep it recognisable, so a small net reaches
    near-zero error in a few dozen iterations. Labels use 0 .. classes - 1.
    """
    train, test = _synthetic_splits(n_train, n_test, classes, seed)
    return write_cifar(root, dataset, train, test, tarball=tarball)


SYNTHETIC = dict(n_train=1024, n_test=512, classes=4)  # train --synthetic, --smoke without --data, lesion --synthetic


def synthetic_arrays(n_train: int = 1024, n_test: int = 512, classes: int = 4,
                     dataset: str = "cifar10", seed: int = 0) -> CifarArrays:
    """The images :func:`synthetic_cifar` would write, in memory (``train --synthetic``, ``--smoke``)."""
    (tx, ty), (vx, vy) = _synthetic_splits(n_train, n_test, classes, seed)
    return CifarArrays(torch.from_numpy(tx), torch.from_numpy(ty.astype(np.int64)),
                       torch.from_numpy(vx), torch.from_numpy(vy.astype(np.int64)),
                       _spec(dataset)["num_classes"])
