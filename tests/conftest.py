"""Shared fixtures. Everything runs offline, on CPU, in a temporary $WEIGHTGEN_HOME."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# A test's Ray listens on 127.0.0.1 only (node address = loopback); with auth off, it must not be
# reachable from the network. And its Serve proxies get the header cap (serving/proxy.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serving.proxy:setup")
# ... with body limits sized to test_serving.py's app (1 MiB JSON, 2 MiB uploads): 4 uploads and
# 2 JSON bodies fill the proxy's budget exactly
os.environ.setdefault("WEIGHTGEN_PROXY_MAX_BODY_BYTES", str(3 << 20))
os.environ.setdefault("WEIGHTGEN_PROXY_BODY_BYTES", str(10 << 20))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("wg_home")
    monkeypatch.setenv("WEIGHTGEN_HOME", str(home))
    monkeypatch.delenv("WEIGHTGEN_ZOO", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs ~20 s on 2 cores)."""
    import ray  # a dependency, not an optional extra: missing, the tests fail

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@contextmanager
def reserved_port(host: str = "127.0.0.1"):
    """A free TCP port that stays ours while the block runs: the socket that the OS picked it for
    stays bound (SO_REUSEPORT, not listening), so no other process can take it, and a server that
    binds it with SO_REUSEPORT too (Serve's proxy does, by default) still can. No bind-then-close
    race."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        yield s.getsockname()[1]


def make_mlp_files(directory, n: int, num_classes: int = 5, start_seed: int = 0, fmt: str = "safetensors"):
    """n distinct mlp-s checkpoints written as files; returns their paths and state dicts."""
    from safetensors.torch import save_file

    from weightgen import build_model

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start_seed, start_seed + n):
        torch.manual_seed(i)
        sd = {k: v.contiguous() for k, v in build_model("mlp-s", num_classes, (64,)).state_dict().items()}
        p = directory / f"ckpt_{i:05d}.{fmt}"
        if fmt == "safetensors":
            save_file(sd, str(p))
        else:
            torch.save(sd, str(p))
        out.append((p, sd))
    return out


def _build_home(tmp_path_factory, name: str, population: dict, trainings: list[dict]):
    """A fresh $WEIGHTGEN_HOME: a population zoo, then each generator trained into it."""
    from training.config import TrainConfig
    from training.train import train
    from zoo.population import PopulationConfig, build_population

    home = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.setenv("WEIGHTGEN_HOME", str(home))
    try:
        build_population(PopulationConfig(**population), str(home / "zoo"), show_progress=False)
        for cfg in trainings:
            train(TrainConfig(**cfg), show_progress=False)
    finally:
        mp.undo()
    return home


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """A $WEIGHTGEN_HOME with a tiny zoo (mlp-s on digits tasks) and tiny trained generators
    (D2NWG, the hypernetwork and IGPG), built once per session in ~half a minute."""
    base = dict(arch="mlp-s", num_classes=5, input_shape=[64], dataset_prefix="digits:", min_test_acc=0.0,
                batch_size=8, support_per_class=5, checkpoint_every=1000, log_every=5, warmup_steps=2,
                heldout_task_fraction=0.25)
    return _build_home(tmp_path_factory, "tiny_home", dict(tasks=8, seeds=2, steps=60), [
        dict(name="d2nwg-tiny", generator="d2nwg-tiny", stages={"vae": 15, "diffusion": 15}, **base),
        dict(name="hypernet-tiny", generator="hypernet-tiny", stages={"regression": 15}, **base),
        dict(name="igpg-tiny", generator="igpg-tiny", stages={"vq": 15, "prior": 15}, **base)])


@pytest.fixture
def use_tiny_home(tiny_home, monkeypatch):
    monkeypatch.setenv("WEIGHTGEN_HOME", str(tiny_home))
    return tiny_home


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory):
    """A $WEIGHTGEN_HOME whose D2NWG (tiny preset, named "d2nwg-trained") is trained enough to beat
    random init and the zoo mean clearly on held-out tasks (measured ~0.73 vs ~0.25 test accuracy),
    so a test fails if generation stops working; ~5 s on 2 cores, once per session."""
    return _build_home(tmp_path_factory, "trained_home", dict(tasks=24, seeds=2, steps=100), [
        dict(name="d2nwg-trained", generator="d2nwg-tiny", stages={"vae": 150, "diffusion": 150}, arch="mlp-s",
             num_classes=5, input_shape=[64], dataset_prefix="digits:", min_test_acc=0.0, batch_size=16,
             support_per_class=5, lr=3e-3, checkpoint_every=10**6, log_every=50, warmup_steps=5,
             heldout_task_fraction=0.0)])


@pytest.fixture
def use_trained_home(trained_home, monkeypatch):
    monkeypatch.setenv("WEIGHTGEN_HOME", str(trained_home))
    return trained_home
