"""One error base: every error fedcmi raises on purpose reaches the user as one line with its exit code; the
mistakes a new user makes (found by trying them) are such errors, never a traceback."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from test_cli import _params
from test_cli import fedcmi as run_fedcmi

import fedcmi as package
from fedcmi import cli
from fedcmi.errors import EXIT_DIVERGED, EXIT_FAILURE, EXIT_USAGE, FedcmiError


def every_error_class() -> list[type[FedcmiError]]:
    for info in pkgutil.walk_packages(package.__path__, "fedcmi."):
        importlib.import_module(info.name)
    found: set[type[FedcmiError]] = set()
    todo = [FedcmiError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("fedcmi.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


def test_the_package_defines_its_errors_on_one_base():
    names = {c.__name__ for c in every_error_class()}
    # the classes a user meets most; a new module's errors join the walk below on their own
    assert {"ConfigError", "DataError", "PartitionError", "Diverged", "RoundFailed", "StoreError", "WorkerError",
            "ModelFileError", "TrackingUnavailable", "Busy", "UnknownPlugin"} <= names


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
def test_every_error_is_one_line_with_its_exit_code(cls, monkeypatch, capsys, tmp_path):
    (tmp_path / "params.yaml").write_text("{}")

    def fail(*args, **kwargs):
        raise cls("the reason, said once")

    monkeypatch.setattr(cli, "load_config", fail)
    rc = cli.main(["train", "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert err == "fedcmi: error: the reason, said once\n"
    assert rc == cls.exit_code and rc in (EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    _params(root)
    (root / "README.md").write_text("# my project\n")
    for step in ("prepare", "partition"):
        assert run_fedcmi(step, cwd=root).returncode == 0
    return root


@pytest.mark.parametrize("args, says", [
    (["train", "--set", "partition.num_clients=7"], "the partition file has 4 clients, params say "
                                                    "partition.num_clients=7; rerun `fedcmi partition`"),
    (["partition", "--set", "partition.file=/"], "partition.file: Value error, '/' names a folder"),
    (["partition", "--set", "partition.file=params.yaml"], "refusing to overwrite params.yaml"),
    (["partition", "--stats", "README.md"], "refusing to overwrite README.md"),
    (["evaluate", "--model", "params.yaml"], "params.yaml"),
    (["sample", "--round", "99"], "round 99 is not a round of this federation"),
    (["sample", "--round", "1", "--set", "partition.num_clients=7"], "the partition file has 4 clients"),
    (["pipeline", "compile", "--parallelism", str(2**70), "--out", "p.yaml"], "is above 100000"),
])
def test_a_new_users_mistakes_are_one_line(project, args, says):
    before = sorted(p.name for p in project.iterdir())
    r = run_fedcmi(*args, cwd=project)
    assert r.returncode in (EXIT_FAILURE, EXIT_USAGE), r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # argparse adds its usage line
    assert sorted(p.name for p in project.iterdir()) == before
    assert (project / "README.md").read_text() == "# my project\n" and "seed:" in (project / "params.yaml").read_text()
