"""CIFAR reading (pickle release, tarball, checksums) and the on-device batch augmentation."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from gradflow import GradflowError
from gradflow.data.cifar import (CIFAR, DeviceCifar, channel_stats, crop_flip, epoch_plan, load_cifar,
                           normalise, write_cifar)


def _arrays(n, seed, k=10):
    r = np.random.default_rng(seed)
    return r.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), r.integers(0, k, n)


@pytest.fixture
def cifar10(tmp_path):
    train, test = _arrays(25, 0), _arrays(7, 1)
    write_cifar(tmp_path, "cifar10", train, test)
    return tmp_path, train, test


def test_writer_matches_the_release_layout(cifar10):
    root, (x, y), _ = cifar10
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    with open(folder / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    assert d["data"].dtype == np.uint8 and d["data"].shape == (5, 3072)
    # row layout of the release: 1024 red, then 1024 green, then 1024 blue values
    assert np.array_equal(d["data"][0, :1024], x[0, 0].ravel())
    assert np.array_equal(d["data"][0, 2048:], x[0, 2].ravel())


@pytest.mark.parametrize("where", ["parent", "folder", "tarball", "tarball_parent"])
def test_reads_folder_and_tarball(tmp_path, where):
    train, test = _arrays(12, 0, 100), _arrays(4, 1, 100)
    made = write_cifar(tmp_path, "cifar100", train, test, tarball=where.startswith("tarball"))
    root = {"parent": tmp_path, "folder": made, "tarball": made, "tarball_parent": tmp_path}[where]
    a = load_cifar("cifar100", root, verify=False)
    assert torch.equal(a.train_x, torch.from_numpy(train[0])) and a.train_y.tolist() == train[1].tolist()
    assert torch.equal(a.test_x, torch.from_numpy(test[0])) and a.num_classes == 100


def test_checksums_are_torchvisions():
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    for name, cls in (("cifar10", cifar.CIFAR10), ("cifar100", cifar.CIFAR100)):
        ours = CIFAR[name]
        assert [list(t) for t in ours["train"]] == cls.train_list
        assert [list(t) for t in ours["test"]] == cls.test_list
        assert ours["meta"] == (cls.meta["filename"], cls.meta["md5"])
        assert (ours["folder"], ours["tarball"]) == (cls.base_folder, cls.filename)


def test_checksum_mismatch_is_a_clear_error(cifar10):
    root, _, _ = cifar10
    with pytest.raises(GradflowError, match="data_batch_1.*md5.*pass --no-verify.*corrupt.*cifar-10-python.tar.gz"):
        load_cifar("cifar10", root)  # synthetic files are not the official release


def test_checksums_pass_when_they_match(cifar10, monkeypatch):
    root, _, _ = cifar10
    folder = root / "cifar-10-batches-py"
    spec = CIFAR["cifar10"]
    md5 = lambda n: hashlib.md5((folder / n).read_bytes()).hexdigest()  # noqa: E731
    patched = dict(spec, train=[(n, md5(n)) for n, _ in spec["train"]],
                   test=[(n, md5(n)) for n, _ in spec["test"]], meta=(spec["meta"][0], md5(spec["meta"][0])))
    monkeypatch.setitem(CIFAR, "cifar10", patched)
    assert len(load_cifar("cifar10", root).train_y) == 25


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(GradflowError, match=f"not found at {tmp_path}.*cifar-10-batches-py"):
        load_cifar("cifar10", tmp_path)


def test_a_missing_data_folder_says_it_is_missing(tmp_path):
    with pytest.raises(GradflowError, match=f"--data {tmp_path / 'nope'}: no such folder.*--synthetic"):
        load_cifar("cifar10", tmp_path / "nope")


def test_missing_file_and_broken_pickle(cifar10):
    root, _, _ = cifar10
    folder = root / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(GradflowError, match="cannot unpickle 'data_batch_3'"):
        load_cifar("cifar10", root, verify=False)
    (folder / "test_batch").unlink()
    with pytest.raises(GradflowError, match="'test_batch' is missing"):
        load_cifar("cifar10", root, verify=False)


def test_labels_out_of_range_are_refused(tmp_path):
    write_cifar(tmp_path, "cifar10", _arrays(5, 0, 100), _arrays(2, 1))
    with pytest.raises(GradflowError, match="outside 0..9"):
        load_cifar("cifar10", tmp_path, verify=False)


# --- augmentation against hand computations ---------------------------------------------

def _by_hand(img, dx, dy, flip, pad=4):
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


def test_crop_flip_matches_a_hand_computation():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    dx, dy = torch.tensor([0, 8, 3, 4, 8, 1]), torch.tensor([0, 8, 5, 4, 0, 7])
    flip = torch.tensor([False, True, True, False, False, True])
    got = crop_flip(x, dx, dy, flip)
    for b in range(6):
        want = _by_hand(x[b].numpy(), int(dx[b]), int(dy[b]), bool(flip[b]))
        assert np.array_equal(got[b].numpy(), want)


def test_crop_flip_matches_torchvision():
    TF = pytest.importorskip("torchvision.transforms.functional")
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    got = crop_flip(x, torch.tensor([2]), torch.tensor([6]), torch.tensor([True]))[0]
    want = TF.hflip(TF.crop(TF.pad(x[0], 4), top=6, left=2, height=32, width=32))
    assert torch.equal(got, want)


def test_normalise_matches_a_hand_computation():
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    mean, std = channel_stats(x)
    a = x.numpy().astype(np.float64) / 255
    m, s = a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(mean.numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), s, rtol=1e-6)
    want = (a - m[None, :, None, None]) / s[None, :, None, None]
    np.testing.assert_allclose(normalise(x, mean, std).numpy(), want, rtol=1e-5, atol=1e-5)


def test_epoch_plan_is_a_seeded_permutation():
    a, b, c = epoch_plan(100, 0, 3), epoch_plan(100, 0, 3), epoch_plan(100, 0, 4)
    assert sorted(a.order.tolist()) == list(range(100))
    assert torch.equal(a.order, b.order) and torch.equal(a.dx, b.dx) and not torch.equal(a.order, c.order)
    assert 0 <= int(a.dx.min()) and int(a.dx.max()) <= 8 and a.flip.any() and not a.flip.all()


def test_processes_split_the_single_process_batch(cifar10):
    root, _, _ = cifar10
    data = DeviceCifar(load_cifar("cifar10", root, verify=False), torch.device("cpu"), seed=5)
    x1, y1 = data.train_batch(epoch=2, index=1, batch_size=8)
    parts = [data.train_batch(epoch=2, index=1, batch_size=8, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    # batch 1 of epoch 2 is positions 8..15 of that epoch's plan, augmented as planned
    plan = epoch_plan(25, 5, 2)
    idx = plan.order[8:16]
    want = crop_flip(data.train_x[idx], plan.dx[8:16], plan.dy[8:16], plan.flip[8:16])
    assert torch.equal(x1, normalise(want, data.mean, data.std)) and torch.equal(y1, data.train_y[idx])
    assert data.iters_per_epoch(8) == 3  # 25 // 8: the partial batch is dropped
