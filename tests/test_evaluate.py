"""Vectorized evaluation is safe to call from several threads (a Serve replica samples for two
generators at once, each in its own thread)."""
import threading

import torch

from weightgen.archs import get_arch
from weightgen.evaluate import accuracy_many, logits_many


def _stack(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(n, *t.shape, generator=g) for t in get_arch("mlp-s").tensors(5, (64,))}


def test_logits_many_is_thread_safe():
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    sds = [_stack(1), _stack(2)]
    want = [logits_many("mlp-s", 5, (64,), sd, x) for sd in sds]
    wrong = []

    def run(i: int):
        for _ in range(100):
            if not torch.equal(logits_many("mlp-s", 5, (64,), sds[i], x), want[i]):
                wrong.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 200 calls returned another thread's logits"


def test_accuracy_many_matches_a_loop():
    x, y = torch.randn(30, 64), torch.randint(0, 5, (30,))
    sd = _stack(3, n=3)
    model = get_arch("mlp-s").build(5, (64,))
    for i, acc in enumerate(accuracy_many("mlp-s", 5, (64,), sd, x, y)):
        model.load_state_dict({k: v[i] for k, v in sd.items()}, strict=True)
        assert float(acc) == float((get_arch("mlp-s").logits(model, x).argmax(1) == y).float().mean())
