"""Pretrained backbones (transformers ViT / ResNet): read, validate, preprocess, and cached features.

A task part (classifier head) is generated on a backbone stored once in the zoo
(:mod:`zoo.backbones`). This module is the transformers side: it reads a local Hugging Face
folder (``config.json`` + ``model.safetensors`` of ``ViTModel``/``ViTForImageClassification``,
``ResNetModel``/``ResNetForImageClassification``) or a hub id, checks names and shapes against
the model its config builds *from the file header* before any tensor data is read, and keeps the
backbone's preprocessing (``preprocessor_config.json`` verbatim when there is one, else the
library's defaults for that config) so the output folder feeds images exactly as it was fed.

Features are what the classifier reads (ViT: the final-normed [CLS] token; ResNet: the pooled
map), computed in batches with a progress bar and cached in the zoo under (backbone id, sha256 of
the input rows), so building a head zoo or answering a second request never re-runs the backbone
over rows it has already seen. The backbone module is built once per process (``lru_cache``) and
shared by every request.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from weightgen.archs import get_arch, image_shape
from zoo.backbones import add_backbone, load_backbone, load_features, save_features
from zoo.records import ZooError

FAMILIES = {  # arch family -> (model_type, prefix in *ForImageClassification, classifier weight key)
    "vit": ("vit", "vit.", "classifier.weight"),
    "resnet": ("resnet", "resnet.", "classifier.1.weight"),
}
_VOLATILE = {"_name_or_path", "architectures", "id2label", "label2id", "transformers_version", "dtype", "torch_dtype",
             "problem_type", "return_dict", "output_attentions", "output_hidden_states", "num_labels"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class BackboneError(ZooError):
    """A backbone source that cannot be used; the message says which file and why."""


def family_of(arch: str) -> str:
    fam = get_arch(arch).family
    if fam not in FAMILIES:
        raise BackboneError(f"{arch} takes no pretrained backbone; backbone archs: "
                            f"{', '.join(a for a in ('vit-t', 'vit-s', 'resnet-18'))}")
    return fam


def _config_cls(fam: str):
    from transformers import ResNetConfig, ViTConfig

    return {"vit": ViTConfig, "resnet": ResNetConfig}[fam]


def base_model(fam: str, config: dict, device="cpu") -> torch.nn.Module:
    """The backbone without a head (keys without the ``vit.``/``resnet.`` prefix)."""
    from transformers import ResNetModel, ViTModel

    cfg = _config_cls(fam).from_dict(config)
    with torch.device(device):
        return ViTModel(cfg, add_pooling_layer=False) if fam == "vit" else ResNetModel(cfg)


def key_map(fam: str, config: dict) -> dict[str, str]:
    """Module key -> key in saved files. transformers 5 renames some modules (ViT's attention) and
    renames them back on save, so files (the hub's, ``save_pretrained``'s, ours) use the original
    names; the mapping is transformers' own (``revert_weight_conversion``), one key at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    model = base_model(fam, config, device="meta")
    return {k: next(iter(revert_weight_conversion(model, {k: v}))) for k, v in model.state_dict().items()}


def default_preprocessing(fam: str, config: dict) -> dict:
    """What ``ViTImageProcessor`` does for this config when the source ships no processor config
    (ResNet configs name no image size: 224, ImageNet statistics, as the hub's ResNets)."""
    size = int(config.get("image_size", 224)) if fam == "vit" else 224
    mean, std = ([0.5] * 3, [0.5] * 3) if fam == "vit" else (IMAGENET_MEAN, IMAGENET_STD)
    c = int(config.get("num_channels", 3))
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": (mean * c)[:c] if c != 3 else mean, "image_std": (std * c)[:c] if c != 3 else std}


# --------------------------------------------------------------------------- reading a source


def _read_json(p: Path, what: str, limit: int = 1 << 20) -> dict:
    if p.stat().st_size > limit:
        raise BackboneError(f"{p}: {what} is over {limit} bytes")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackboneError(f"{p}: {what} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise BackboneError(f"{p}: {what} must be a JSON object, got {type(doc).__name__}")
    return doc


def read_folder(folder: str | Path, arch: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors under the base model's keys, canonical config, preprocessing) of a local HF folder;
    everything is checked from config and headers before the tensor data is read."""
    from zoo.checkpoints import Rejected, open_checkpoint

    fam = family_of(arch)
    p = Path(folder).expanduser()
    if not (p / "config.json").is_file():
        raise BackboneError(f"{p}: no config.json; a backbone source is a Hugging Face model folder")
    cfg = _read_json(p / "config.json", "config.json")
    model_type, prefix, _ = FAMILIES[fam]
    if cfg.get("model_type") != model_type:
        raise BackboneError(f"{p}: config.json has model_type {cfg.get('model_type')!r}; {arch} needs {model_type!r}")
    try:
        f = open_checkpoint(p)
        native = {k: tuple(v.shape) for k, v in base_model(fam, cfg, device="meta").state_dict().items()}
        to_file = key_map(fam, cfg)
    except Rejected as e:
        raise BackboneError(str(e)) from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a config transformers cannot build
        raise BackboneError(f"{p}: config.json does not describe a {model_type} model ({type(e).__name__}: {e})") from None
    rename = {}
    for name in f.declared():
        base = name.removeprefix(prefix)
        if base.startswith(("classifier.", "pooler.")):
            continue  # the source's own head (and ViTModel's pooler) is not part of the backbone
        rename[name] = to_file.get(base, base)  # module names (saved with save_original_format=False) too
    expected = {to_file[k]: s for k, s in native.items()}
    got = {rename[n]: tuple(s) for n, (s, _) in f.declared().items() if n in rename}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or extra or wrong:
        detail = "; ".join(x for x in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"shape of {wrong[0]} is {got[wrong[0]]}, config says {expected[wrong[0]]}" if wrong else "") if x)
        raise BackboneError(f"{p}: model.safetensors does not match its config.json ({detail})")
    need = sum(4 * max(1, int(torch.Size(s).numel())) for s in expected.values())
    if f.alloc_bytes > 2 * need + (64 << 20):
        raise BackboneError(f"{p}: declares {f.alloc_bytes} bytes of tensors, far more than the config's {need}")
    try:
        raw = f.load()
    except Rejected as e:
        raise BackboneError(str(e)) from None
    tensors = {rename[n]: t.contiguous() for n, t in raw.items() if n in rename}
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise BackboneError(f"{p}: tensors {bad[:3]} hold NaN or Inf")
    canonical = {k: v for k, v in _config_cls(fam).from_dict(cfg).to_dict().items() if k not in _VOLATILE}
    prep_file = p / "preprocessor_config.json"
    prep = _read_json(prep_file, "preprocessor_config.json") if prep_file.is_file() else default_preprocessing(fam, cfg)
    return tensors, canonical, prep


def read_source(src: str, arch: str) -> tuple[dict[str, torch.Tensor], dict, dict, str]:
    """A local folder, or a hub id loaded by transformers (online machines only): saved to a temp
    folder by transformers itself and read back through the same checks."""
    p = Path(src).expanduser()
    if p.is_dir():
        return (*read_folder(p, arch), str(p.resolve()))
    if p.exists():
        raise BackboneError(f"{src} is a file; a backbone source is a Hugging Face model folder or hub id")
    if not _HUB_ID.match(src):
        raise BackboneError(f"{src}: no such folder, and not a hub id (ORG/NAME)")
    from transformers import AutoImageProcessor, AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        try:
            AutoModel.from_pretrained(src).save_pretrained(tmp)
        except OSError as e:
            raise BackboneError(f"cannot load {src} from the hub ({e}); on an offline machine give a local folder")
        try:
            AutoImageProcessor.from_pretrained(src).save_pretrained(tmp)
        except OSError:
            pass  # no processor config: the config's defaults are used
        return (*read_folder(tmp, arch), f"hub:{src}")


_SIZE_KEYS = {"vit": ("hidden_size", "num_hidden_layers", "num_attention_heads"), "resnet": ("hidden_sizes", "depths")}


def size_matches_arch(arch: str, config: dict) -> bool:
    """Whether a backbone's config has the registry arch's size (a 32-wide test ViT stored as
    ``vit-s`` is allowed, the arch names the family and output class, but the record says so)."""
    fam = family_of(arch)
    ref = get_arch(arch).build(2, (3, 32, 32), device="meta").config.to_dict()
    return all(config.get(k) == ref.get(k) for k in _SIZE_KEYS[fam])


def add_from_source(zoo, src: str, arch: str) -> tuple[str, bool]:
    """``weightgen zoo add-backbone``: read, check and store once; returns (id, newly stored)."""
    tensors, config, prep, where = read_source(src, arch)
    return add_backbone(zoo, tensors, arch, config, prep, source=where, model_type=FAMILIES[family_of(arch)][0],
                        size_matches_arch=size_matches_arch(arch, config))


# --------------------------------------------------------------------------- running it


@lru_cache(maxsize=2)
def _module(zoo_url: str, bid: str) -> tuple[dict, torch.nn.Module]:
    from zoo import open_zoo

    rec, tensors = load_backbone(open_zoo(zoo_url, mode="r"), bid)
    fam = family_of(rec["arch"])
    model = base_model(fam, rec["config"])
    model.load_state_dict({k: tensors[f].float() if tensors[f].is_floating_point() else tensors[f]
                           for k, f in key_map(fam, rec["config"]).items()}, strict=True)
    return rec, model.eval()


def preprocess(x: torch.Tensor, prep: dict, num_channels: int) -> torch.Tensor:
    """Dataset images (N, C, H, W) float in [0, 1] -> model input, as the image processor would
    (resize, normalize; grey images repeated to the backbone's channels)."""
    c, h, w = image_shape(tuple(x.shape[1:]), "a backbone")
    x = x.reshape(len(x), c, h, w).float()
    if c != num_channels:
        if c != 1:
            raise BackboneError(f"images have {c} channels; the backbone takes {num_channels}")
        x = x.expand(-1, num_channels, -1, -1)
    size = prep.get("size") or {}
    if prep.get("do_resize", True) and size:
        if "height" in size:
            hw = (int(size["height"]), int(size["width"]))
        else:
            s = int(size.get("shortest_edge", h))
            hw = (s, round(s * w / h)) if h <= w else (round(s * h / w), s)
        if hw != (h, w):
            x = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    if prep.get("do_normalize", True):
        mean = torch.tensor(prep.get("image_mean", [0.5] * num_channels), dtype=x.dtype)[:, None, None]
        std = torch.tensor(prep.get("image_std", [0.5] * num_channels), dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
    return x


@torch.no_grad()
def compute_features(rec: dict, model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64,
                     progress: bool = True, device: str = "cpu") -> torch.Tensor:
    """(N, D) float32 features of dataset images x, in batches (fp32: head statistics are sensitive)."""
    from tqdm import tqdm

    dev = torch.device(device)
    model = model.to(dev)
    c = int(rec["config"].get("num_channels", 3))
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=f"features ({rec['arch']} {rec['id'][:8]})",
                  disable=not progress, unit="batch"):
        xb = preprocess(x[i:i + batch_size], rec["preprocessing"], c).to(dev)
        o = model(pixel_values=xb)
        f = o.last_hidden_state[:, 0] if family_of(rec["arch"]) == "vit" else o.pooler_output.flatten(1)
        out.append(f.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, feature_dim(rec))


def feature_dim(rec: dict) -> int:
    cfg = rec["config"]
    return int(cfg["hidden_size"]) if family_of(rec["arch"]) == "vit" else int(cfg["hidden_sizes"][-1])


def rows_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.float().contiguous().numpy().tobytes())
    h.update(y.long().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_features(zoo, bid: str, x: torch.Tensor, y: torch.Tensor, *, progress: bool = True,
                    device: str = "cpu", batch_size: int = 64) -> tuple[torch.Tensor, bool]:
    """Features of rows (x, y) under backbone ``bid``: from the zoo's cache, else computed once and
    stored (when the zoo is writable). Returns (features, was cached)."""
    fp = rows_fingerprint(x, y)
    hit = load_features(zoo, bid, fp)
    if hit is not None:
        return hit[0], True
    rec, model = _module(zoo.url, bid)
    feats = compute_features(rec, model, x, batch_size, progress, device)
    if not zoo.read_only:
        save_features(zoo, rec["id"], fp, feats, y, {"rows": len(y)})
    return feats, False


def backbone_record(zoo_url: str, bid: str) -> dict:
    return _module(zoo_url, bid)[0]


@lru_cache(maxsize=2)
def backbone_tensors(zoo_url: str, bid: str) -> dict[str, torch.Tensor]:
    """The stored tensors (as stored: bit-exact, original dtype), for the output folder; read once
    per process (a server answers every request for this backbone from the same tensors; callers
    build new dicts and never write into these)."""
    from zoo import open_zoo

    return load_backbone(open_zoo(zoo_url, mode="r"), bid)[1]
