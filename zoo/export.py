"""Export a zoo checkpoint as a ready-to-load folder: ``model.safetensors`` + ``config.json``,
written like ``weightgen sample``'s outputs (``weightgen.outputs``: temp file + rename, never
through a symlink, the user's umask)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save

from weightgen.archs import model_config
from weightgen.outputs import check_out_dir, make_out_dir, write_file
from zoo.store import Zoo


def export_checkpoint(zoo: Zoo, ckpt_id: str, out_dir: str | Path) -> Path:
    """Write the tensors bit-exact (their sha256 is the id) and the config ``build_model`` needs."""
    check_out_dir(out_dir)  # before reading anything
    rec = zoo.get(ckpt_id)
    tensors = zoo.load(rec["id"])
    cfg = model_config(rec["arch"], rec["num_classes"], rec["input_shape"], dataset=rec["dataset"], zoo_id=rec["id"])
    out = make_out_dir(out_dir)
    write_file(out / "model.safetensors", save(tensors, metadata={"weightgen": json.dumps(cfg)}))
    write_file(out / "config.json", json.dumps({**cfg, "record": rec}, indent=1).encode())
    return out
