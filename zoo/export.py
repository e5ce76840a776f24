"""Export a zoo checkpoint as a ready-to-load folder: ``model.safetensors`` + ``config.json``."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from weightgen.archs import model_config
from zoo.store import Zoo


def export_checkpoint(zoo: Zoo, ckpt_id: str, out_dir: str | Path) -> Path:
    """Write the tensors bit-exact (their sha256 is the id) and the config ``build_model`` needs."""
    rec = zoo.get(ckpt_id)
    tensors = zoo.load(rec["id"])
    cfg = model_config(rec["arch"], rec["num_classes"], rec["input_shape"], dataset=rec["dataset"], zoo_id=rec["id"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"weightgen": json.dumps(cfg)})
    (out / "config.json").write_text(json.dumps({**cfg, "record": rec}, indent=1))
    return out
