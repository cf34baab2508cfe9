import os
import sys

# the repo is a set of flat scripts, not a package: make `import model` work from any working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# tests and CI read third-party data from ../shared (never from the repo)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
