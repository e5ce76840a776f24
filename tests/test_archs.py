"""Contract tests over every registered architecture."""
import pytest
import torch

from weightgen import ARCHS, build_model, get_arch
from weightgen.archs import ShapeError
from weightgen.registry import UnknownNameError

SHAPES = {"mlp-s": (5, (64,)), "mlp-m": (5, (64,)), "cnn-s": (10, (3, 32, 32)), "vit-t": (10, (3, 32, 32)),
          "vit-s": (10, (3, 32, 32)), "resnet-18": (10, (3, 32, 32))}


@pytest.mark.parametrize("arch", ARCHS.names())
def test_arch_contract(arch):
    k, shape = SHAPES.get(arch, (5, (64,)))
    spec = get_arch(arch)
    torch.manual_seed(0)
    model = build_model(arch, k, shape).eval()
    sd = model.state_dict()
    tensors = spec.tensors(k, shape)
    assert [t.name for t in tensors] == list(sd), "spec keys are exactly the module's state-dict keys"
    for t in tensors:
        assert tuple(sd[t.name].shape) == t.shape and sd[t.name].dtype == t.dtype
    full = set(spec.generated_keys(k, shape, "full"))
    head = set(spec.generated_keys(k, shape, "head"))
    assert head and head < full or head == full
    assert any(n.startswith(spec.classifier) for n in head), "head mode includes the classifier"
    with torch.no_grad():
        logits = spec.logits(model, torch.randn(2, *shape))
    assert logits.shape == (2, k) and torch.isfinite(logits).all()


def test_vit_s_is_the_transformers_model_with_its_own_keys():
    from transformers import ViTForImageClassification

    m = build_model("vit-s", 10, (3, 32, 32))
    assert isinstance(m, ViTForImageClassification)
    assert m.config.hidden_size == 384 and m.config.num_hidden_layers == 12 and m.config.num_attention_heads == 6
    assert m.config.patch_size == 4 and m.config.image_size == 32
    n = get_arch("vit-s").num_params(10, (3, 32, 32))
    assert 21_000_000 <= n <= 22_000_000
    clone = ViTForImageClassification(m.config)
    clone.load_state_dict(m.state_dict(), strict=True)  # generated keys load in transformers unchanged


def test_resnet18_head_mode_has_norms_and_classifier():
    spec = get_arch("resnet-18")
    head = spec.generated_keys(10, (3, 32, 32), "head")
    assert "classifier.1.weight" in head
    assert any("normalization.weight" in n for n in head)
    assert not any("running_mean" in n or "convolution" in n for n in head)


def test_flat_square_vectors_are_images_for_image_archs():
    model = build_model("cnn-s", 5, (64,))
    assert get_arch("cnn-s").logits(model, torch.randn(3, 64)).shape == (3, 5)


def test_clear_errors():
    with pytest.raises(UnknownNameError, match="Available: mlp-s"):
        build_model("vit-xl", 10, (3, 32, 32))
    with pytest.raises(ShapeError, match="needs image input"):
        build_model("vit-s", 10, (63,))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp-s", 1, (64,))
    with pytest.raises(ValueError, match="Unknown generation mode"):
        get_arch("mlp-s").generated_keys(5, (64,), "tail")
