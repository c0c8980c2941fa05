"""schemathesis fuzzes `hybridlm serve` from its own /openapi.json with its default checks.

Every operation, examples generated from the schema (valid and invalid), each answer
checked for: no 5xx, documented status codes, content types, headers and bodies, invalid
data rejected, valid data accepted (see schemathesis_hooks.py for the one refinement),
405 with Allow for unsupported methods, and, with an API key, that auth is not ignored.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.serve.app import BackgroundServer, ServerSettings, create_app
from hybridlm.serve.engine import Engine, wait_idle
from hybridlm.training.tokenizer import default_tokenizer

from helpers import TINY_MODEL

HERE = Path(__file__).parent
EXAMPLES = 12   # per operation and phase; raise it (or run `schemathesis run` by hand) to fuzz longer


def fuzz(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(exe), "run", url + "/openapi.json", "--max-examples", str(EXAMPLES), "--seed", "7",
           "--exclude-checks", "positive_data_acceptance", "--report-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return HybridLM(HybridConfig(**{**TINY_MODEL, "max_seq_len": 24})).eval()


@pytest.mark.parametrize("api_key", [None, "sekrit"])
def test_schemathesis_finds_no_failure(tiny, tmp_path, api_key):
    tok = default_tokenizer()
    engine = Engine(tiny, tok, max_batch=8, max_queue=16)
    app = create_app(engine, tok, ServerSettings(model_name="tiny", max_request_bytes=32 * 1024, api_key=api_key))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with BackgroundServer(app) as srv:
            # with a key: the same checks (ignored_auth among them) in the fuzzing phase only, to save time
            auth = ("--header", f"Authorization: Bearer {api_key}", "--phases", "fuzzing") if api_key else ()
            run = fuzz(srv.url, tmp_path, *auth)
            assert wait_idle(engine, timeout=30)
    finally:
        torch.set_num_threads(threads)
    tail = "\n".join(run.stdout.splitlines()[-60:])
    assert run.returncode == 0 and "Test cases:" in run.stdout, tail
