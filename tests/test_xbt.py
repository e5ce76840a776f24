"""XBT: versioned text encoders, projections new -> old, and their automatic use by sampling."""
from __future__ import annotations

import json

import pytest
import torch

from weightgen.cli import main


def test_encoders_are_named_and_versioned():
    from weightgen.text import TEXT_ENCODERS, text_encoder

    assert {"minilm-l6", "paraphrase-minilm-l3"} <= set(TEXT_ENCODERS.names())
    a, b = text_encoder("minilm-l6"), text_encoder("paraphrase-minilm-l3")
    assert a.version != b.version and len(a.version) == 16
    x = ["classify handwritten 3, 1 and 4", "a small network that tells apart the digits three, one and four",
         "the interpreter starts with an empty namespace"]
    for enc in (a, b):
        e = enc.encode(x)
        assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert e[0] @ e[1] > e[0] @ e[2], f"{enc.name}: a paraphrase is nearer than an unrelated sentence"


@pytest.fixture(scope="module")
def projection(tmp_path_factory):
    from weightgen.xbt import fit

    return fit("minilm-l6", "paraphrase-minilm-l3", tmp_path_factory.mktemp("xbt") / "p", steps=60, tasks=30,
               max_sentences=60, show_progress=False)


def test_a_projection_maps_new_into_old_and_records_both(projection):
    from weightgen.text import text_encoder
    from weightgen.xbt import Projection, corpus

    cfg = json.loads((projection / "config.json").read_text())
    assert (cfg["old"], cfg["new"]) == ("minilm-l6", "paraphrase-minilm-l3")
    assert cfg["old_version"] == text_encoder("minilm-l6").version and cfg["new_version"]
    assert list(projection.glob("*.safetensors")) and not list(projection.glob("*.bin"))
    proj = Projection.from_pretrained(str(projection)).eval()
    assert cfg["tokens"], "reads the new encoder's token states by default"
    texts = corpus(30, 0, 60)[:64]
    enc_new = text_encoder("paraphrase-minilm-l3")
    old, new = text_encoder("minilm-l6").encode(texts), enc_new.encode(texts)
    assert (proj.embed(enc_new, texts) * old).sum(-1).mean() > (new * old).sum(-1).mean() + 0.3, \
        "closer to old than raw new"
    # padding does not change a text's projection: alone or beside a longer one, the same embedding
    one, two = proj.embed(enc_new, texts[:1]), proj.embed(enc_new, [texts[0], texts[-1] * 3])
    assert torch.allclose(one[0], two[0], atol=1e-5)


def test_sampling_uses_the_projection_and_says_so(projection, use_tiny_home, tmp_path, capsys, monkeypatch):
    import shutil

    from weightgen.xbt import default_dir

    args = ["sample", "--arch", "mlp-s", "--instruction", "classify handwritten 2, 7 and 9", "--generator",
            "igpg-tiny", "--n", "2", "--no-novelty", "--text-encoder", "paraphrase-minilm-l3"]
    rc = main(args + ["--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and "xbt fit --old minilm-l6 --new paraphrase-minilm-l3" in err
    shutil.copytree(projection, default_dir("paraphrase-minilm-l3", "minilm-l6"))
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    text = m["conditions"]["text"]
    assert text["text_encoder"]["name"] == "paraphrase-minilm-l3"
    assert text["projection"]["from"] == "paraphrase-minilm-l3" and text["projection"]["to"] == "minilm-l6"
    assert main(args[:-2] + ["--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["conditions"]["text"]["projection"] is None and m["conditions"]["text"]["text_encoder"]["name"] == "minilm-l6"
    # what the generator read: the request's encoder through the projection, not its own encoder
    from weightgen.sampling import find_generator, load_generator
    from weightgen.text import text_encoder
    from weightgen.xbt import load_projection

    gen = load_generator(str(find_generator("mlp-s", (64,), "igpg-tiny"))).model
    x = ["classify handwritten 2, 7 and 9"]
    via = gen._texts(x, "paraphrase-minilm-l3")
    want = load_projection("paraphrase-minilm-l3", "minilm-l6").embed(text_encoder("paraphrase-minilm-l3"), x)
    assert torch.allclose(via, want) and not torch.allclose(via, gen._texts(x))
