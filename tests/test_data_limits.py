"""A user's `npz:` and `folder:` data: memory bounded by what the files declare, clear errors."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from weightgen.cli import main
from weightgen.data import DatasetError, load_dataset


def test_npz_that_inflates_past_the_limit_is_refused_before_inflating(tmp_path, monkeypatch, capsys):
    """1.1 MB of .npz expanding to 1 GiB took 3.5 GB through the CLI (HTTP already capped it)."""
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((512, 1024), np.float32), y=np.arange(512) % 2)  # 2 MiB inflated
    assert path.stat().st_size < 100_000
    monkeypatch.setenv("WEIGHTGEN_MAX_DATASET_BYTES", str(1 << 20))
    with pytest.raises(DatasetError, match="uncompressed, over the 1048576-byte limit.*WEIGHTGEN_MAX_DATASET_BYTES"):
        load_dataset(f"npz:{path}")
    rc = main(["sample", "--arch", "mlp-s", "--dataset", f"npz:{path}", "--out", str(tmp_path / "o")])
    assert rc == 2 and "over the 1048576-byte limit" in capsys.readouterr().err
    monkeypatch.setenv("WEIGHTGEN_MAX_DATASET_BYTES", str(4 << 20))
    assert load_dataset(f"npz:{path}").x_train.shape[1] == 1024


def _png_header_only(path, width, height):
    """A PNG that declares width x height and holds no pixel data: what a decoder sees first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def _folder(root, size=(8, 8), n=2):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full(size[::-1], 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_folder_images_are_checked_from_their_headers(tmp_path, monkeypatch):
    from weightgen.data import folder

    root = tmp_path / "imgs"
    _folder(root)
    assert load_dataset(f"folder:{root}").input_shape == (1, 8, 8)
    # every header is checked before the first image is decoded
    monkeypatch.setattr(folder, "_pixels", lambda *a, **k: pytest.fail("an image was decoded before the limits held"))
    monkeypatch.setenv("WEIGHTGEN_MAX_IMAGE_PIXELS", "50")
    with pytest.raises(DatasetError, match="64 pixels, over the limit of 50 per image"):
        load_dataset(f"folder:{root}")
    monkeypatch.delenv("WEIGHTGEN_MAX_IMAGE_PIXELS")
    _png_header_only(root / "a" / "huge.png", 20_000, 20_000)  # 400 MP: crashed PIL (DecompressionBombError)
    with pytest.raises(DatasetError, match="huge.png.*(pixels, over the limit|decompression-bomb)"):
        load_dataset(f"folder:{root}")
    _png_header_only(root / "a" / "huge.png", 12_000, 12_000)  # 144 MP: decoded to 3.6 GB
    with pytest.raises(DatasetError, match="144,000,000 pixels, over the limit"):
        load_dataset(f"folder:{root}")


def test_folder_that_would_decode_past_the_limit_suggests_resizing(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _folder(root, size=(64, 64), n=3)  # 6 images x 64 x 64 x 4 bytes = 98,304
    monkeypatch.setenv("WEIGHTGEN_MAX_DATASET_BYTES", "50000")
    with pytest.raises(DatasetError, match="decode to 98,304 bytes.*;size=N"):
        load_dataset(f"folder:{root}")
    assert load_dataset(f"folder:{root};size=16").input_shape == (1, 16, 16)
