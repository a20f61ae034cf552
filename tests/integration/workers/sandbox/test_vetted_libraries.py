"""The runtime images' vetted libraries (deploy/images/*-libraries.txt) through the real Docker sandbox.

Bundles import numpy, pandas, pyarrow and Polars (python3.11) or ethers (nodejs) without vendoring them;
a bundle's own copy wins over the image's (Lambda's layer precedence); an import that is neither vetted
nor vendored ends as ``init_error`` naming the module; and the sandbox still offers no way to install
anything (no pip, npm or apt, no network).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.workers.sandbox.test_docker import Sandbox, assert_ok, write_bundle
from tracecore.dags.spec import Limits
from tracecore.runtimes import vetted_libraries

pytestmark = pytest.mark.slow
SLOW = Limits(timeout_s=60.0)  # pandas + pyarrow + Polars imported at the default CPU share take seconds



COMPUTE = """
    import numpy as np
    import pandas as pd
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc


    def handler(event, context):
        df = pd.DataFrame({"value": event["values"], "group": event["groups"]})
        arr = np.asarray(event["values"], dtype=np.float64)
        table = pa.Table.from_pandas(df, preserve_index=False)
        frame = pl.from_arrow(table)
        by_group = frame.group_by("group").agg(pl.col("value").sum()).sort("group")
        return {
            "versions": {"numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pa.__version__,
                         "polars": pl.__version__},
            "pandas_std": float(df["value"].std()),
            "alert": bool(df["value"].std() > event["threshold"]),
            "numpy_dot": float(arr @ arr),
            "arrow_sum": pc.sum(table["value"]).as_py(),
            "polars_groups": by_group.to_dicts(),
        }
"""


def test_python_computes_with_numpy_pandas_pyarrow_and_polars(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": COMPUTE})
    event = {"values": [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0], "groups": list("abababab"), "threshold": 2.0}
    outcome, _ = sandbox.run(bundle, event=event, limits=SLOW)
    assert_ok(outcome)
    answer = outcome.response
    # Sample standard deviation of the list: sqrt(32 / 7).
    assert answer["pandas_std"] == pytest.approx((32 / 7) ** 0.5)
    assert answer["alert"] is True
    assert answer["numpy_dot"] == 232.0
    assert answer["arrow_sum"] == 40.0
    assert answer["polars_groups"] == [{"group": "a", "value": 18.0}, {"group": "b", "value": 22.0}]
    assert answer["versions"] == {name: vetted_libraries("python3.11")[name]
                                  for name in ("numpy", "pandas", "pyarrow", "polars")}


TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
ETHERS_DECODE = """
    const { ethers } = require('ethers');

    const erc20 = new ethers.Interface(['event Transfer(address indexed from, address indexed to, uint256 value)']);

    exports.handler = async (event) => {
      const parsed = erc20.parseLog({ topics: event.log.topics, data: event.log.data });
      return {
        version: ethers.version,
        topic: ethers.id('Transfer(address,address,uint256)'),
        name: parsed.name,
        from: parsed.args.from,
        to: parsed.args.to,
        raw: parsed.args.value.toString(),
        amount: ethers.formatUnits(parsed.args.value, event.decimals),
      };
    };
"""


def _word(hex_digits: str) -> str:
    return "0x" + hex_digits.rjust(64, "0")


def test_node_decodes_an_erc20_transfer_with_ethers(sandbox: Sandbox, tmp_path: Path) -> None:
    sender, receiver = "1" * 40, "2" * 40  # digits only: the EIP-55 checksum leaves them as they are
    value = 1_234_500_000  # 1234.5 with 6 decimals
    log = {"topics": [TRANSFER_TOPIC, _word(sender), _word(receiver)], "data": _word(format(value, "x"))}
    bundle = write_bundle(tmp_path / "bundle", {"trace.js": ETHERS_DECODE})
    outcome, _ = sandbox.run(bundle, runtime="nodejs", event={"log": log, "decimals": 6}, limits=SLOW)
    assert_ok(outcome)
    assert outcome.response == {
        "version": vetted_libraries("nodejs")["ethers"], "topic": TRANSFER_TOPIC, "name": "Transfer",
        "from": "0x" + sender, "to": "0x" + receiver, "raw": str(value), "amount": "1234.5",
    }


def test_a_vendored_copy_wins_over_the_image(sandbox: Sandbox, tmp_path: Path) -> None:
    """Python: the bundle's own (tiny, fake) pandas; Node: the bundle's own ethers in node_modules."""
    py = write_bundle(tmp_path / "py", {
        "pandas/__init__.py": '__version__ = "0.0.1+vendored"\n',
        "trace.py": """
            import numpy
            import pandas


            def handler(event, context):
                return {"pandas": pandas.__version__, "file": pandas.__file__, "numpy": numpy.__version__}
        """,
    })
    outcome, _ = sandbox.run(py)
    assert_ok(outcome)
    assert outcome.response["pandas"] == "0.0.1+vendored"
    assert outcome.response["file"].endswith("/pandas/__init__.py")
    assert not outcome.response["file"].startswith("/usr/")
    assert outcome.response["numpy"] == vetted_libraries("python3.11")["numpy"]  # the rest still from the image

    node = write_bundle(tmp_path / "node", {
        "node_modules/ethers/package.json": '{"name": "ethers", "version": "5.0.0-vendored", "main": "index.js"}\n',
        "node_modules/ethers/index.js": "exports.version = '5.0.0-vendored';\n",
        "trace.js": "exports.handler = async () => ({ version: require('ethers').version, "
                    "path: require.resolve('ethers') });\n",
    })
    outcome, _ = sandbox.run(node, runtime="nodejs")
    assert_ok(outcome)
    assert outcome.response["version"] == "5.0.0-vendored"
    assert outcome.response["path"].endswith("/node_modules/ethers/index.js")
    assert not outcome.response["path"].startswith("/opt/trace/")


@pytest.mark.parametrize("runtime, files, module", [
    ("python3.11", {"trace.py": "import requests\n\ndef handler(event, context):\n    return 1\n"}, "requests"),
    ("nodejs", {"trace.js": "const axios = require('axios');\nexports.handler = async () => 1;\n"}, "axios"),
])
def test_an_unvetted_import_is_an_init_error_naming_the_module(sandbox: Sandbox, tmp_path: Path, runtime: str,
                                                                 files: dict[str, str], module: str) -> None:
    outcome, _ = sandbox.run(write_bundle(tmp_path / "bundle", files), runtime=runtime)
    assert outcome.exit_reason == "init_error", (outcome.exit_reason, outcome.error_message, outcome.logs[-2000:])
    assert f"'{module}'" in (outcome.error_message or ""), outcome.error_message


NO_INSTALL_PY = """
    import importlib.util
    import shutil
    import socket
    import subprocess


    def handler(event, context):
        tools = {name: shutil.which(name) for name in ("pip", "pip3", "npm", "npx")}
        apt = None  # Debian's minbase keeps apt-get: it must not be able to install anything
        if shutil.which("apt-get"):
            apt = subprocess.run(["apt-get", "-q", "-y", "install", "hello"], capture_output=True).returncode
        try:
            socket.create_connection(("151.101.0.223", 443), timeout=2)  # pypi.org's anycast address
            network = "connected"
        except OSError as exc:
            network = type(exc).__name__
        return {"tools": tools, "pip_module": importlib.util.find_spec("pip") is not None,
                "network": network, "apt_get_install": apt}
"""

NO_INSTALL_NODE = """
    const fs = require('fs');

    exports.handler = async () => {
      const dirs = (process.env.PATH || '').split(':');
      const tools = {};
      for (const name of ['npm', 'npx', 'pip', 'pip3', 'yarn', 'corepack']) {
        tools[name] = dirs.some((dir) => fs.existsSync(`${dir}/${name}`));
      }
      let npmModule = true;
      try { require.resolve('npm'); } catch (_) { npmModule = false; }
      return { tools, npmModule };
    };
"""


def test_no_package_manager_and_no_network(sandbox: Sandbox, tmp_path: Path) -> None:
    outcome, _ = sandbox.run(write_bundle(tmp_path / "py", {"trace.py": NO_INSTALL_PY}))
    assert_ok(outcome)
    answer = outcome.response
    assert answer["tools"] == dict.fromkeys(("pip", "pip3", "npm", "npx"))
    assert answer["pip_module"] is False
    assert answer["apt_get_install"] in (None, *range(1, 256))
    assert answer["network"] != "connected"

    outcome, _ = sandbox.run(write_bundle(tmp_path / "node", {"trace.js": NO_INSTALL_NODE}), runtime="nodejs")
    assert_ok(outcome)
    assert outcome.response == {"tools": dict.fromkeys(("npm", "npx", "pip", "pip3", "yarn", "corepack"), False),
                                "npmModule": False}
