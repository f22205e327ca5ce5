"""One case of a benchmark in a fresh Python process, so its timing and peak memory are its own.

The benchmark scripts re-run themselves with a flag naming one case (``--one s,cached``); the
child prints its result as a JSON object on its last stdout line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any


def run_child(
    script: str,
    flag: str,
    case: str,
    args: argparse.Namespace,
    options: Iterable[str],
    extra: Sequence[str] = (),
) -> dict[str, Any] | str:
    """Run ``script flag case`` passing on ``args``' ``options`` (those not None) and ``extra``;
    the child's JSON result, or the tail of its stderr when it failed."""
    cmd = [sys.executable, script, flag, case]
    for opt in options:
        if getattr(args, opt) is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    res = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    if res.returncode:
        return res.stderr.strip()[-800:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out
