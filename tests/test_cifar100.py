"""The cifar100 loader on a tiny archive in the exact cifar-100-python layout."""
import pickle

import numpy as np
import pytest
import torch

from weightgen.data import DatasetError, load_dataset


def write_cifar100(root, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, size=n)
        with open(d / name, "wb") as f:
            pickle.dump({b"filenames": [], b"batch_label": name.encode(), b"fine_labels": fine.tolist(),
                         b"coarse_labels": (fine // 5).tolist(),
                         b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f, protocol=2)
    return d


def test_fine_coarse_and_class_subsets(tmp_path, monkeypatch):
    d = write_cifar100(tmp_path)
    monkeypatch.setenv("WEIGHTGEN_DATA", str(tmp_path))
    fine = load_dataset("cifar100")
    assert fine.num_classes == 100 and fine.x_train.shape == (60, 3, 32, 32) and fine.class_names[7] == "fine7"
    with open(d / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert torch.equal(fine.x_train[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32) / np.float32(255)))
    coarse = load_dataset(f"cifar100:labels=coarse;dir={d}")
    assert coarse.num_classes == 20 and torch.equal(coarse.y_train, fine.y_train // 5)
    sub = load_dataset("cifar100:labels=coarse;classes=3,1")
    assert sub.class_names == ["coarse3", "coarse1"] and set(sub.y_train.tolist()) <= {0, 1}


def test_bad_cifar100_inputs_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTGEN_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="CIFAR-100 not found"):
        load_dataset("cifar100")
    write_cifar100(tmp_path)
    with pytest.raises(DatasetError, match="labels must be fine or coarse"):
        load_dataset("cifar100:labels=medium")
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        load_dataset("cifar100:labels=coarse")
