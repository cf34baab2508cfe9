"""The GPT around the attention: KV-cache decoding equals a full forward pass for every attention kind,
position encodings, config validation, the configurator."""

import pytest
import torch

from configurator import configure
from eval_length import eval_time
from model import GPT, GPTConfig
from runs import model_from_checkpoint
from tests.test_attention import CASES

KINDS = CASES  # every attention of the registry (and re-weighting on each normalised one)


def tiny(attn="softmax", reweight_p=0.0, pos="rope", block_size=32, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=block_size, vocab_size=23, n_layer=2, n_head=2, n_embd=16, attn=attn,
                    reweight_p=reweight_p, pos=pos, **kw)
    return GPT(cfg).double().eval()


@pytest.mark.parametrize("attn,p", KINDS)
@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
def test_kv_cache_matches_full_forward(attn, p, pos):
    # the cached path feeds a prefix, then one token at a time: every position must see its absolute
    # position (RoPE angle, LSSA's log N_i scale, the re-weighting's offset rows) exactly as in one full pass
    model = tiny(attn, p, pos, attn_chunk=7)  # a small chunk so the full pass also crosses chunk borders
    idx = torch.randint(0, 23, (2, 30))
    full, _ = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attn,p", [("lssar", 0.0), ("softmax", 0.0), ("sigmoid", 0.0)])
def test_generate_uses_cache_and_matches_recompute(attn, p):
    # greedy generation with the cache must pick the same tokens as recomputing the whole context each step
    model = tiny(attn, p)
    prompt = torch.randint(0, 23, (1, 4))
    out = model.generate(prompt, 12, temperature=0)
    ref = prompt
    for _ in range(12):
        logits, _ = model(ref)
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generate_past_block_size():
    # rope models keep the whole context beyond block_size; learned ones crop to the last block_size tokens
    prompt = torch.randint(0, 23, (1, 6))
    assert tiny(pos="rope", block_size=8).generate(prompt, 10, temperature=0).shape == (1, 16)
    learned = tiny(pos="learned", block_size=8)
    out = learned.generate(prompt, 10, temperature=0)
    logits, _ = learned(out[:, -9:-1])  # the last step saw exactly the 8 tokens before the last one
    assert out[0, -1] == logits[0, -1].argmax()


def test_learned_positions_refuse_longer_input():
    model = tiny(pos="learned", block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_reduction_sum_is_per_token_total():
    model = tiny()
    x, y = torch.randint(0, 23, (2, 2, 10))
    _, mean = model(x, y)
    _, total = model(x, y, reduction="sum")
    torch.testing.assert_close(total / y.numel(), mean)


@pytest.mark.parametrize("bad,msg", [
    (dict(attn="flash"), "unknown attn"),
    (dict(reweight_p=-1.0), "reweight_p must be >= 0"),
    (dict(attn="sigmoid", reweight_p=15.0), "unnormalised"),
    (dict(pos="sinusoid"), "unknown pos"),
    (dict(rope_scaling="linear"), "unknown rope_scaling"),
    (dict(rope_scaling="yarn", pos="learned"), "extends RoPE"),
    (dict(rope_factor=0.5), "rope_factor must be 0"),
    (dict(attn_backend="flash"), "unknown attn_backend"),
    (dict(n_embd=30, n_head=4), "divisible"),
])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**bad)


def test_configurator(tmp_path):
    g = dict(batch_size=12, learning_rate=6e-4, attn="softmax", compile=False, out_dir="out")
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("attn = 'lssar'\nbatch_size = 4\n")
    out = configure(g, [str(cfg_file), "--learning_rate=1", "--compile=True", "--out_dir=123"])
    assert out == dict(batch_size=4, learning_rate=1.0, attn="lssar", compile=True, out_dir="123")
    assert isinstance(out["learning_rate"], float)
    with pytest.raises(SystemExit, match="unknown key 'bach_size'.*batch_size"):
        configure(dict(g), ["--bach_size=3"])
    with pytest.raises(SystemExit, match="batch_size expects int"):
        configure(dict(g), ["--batch_size=abc"])
    with pytest.raises(SystemExit, match="compile expects bool"):
        configure(dict(g), ["--compile=1"])
    with pytest.raises(SystemExit, match="--key=value"):
        configure(dict(g), ["--batch_size"])
    with pytest.raises(SystemExit, match="cannot read config file"):
        configure(dict(g), [str(tmp_path / "missing.py")])
    cfg_file.write_text("atn = 'lssa'\n")
    with pytest.raises(SystemExit, match="unknown key 'atn'"):
        configure(dict(g), [str(cfg_file)])


def test_checkpoint_in_the_old_format_means_the_same():
    """Checkpoints written before the canonical form stored the shorthand as given: ('lssar', 0.0) meant LSSA with
    p = 15. They load as ('lssa', 15.0), compute exactly that, and an eval-time p = 0 switches it off."""
    old_args = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True, attn="lssar",
                    reweight_p=0.0, pos="rope", rope_base=10000.0, attn_backend="auto", attn_chunk=256)
    torch.manual_seed(0)
    lssar = GPT(GPTConfig(**dict(old_args, attn="lssa", reweight_p=15.0))).double().eval()
    ckpt = {"model": lssar.state_dict(), "model_args": old_args}
    loaded = model_from_checkpoint(ckpt).double().eval()
    assert (loaded.config.attn, loaded.config.reweight_p) == ("lssa", 15.0)
    idx = torch.randint(0, 23, (2, 16))
    torch.testing.assert_close(loaded(idx)[0], lssar(idx)[0], rtol=0, atol=0)
    off = model_from_checkpoint(ckpt, reweight_p=0.0).double().eval()
    assert (off.config.attn, off.config.reweight_p) == ("lssa", 0.0)
    assert not torch.allclose(off(idx)[0], lssar(idx)[0])
    eff, trained, label = eval_time("out-old", old_args, {"reweight_p": 0.0})
    assert (eff.attn, eff.reweight_p, trained.reweight_p, label) == ("lssa", 0.0, 15.0, "old (eval p=0)")
