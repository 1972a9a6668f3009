"""Loaded by every Python process whose PYTHONPATH holds this folder (tests/test_dvc.py sets it for `dvc
repro`): at exit, writes which fedcmi source files the process imported, so the test can check that each
DVC stage depends on the code it runs."""

import atexit
import json
import os
import sys

_OUT = os.environ.get("FEDCMI_MODULE_TRACE")


def _dump() -> None:
    files = sorted({m.__file__ for name, m in list(sys.modules.items())
                    if (name == "fedcmi" or name.startswith("fedcmi.")) and getattr(m, "__file__", None)})
    if _OUT and files:
        path = os.path.join(_OUT, f"{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({"argv": sys.argv, "files": files}, f)


if _OUT:
    atexit.register(_dump)
