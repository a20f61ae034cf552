"""Capability tokens across processes: the key file is what two processes on one home share.

The in-process behaviour of tokens (signing, expiry, the key file's creation) is in
tests/unit/execution/test_tokens.py; this needs a second interpreter, so it is not a unit test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import ROOT
from tracecore.execution import tokens
from tracecore.execution.tokens import Capability
from tracecore.settings import Settings

NOW = 1_700_000_000


def test_another_process_on_the_same_home_verifies_what_this_one_minted(tmp_path: Path) -> None:
    key = tokens.secret_key(Settings(home=str(tmp_path / "home")))
    cap = Capability(task_id=str(uuid.uuid4()), run_id=str(uuid.uuid4()), attempt=1, fence=1,
                     org_id=str(uuid.uuid4()), job="blocks", inputs=(), output_prefix="outputs/",
                     scratch_prefix="scratch/", issued_at=NOW, expires_at=NOW + 180)
    token = tokens.mint(cap, key)
    code = ("import sys; from tracecore.execution import tokens; from tracecore.settings import Settings; "
            "k = tokens.secret_key(Settings(home=sys.argv[1])); "
            f"print(tokens.verify(sys.argv[2], k, now={NOW + 1}).job)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    answer = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home"), token], capture_output=True,
                            text=True, env=env, cwd=ROOT, check=True)
    assert answer.stdout.strip() == "blocks"
