"""
Tests for the Tiny Shakespeare prepare scripts, on the corpus conftest.py generates (never the network), char-level
and BPE (conftest's tiny test encoding; GPT-2's own where its files are cached). They write only into tmp_path.
"""
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from conftest import TEST_ENCODING, make_corpus, run
from dataset import get_tokenizer, model_vocab_size
from eval_passkey import CHAR_ALPHABET, FILLER_SENTENCE, KEY_SENTENCE, QUESTION
from model import GPT, GPTConfig
from runs import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# the test encoding everywhere; GPT-2's own BPE (its real vocabulary and end-of-text id) where its files are cached
ENCODINGS = [TEST_ENCODING, pytest.param('gpt2', marks=pytest.mark.gpt2_files)]

try:
    from data.shakespeare.prepare import prepare as prepare_bpe
    from data.shakespeare_char.prepare import prepare as prepare_char
except ImportError:
    # plain `pytest` puts tests/ on sys.path, not the repo root that `data` lives in
    sys.path.insert(0, str(ROOT))
    from data.shakespeare.prepare import prepare as prepare_bpe
    from data.shakespeare_char.prepare import prepare as prepare_char

@pytest.fixture
def INPUT(corpus_file):
    return corpus_file

@pytest.fixture
def text(corpus_file):
    return corpus_file.read_text(encoding='utf-8')

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

def test_generated_corpus(text):
    """The stand-in for Tiny Shakespeare: deterministic, ~200 KB, speeches in paragraphs, and every character
    the tests' prompts and the passkey template use."""
    assert make_corpus() == text and make_corpus(seed=1) != text and 150_000 < len(text) < 300_000
    assert text.count('\n\n') > 500 and 'ROMEO:\n' in text
    used = set(CHAR_ALPHABET.lower() + CHAR_ALPHABET + ''.join(KEY_SENTENCE) + QUESTION + FILLER_SENTENCE + ",:'-!;\n")
    assert used <= set(text)

def test_char_round_trip(tmp_path, text, INPUT):
    stats = prepare_char(input_path=str(INPUT), out_dir=str(tmp_path))
    meta, train, val = read_char(tmp_path)
    V = len(set(text))
    assert meta['vocab_size'] == V == len(meta['itos']) == len(meta['stoi'])
    assert all(meta['stoi'][meta['itos'][i]] == i for i in range(V))
    assert [meta['itos'][i] for i in range(V)] == sorted(set(text))
    def decode(ids):
        return ''.join(meta['itos'][i] for i in ids.tolist())
    assert decode(train) + decode(val) == text
    n = len(text)
    assert len(train) == int(n * 0.9) and len(val) == n - int(n * 0.9)
    assert stats == {'chars': n, 'vocab_size': V, 'train_tokens': len(train), 'val_tokens': len(val)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['meta.pkl', 'train.bin', 'val.bin']

def test_char_env_var(tmp_path, monkeypatch, text, INPUT):
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

@pytest.mark.parametrize('encoding', ENCODINGS)
def test_bpe_round_trip(tmp_path, text, INPUT, encoding):
    stats = prepare_bpe(input_path=str(INPUT), out_dir=str(tmp_path), encoding=encoding)
    with open(tmp_path / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    enc = tiktoken.get_encoding(encoding)
    assert meta == {'vocab_size': enc.n_vocab, 'tokenizer': encoding}
    if encoding == 'gpt2':
        assert enc.n_vocab == 50257 and enc.eot_token == 50256 and model_vocab_size(meta) == model_vocab_size(None) == 50304
    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16)
    n = len(text)
    assert enc.decode(train.tolist()) == text[:int(n * 0.9)]
    assert enc.decode(val.tolist()) == text[int(n * 0.9):]
    # each token is exactly 2 bytes on disk
    assert (tmp_path / 'train.bin').stat().st_size == 2 * len(train) == 2 * stats['train_tokens']
    assert stats['val_tokens'] == len(val) and stats['vocab_size'] == enc.n_vocab
    assert len(train) < 0.9 * n  # merges happened: fewer tokens than bytes

def test_bpe_cli_and_sample(tmp_path, INPUT):
    """The BPE pipeline as a user runs it, with the test encoding (a tiktoken plugin the scripts find on
    PYTHONPATH): prepare --encoding records it in meta.pkl, and sample.py decodes a checkpoint's tokens with it."""
    d = tmp_path / 'bpe'
    r = run('data/shakespeare/prepare.py', '--input', str(INPUT), '--out_dir', str(d), '--encoding', TEST_ENCODING)
    enc = tiktoken.get_encoding(TEST_ENCODING)
    assert f'vocab size {enc.n_vocab}' in r.stdout
    with open(d / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    assert meta['tokenizer'] == TEST_ENCODING
    assert enc.n_vocab == model_vocab_size(meta) == 320  # no padding rows: whatever the model samples decodes
    encode, decode = get_tokenizer(meta)
    assert encode(' the 4<|endoftext|>') == [enc.encode_single_token(b' the'), enc.encode_single_token(b' 4'), enc.eot_token]
    assert decode(encode('Hark, o\'er 3 seas!')) == 'Hark, o\'er 3 seas!'
    args = dict(block_size=16, vocab_size=model_vocab_size(meta), n_layer=1, n_head=2, n_embd=16, attn='lssar')
    save_checkpoint({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'iter_num': 0,
                     'config': {'dataset': 'bpe', 'data_dir': str(d)}}, str(d / 'ckpt.pt'))
    r = run('sample.py', f'--out_dir={d}', '--start=ROMEO: the', '--num_samples=1', '--max_new_tokens=20',
            '--device=cpu', '--seed=3')
    assert 'tokenizer BPE' in r.stdout
    sample = r.stdout.split('ROMEO: the', 1)[1].split('---------------')[0]
    assert sample.strip()  # an untrained model's 20 tokens, whatever they are, decoded by the test encoding

def test_bpe_tokenizer_unavailable(tmp_path, monkeypatch, INPUT):
    import tiktoken
    def offline(name):
        raise ConnectionError('no network here')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(SystemExit) as e:
        prepare_bpe(input_path=str(INPUT), out_dir=str(tmp_path))
    msg = str(e.value.code)
    assert '\n' not in msg and 'TIKTOKEN_CACHE_DIR' in msg
    assert list(tmp_path.iterdir()) == []

def test_char_cli(tmp_path, text, INPUT):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, 'data/shakespeare_char/prepare.py', '--input', str(INPUT), '--out_dir', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert f'vocab size {len(set(text))}' in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ['meta.pkl', 'train.bin', 'val.bin']
