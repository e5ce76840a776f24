"""The README never lies: every `weightgen` command in it parses with today's CLI, every config it
names loads, and its main job runs end to end on a tiny preset (as vector-quantize-pytorch's
tests/test_readme.py runs its README)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)```", README, flags=re.S)


def _commands(program: str) -> list[list[str]]:
    """Every ``program ...`` command in the README's shell blocks, split on && and ;, with
    [optional] parts and trailing comments removed."""
    out = []
    for block in _blocks():
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())
            for part in re.split(r"&&|;", line):
                part = re.sub(r"\[[^\]]*\]", "", part).strip()
                if part.startswith(program + " "):
                    out.append(shlex.split(part)[1:])
    return out


def main_job() -> list[list[str]]:
    """The README's first set-up command: install, then the weightgen commands of the main job."""
    line = next(b for b in _blocks() if "weightgen quickstart" in b).strip().splitlines()[0]
    return [shlex.split(p.strip())[1:] for p in line.split("&&") if p.strip().startswith("weightgen ")]


def test_the_readme_keeps_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    cmds = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(cmds) == 2 and all(c.startswith("pip install -c constraints.txt -e ") for c in cmds)
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def test_every_weightgen_command_parses():
    from training.train import build_parser as train_parser
    from weightgen.cli import build_parser

    parser = build_parser()
    cmds = _commands("weightgen")
    assert len(cmds) >= 10
    for argv in cmds:
        try:
            (train_parser().parse_args(argv[1:]) if argv[0] == "train" else parser.parse_args(argv))
        except SystemExit as e:
            pytest.fail(f"README command `weightgen {' '.join(argv)}` does not parse (exit {e.code})")


def test_every_config_the_readme_names_loads():
    from training.config import TrainConfig

    names = set(re.findall(r"training/configs/[\w.-]+\.yaml", README))
    assert names
    for name in names:
        TrainConfig.from_yaml(ROOT / name)


def test_the_main_job_runs_on_a_tiny_preset(tmp_path, monkeypatch, capsys):
    """The README's main command, with quickstart shrunk to seconds (same code path)."""
    import weightgen.quickstart as qs
    from weightgen.cli import main

    monkeypatch.setenv("WEIGHTGEN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qs, "POPULATION", dict(qs.POPULATION, tasks=8, seeds=2, steps=60))
    monkeypatch.setattr(qs, "GENERATOR_CONFIGS", ("d2nwg_tiny.yaml",))
    job = main_job()
    assert [a[0] for a in job] == ["quickstart", "sample", "eval"]
    for argv in job:
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "wrote " in out and "held-out examples" in out and "Held-out tasks" in out
    assert not any(p.name != "home" for p in tmp_path.iterdir()), "nothing is written to the current directory"
    assert list((tmp_path / "home" / "samples").glob("*/model.safetensors"))


def test_quickstart_trains_igpg_by_default_and_without_igpg_skips_it(tmp_path, monkeypatch):
    import training.train
    import weightgen.quickstart as qs

    monkeypatch.setenv("WEIGHTGEN_HOME", str(tmp_path))
    monkeypatch.setattr(qs, "POPULATION", dict(qs.POPULATION, tasks=4, seeds=1, steps=5))
    trained = []
    monkeypatch.setattr(training.train, "train", lambda tc, **_: trained.append(tc.name) or
                        {"seconds": 0, "checkpoints": 0, "recon_gate": None})
    qs.quickstart(show_progress=False)
    assert trained == ["d2nwg-digits-mlp-s", "hypernet-digits-mlp-s", "igpg-digits-mlp-s"]
    trained.clear()
    qs.quickstart(show_progress=False, without=("igpg",), extra=("igpg",))  # old scripts' --with igpg: no effect
    assert trained == ["d2nwg-digits-mlp-s", "hypernet-digits-mlp-s"]


def test_quickstart_with_an_unknown_extra_is_a_clear_error():
    from weightgen.quickstart import quickstart

    with pytest.raises(ValueError, match="choose from igpg"):
        quickstart(extra=("gan",))
    with pytest.raises(ValueError, match="unknown --without gan"):
        quickstart(without=("gan",))
