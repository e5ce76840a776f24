"""Weight tokenization is invertible, and alignment keeps functions unchanged."""
import pytest
import torch

from weightgen import build_model, get_arch
from weightgen.align import PERM_CHAINS, align, permute_units
from weightgen.evaluate import stack_models
from weightgen.tokenize import Standardizer, TokenLayout

CASES = [(a, k, s, m) for a, k, s in [("mlp-s", 5, (64,)), ("mlp-s", 3, (64,)), ("mlp-m", 7, (64,)), ("cnn-s", 5, (1, 8, 8))]
         for m in ("full", "head")] + [("resnet-18", 10, (3, 32, 32), "head")]  # big full layouts are slow to build


@pytest.mark.parametrize("arch,k,shape,mode", CASES)
def test_tokenize_round_trip_is_exact(arch, k, shape, mode):
    torch.manual_seed(0)
    layout = TokenLayout(arch, k, shape, mode)
    sd = stack_models([build_model(arch, k, shape) for _ in range(2)])
    sd = {n: sd[n] for n in layout.keys}
    tokens = layout.tokenize(sd)
    assert tokens.shape == (2, layout.num_tokens, layout.token_dim)
    back = layout.detokenize(tokens)
    assert all(torch.equal(back[n], sd[n]) for n in layout.keys), "chunking alone is exact"
    assert int(layout.mask.sum()) == sum(v[0].numel() for v in sd.values()), "every value in exactly one slot"
    assert (tokens[:, ~layout.mask] == 0).all(), "padding is zero"
    std = Standardizer.fit(sd)
    back2 = std.denormalize(layout.detokenize(layout.tokenize(std.normalize(sd))))
    assert all(torch.allclose(back2[n], sd[n], atol=1e-5) for n in layout.keys)


def test_tokens_are_neurons_and_class_rows_are_marked():
    layout = TokenLayout("mlp-s", 5, (64,))
    assert layout.num_tokens == 32 + 5 and layout.token_dim == 65  # fc1 rows (64 + bias), head rows
    assert layout.cls.tolist() == [-1] * 32 + [0, 1, 2, 3, 4]
    assert layout.slot[32:].tolist() == [0] * 5, "class rows carry no position: only their class tells them apart"
    sd = stack_models([build_model("mlp-s", 5, (64,))])
    tok = layout.tokenize(sd)
    assert torch.equal(tok[0, 3, :64], sd["fcs.0.weight"][0, 3]) and tok[0, 3, 64] == sd["fcs.0.bias"][0, 3]
    assert torch.equal(tok[0, 34, :32], sd["fcs.1.weight"][0, 2]) and tok[0, 34, 32] == sd["fcs.1.bias"][0, 2]


@pytest.mark.parametrize("arch,shape", [("mlp-s", (64,)), ("mlp-m", (64,)), ("cnn-s", (1, 8, 8))])
def test_alignment_preserves_function_and_undoes_permutations(arch, shape):
    torch.manual_seed(0)
    models = [build_model(arch, 5, shape) for _ in range(3)]
    sd = stack_models(models)
    chain = PERM_CHAINS[arch]
    perms = [torch.stack([torch.randperm(sd[f"{c}.weight"].shape[1]) for _ in range(3)]) for c in chain[:-1]]
    shuffled = permute_units(sd, chain, perms)
    aligned, _ = align(shuffled, arch)
    x = torch.randn(4, *shape)
    spec = get_arch(arch)
    for i, m in enumerate(models):
        other = build_model(arch, 5, shape)
        other.load_state_dict({k: v[i] for k, v in aligned.items()})
        assert torch.allclose(spec.logits(other, x), spec.logits(m, x), atol=1e-5)
    back, _ = align({k: v[:1] for k, v in shuffled.items()}, arch, ref={k: v[0] for k, v in sd.items()})
    assert all(torch.allclose(back[k][0], sd[k][0]) for k in sd)
