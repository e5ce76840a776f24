"""The zoo's novelty index (weightgen.nn_index): found by projection, confirmed exactly, kept up to date."""
import pytest
import torch

from weightgen import build_model
from weightgen.nn_index import nearest, open_index, update, update_all
from weightgen.novelty import novelty_vs_zoo
from zoo import Checkpoint, Zoo

CID = "mlp-s__k3__64"


def _sd(seed):
    torch.manual_seed(seed)
    return {n: t.contiguous() for n, t in build_model("mlp-s", 3, (64,)).state_dict().items()}


def _permuted(sd):
    """The same function with hidden units of the first layer in another order."""
    p = torch.randperm(sd["fcs.0.weight"].shape[0], generator=torch.Generator().manual_seed(1))
    out = dict(sd)
    out["fcs.0.weight"], out["fcs.0.bias"] = sd["fcs.0.weight"][p], sd["fcs.0.bias"][p]
    out["fcs.1.weight"] = sd["fcs.1.weight"][:, p]
    return out


@pytest.fixture
def zoo(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    z.add([Checkpoint(_sd(i), "mlp-s", 3, (64,), dataset="digits:classes=0,1,2", seed=i) for i in range(80)])
    return z


def test_nearest_finds_copies_and_permuted_copies_and_follows_the_zoo(zoo):
    assert nearest(zoo, CID, {k: v[None] for k, v in _sd(0).items()}) is None  # no index yet
    assert update_all(zoo)[CID] == {"rows": 80, "added": 80, "dropped": 0, "refit": True}
    for i in range(0, 80, 7):  # recall on copies: the projection's candidates hold the entry, the exact re-rank finds it
        for sd in (_sd(i), _permuted(_sd(i))):
            got = nearest(zoo, CID, {k: (v + 1e-4 * torch.randn_like(v))[None] for k, v in sd.items()})
            assert got["id"] == Zoo(zoo.url).query(seed=i)[0]["id"] and got["distance"] < 0.1 * got["base"]
    zoo.add([Checkpoint(_sd(100 + i), "mlp-s", 3, (64,), dataset="digits:classes=0,1,2", seed=100 + i) for i in range(5)])
    gone = zoo.query(seed=3)[0]["id"]
    zoo.remove([gone])
    assert update(zoo, CID) == {"rows": 84, "added": 5, "dropped": 1, "refit": False}
    assert nearest(zoo, CID, {k: v[None] for k, v in _sd(3).items()})["id"] != gone
    assert nearest(zoo, CID, {k: v[None] for k, v in _sd(102).items()})["id"] == zoo.query(seed=102)[0]["id"]
    assert open_index(zoo, CID)["rows"] == 84


class _Gen:  # what novelty needs of a generator when the zoo path is taken
    class stats:
        stat_names = ["fcs.0.weight", "fcs.0.bias", "fcs.1.weight", "fcs.1.bias"]

        @staticmethod
        def align_ref():
            return {}

    def weight_stats(self, arch=None):  # generators answer per arch since IGPG (multi-arch)
        return self.stats


def test_novelty_reads_the_index_not_the_zoo(zoo, monkeypatch):
    update_all(zoo)
    import weightgen.novelty as nov

    monkeypatch.setattr(nov, "_zoo_reference", lambda *a: pytest.fail("read the zoo instead of its index"))
    out = novelty_vs_zoo(_Gen(), {"zoo": zoo.url}, "mlp-s", 3, (64,), {k: v[None] for k, v in _sd(5).items()}, None)
    assert out["nearest_zoo_id"] == zoo.query(seed=5)[0]["id"] and out["ratio"] < 0.01 and "index" in out["basis"]
