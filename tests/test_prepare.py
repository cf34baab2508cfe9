"""
Tests for the Tiny Shakespeare prepare scripts. They read the read-only copy in ../shared
(never the network) and write only into pytest's tmp_path.
"""
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
INPUT = SHARED / 'data/tinyshakespeare/input.txt'
TIKTOKEN_CACHE = SHARED / 'tiktoken_cache'

try:
    from data.shakespeare.prepare import prepare as prepare_bpe
    from data.shakespeare_char.prepare import prepare as prepare_char
except ImportError:
    # plain `pytest` puts tests/ on sys.path, not the repo root that `data` lives in
    sys.path.insert(0, str(ROOT))
    from data.shakespeare.prepare import prepare as prepare_bpe
    from data.shakespeare_char.prepare import prepare as prepare_char

pytestmark = pytest.mark.skipif(not INPUT.is_file(), reason=f"no local Tiny Shakespeare at {INPUT}")

@pytest.fixture
def text():
    return INPUT.read_text(encoding='utf-8')

@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    # a developer's own TINYSHAKESPEARE_PATH must not change which source a test exercises
    monkeypatch.delenv('TINYSHAKESPEARE_PATH', raising=False)

def read_char(out):
    with open(out / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    train = np.fromfile(out / 'train.bin', dtype=np.uint16)
    val = np.fromfile(out / 'val.bin', dtype=np.uint16)
    return meta, train, val

def test_char_round_trip(tmp_path, text):
    stats = prepare_char(input_path=str(INPUT), out_dir=str(tmp_path))
    meta, train, val = read_char(tmp_path)
    assert meta['vocab_size'] == 65 == len(meta['itos']) == len(meta['stoi'])
    assert all(meta['stoi'][meta['itos'][i]] == i for i in range(65))
    assert [meta['itos'][i] for i in range(65)] == sorted(set(text))
    def decode(ids):
        return ''.join(meta['itos'][i] for i in ids.tolist())
    assert decode(train) + decode(val) == text
    n = len(text)
    assert len(train) == int(n * 0.9) and len(val) == n - int(n * 0.9)
    assert stats == {'chars': n, 'vocab_size': 65, 'train_tokens': len(train), 'val_tokens': len(val)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['meta.pkl', 'train.bin', 'val.bin']

def test_char_env_var(tmp_path, monkeypatch, text):
    monkeypatch.setenv('TINYSHAKESPEARE_PATH', str(INPUT))
    # the env var must win over the download, so make any download attempt fail loudly
    def no_network(*a, **k):
        raise AssertionError("should not download")
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    stats = prepare_char(out_dir=str(tmp_path))
    assert stats['chars'] == len(text)
    assert (tmp_path / 'train.bin').stat().st_size == 2 * stats['train_tokens']

def test_char_existing_input_in_out_dir(tmp_path, monkeypatch, text):
    (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: pytest.fail("should not download"))
    assert prepare_char(out_dir=str(tmp_path))['chars'] == len(text)

def test_char_offline(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError('no network here')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        prepare_char(out_dir=str(out))
    msg = str(e.value.code)
    assert '\n' not in msg and 'no network here' in msg
    assert '--input' in msg and 'TINYSHAKESPEARE_PATH' in msg
    # nothing half-written: no input.txt, no temp files, no outputs
    assert not out.exists() or list(out.iterdir()) == []

def test_char_missing_input(tmp_path):
    missing = tmp_path / 'nope.txt'
    with pytest.raises(SystemExit) as e:
        prepare_char(input_path=str(missing), out_dir=str(tmp_path))
    msg = str(e.value.code)
    assert '\n' not in msg and '--input' in msg and str(missing) in msg
    assert list(tmp_path.iterdir()) == []

def test_bpe_round_trip(tmp_path, monkeypatch, text):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"no GPT-2 BPE files at {TIKTOKEN_CACHE}")
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(TIKTOKEN_CACHE))
    import tiktoken
    stats = prepare_bpe(input_path=str(INPUT), out_dir=str(tmp_path))
    with open(tmp_path / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'gpt2'}
    enc = tiktoken.get_encoding(meta['tokenizer'])
    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16)
    n = len(text)
    assert enc.decode(train.tolist()) == text[:int(n * 0.9)]
    assert enc.decode(val.tolist()) == text[int(n * 0.9):]
    # each token is exactly 2 bytes on disk
    assert (tmp_path / 'train.bin').stat().st_size == 2 * len(train) == 2 * stats['train_tokens']
    assert stats['val_tokens'] == len(val) and stats['vocab_size'] == 50257

def test_bpe_tokenizer_unavailable(tmp_path, monkeypatch):
    import tiktoken
    def offline(name):
        raise ConnectionError('no network here')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(SystemExit) as e:
        prepare_bpe(input_path=str(INPUT), out_dir=str(tmp_path))
    msg = str(e.value.code)
    assert '\n' not in msg and 'TIKTOKEN_CACHE_DIR' in msg
    assert list(tmp_path.iterdir()) == []

def test_char_cli(tmp_path):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, 'data/shakespeare_char/prepare.py', '--input', str(INPUT), '--out_dir', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert 'vocab size 65' in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ['meta.pkl', 'train.bin', 'val.bin']
