import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import random
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

# the repo is a set of flat scripts, not a package: make `import model` work from any working directory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Without a GPU the Triton kernels run through Triton's interpreter. Triton reads the flag when it is first
# imported (torch.compile may import it), so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# pytest.ini runs the suite in two processes (pytest-xdist: -n 2): each then computes on one thread, and so do the
# scripts it starts, so that two workers on two cores do not oversubscribe them (two processes of two threads each
# on two cores run several times slower than one)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def run(*args, check=True, timeout=300):
    """Run one of the repo's scripts as a user would, from the repo root."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


# ----------------------------------------------------------------------------------------------------
# Test data, made here: no test reads third-party files or needs the network
# ----------------------------------------------------------------------------------------------------
# every capital letter starts a speaker's name (the char-level passkey keys are A-Z), every small letter is in
# a word, and ' - , ; : . ! ? in the punctuation: a play-like stand-in for Tiny Shakespeare
SPEAKERS = ("ADAM", "BEATRIX", "CLAUDIO", "DUKE", "EDGAR", "FLAVIA", "GREGORY", "HUGO", "IRIS", "JAQUES", "KATE",
            "LUCIO", "MIRANDA", "NESTOR", "OLIVIA", "PAULINA", "QUINCE", "ROMEO", "SIMON", "TITUS", "URSULA",
            "VIOLA", "WALTER", "XENIA", "YORICK", "ZARA")
WORDS = ("the and to of a my in you that is not it with be your for his this but have he as so will what thy thee "
         "me all do by no she her shall are our if lord good now love more here then sir king come well there let "
         "which than know day night make say from may upon how go mine one man would heart speak hand yet eyes "
         "give time death life blood house fair sweet word honour queen grace noble think true father mother "
         "brother away never world poor great old young gentle friend hear tell stay leave light fear answer "
         "quick jest zeal vex wax frozen lazy grass green sky blue sun yellow back again question "
         "'tis o'er ne'er i'll well-met good-night").split()


def make_corpus(n_chars=200_000, seed=0):
    """About n_chars of play-like text, the same for a seed: speeches of one to four lines under a speaker's
    name, sentences drawn from WORDS, blank lines between speeches."""
    rng = random.Random(seed)
    speeches, size = [], 0
    while size < n_chars:
        lines = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(1, 2)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
                s = words[0].capitalize()
                for w in words[1:]:
                    s += rng.choices([" ", ", ", "; ", ": ", " - "], [40, 6, 1, 1, 1])[0] + w
                sentences.append(s + rng.choice("....!?"))
            lines.append(" ".join(sentences))
        speeches.append(f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines))
        size += len(speeches[-1]) + 2
    return "\n\n".join(speeches) + "\n"


@pytest.fixture(autouse=True)
def _strict_kernels(request, monkeypatch):
    """Tests of the Triton kernels (marked triton or cuda) run them strictly: a kernel that fails to compile, launch
    or interpret raises instead of passing on the math backend's exact fallback (kernels/triton_attn.py,
    SOFTPLUS_ATTN_STRICT). The fallback's own test unsets it."""
    if request.node.get_closest_marker("cuda") or request.node.get_closest_marker("triton"):
        monkeypatch.setenv("SOFTPLUS_ATTN_STRICT", "1")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """make_corpus() as a text file, what the prepare scripts read with --input."""
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(make_corpus())
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file):
    """The generated corpus prepared char-level into a temporary folder (never into the repo)."""
    d = tmp_path_factory.mktemp("char_data")
    run("data/shakespeare_char/prepare.py", "--input", str(corpus_file), "--out_dir", str(d))
    return d


# The BPE code paths run with a tiny byte-level encoding made here, so no test needs GPT-2's files (or the
# network). It reaches tiktoken.get_encoding(TEST_ENCODING), here and in every script a test runs, as a
# tiktoken plugin: a module of the tiktoken_ext namespace package, in a temporary folder put on sys.path and
# PYTHONPATH (pytest_configure).
TEST_ENCODING = "tiny_bpe"
# GPT-2's pre-tokeniser, as first released: words, numbers and spaces split as GPT-2 splits them
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# merges after the 256 bytes: a space and a digit are one token, as in GPT-2 (the BPE passkey keys need it), and
# common English pairs and words, so encoding is more than copying bytes. 63 of them: with <|endoftext|> the
# vocabulary is 320, a multiple of 64, so the model's embedding has no padding rows (an untrained model samples
# only ids that decode)
MERGES = [bytes([32, d]) for d in b"0123456789"] + [
    b"th", b"he", b"in", b"er", b"an", b"re", b"on", b"at", b"en", b"nd", b"ou", b"ha", b"is", b"or", b"it", b"es",
    b"st", b"ar", b"te", b"ng", b"ll", b"ea", b"ve", b"se", b"me", b"hi", b"wi", b"no", b"the", b"and", b"you",
    b"ing", b"her", b"ill", b"ere", b"our", b" t", b" a", b" s", b" w", b" m", b" h", b" the", b" and", b" you",
    b" b", b" f", b" l", b" g", b" d", b" n", b" o", b" i"]


def tiny_bpe():
    """The test encoding's tiktoken constructor: the 256 bytes, then MERGES, then <|endoftext|>."""
    ranks = {bytes([b]): b for b in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    return {"name": TEST_ENCODING, "pat_str": PAT, "mergeable_ranks": ranks,
            "special_tokens": {"<|endoftext|>": len(ranks)}}


def pytest_configure(config):
    global PLUGIN_DIR
    PLUGIN_DIR = tempfile.mkdtemp(prefix="tiktoken_plugin_")
    os.makedirs(os.path.join(PLUGIN_DIR, "tiktoken_ext"))
    source = (f"TEST_ENCODING = {TEST_ENCODING!r}\nPAT = {PAT!r}\nMERGES = {MERGES!r}\n\n\n"
              f"{inspect.getsource(tiny_bpe)}\n\nENCODING_CONSTRUCTORS = {{TEST_ENCODING: tiny_bpe}}\n")
    with open(os.path.join(PLUGIN_DIR, "tiktoken_ext", f"{TEST_ENCODING}.py"), "w") as f:
        f.write(source)
    sys.path.insert(0, PLUGIN_DIR)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN_DIR, os.environ.get("PYTHONPATH")) if p)


def pytest_unconfigure(config):
    shutil.rmtree(PLUGIN_DIR, ignore_errors=True)


# tiktoken's own sources of GPT-2's BPE (tiktoken_ext/openai_public.py); its cache names a file by sha1(url)
GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")


def interpreter_too_old():
    """Triton before 3.3: its interpreter (the CPU path of the kernels' tests) cannot run the kernels, though the
    kernels compile and run on a GPU with it (read from the package metadata: triton must not be imported yet)."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) < (3, 3)


def triton_cuda_tools():
    """Whether triton's wheel carries the CUDA tools kernels/sass.py compiles and reads GPU code with (found without
    importing triton, which must not happen before TRITON_INTERPRET is set)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    bin_dir = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")
    return all(os.path.isfile(os.path.join(bin_dir, t)) for t in ("ptxas", "nvdisasm", "cuobjdump"))


def gpt2_files_cached():
    """Whether tiktoken.get_encoding('gpt2') finds its files without the network: the cache folder it reads
    (TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache; '' disables it) holds both."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        d = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return bool(d) and all(os.path.isfile(os.path.join(d, hashlib.sha1(u.encode()).hexdigest())) for u in GPT2_URLS)


# ----------------------------------------------------------------------------------------------------
# Markers and skips: what cannot run here is deselected, loudly; a skip fails the run
# ----------------------------------------------------------------------------------------------------
_notes, _skipped = [], []


@pytest.hookimpl(trylast=True)  # after -m has deselected what it does, so the counts are what this adds
def pytest_collection_modifyitems(config, items):
    rules = []
    if not torch.cuda.is_available() and not config.option.markexpr:
        rules.append(("cuda", "no CUDA device here (on a GPU machine: `python -m pytest -m cuda`)"))
    if importlib.util.find_spec("triton") is None:
        rules.append(("triton", "the triton package is not installed (pip install 'triton>=3.2'; Linux only)"))
    elif not torch.cuda.is_available() and interpreter_too_old():
        rules.append(("triton", f"triton {importlib.metadata.version('triton')}'s interpreter cannot run these kernels "
                                "on a CPU (its loop bounds come out as arrays; GPUs are fine): pip install "
                                "'triton>=3.3' to run them here"))
    if not triton_cuda_tools():
        rules.append(("triton_cuda", "triton's CUDA compiler tools (ptxas, nvdisasm, cuobjdump in its wheel) are not "
                                     "here, so the kernels cannot be compiled for sm_80 / sm_90 (pip install "
                                     "'triton>=3.2' on Linux x86_64)"))
    if not gpt2_files_cached():
        rules.append(("gpt2_files", "tiktoken's GPT-2 BPE files are not cached here (set TIKTOKEN_CACHE_DIR to a "
                                    "folder that holds them)"))
    for marker, why in rules:
        out = [it for it in items if it.get_closest_marker(marker)]
        if out:
            items[:] = [it for it in items if not it.get_closest_marker(marker)]
            config.hook.pytest_deselected(items=out)
            _notes.append(f"deselected {len(out)} tests marked {marker}: {why}")
    if hasattr(config, "workeroutput"):  # an xdist worker: its notes go to the controller, which prints them
        config.workeroutput["notes"] = list(_notes)


def pytest_collectreport(report):
    if report.skipped:
        _skipped.append(report)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report)


def pytest_sessionfinish(session, exitstatus):
    # a suite that silently tests less must not pass: what cannot run here is a marker, deselected above
    if _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)  # (a hook of xdist's: unknown where it is not installed)
def pytest_testnodedown(node, error):
    # (xdist's controller) every worker collects every test, so their notes are the same: keep one copy
    for note in getattr(node, "workeroutput", {}).get("notes", []):
        if note not in _notes:
            _notes.append(note)


def pytest_terminal_summary(terminalreporter):
    for note in _notes:
        terminalreporter.write_line(note)
    if _skipped:
        terminalreporter.write_line(f"{len(_skipped)} skipped, which fails the run (use a marker that conftest.py "
                                    "deselects, or make the test's data in the test):", red=True)
        for r in _skipped:
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            terminalreporter.write_line(f"SKIPPED {r.nodeid}: {reason}", red=True)
