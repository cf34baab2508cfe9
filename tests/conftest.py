import os
import subprocess
import sys

import pytest

# the repo is a set of flat scripts, not a package: make `import model` work from any working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# tests and CI read third-party data from ../shared (never from the repo)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
INPUT = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")


def run(*args, check=True, timeout=300):
    """Run one of the repo's scripts as a user would, from the repo root."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """Tiny Shakespeare prepared char-level from ../shared into a temporary folder (never into the repo)."""
    if not os.path.exists(INPUT):
        pytest.skip(f"{INPUT} not found")
    d = tmp_path_factory.mktemp("shakespeare_char")
    run("data/shakespeare_char/prepare.py", "--input", INPUT, "--out_dir", str(d))
    return d
