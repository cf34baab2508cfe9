"""torch.compile: the model's forward compiles without a graph break for every attention on every backend that
serves it on this machine (the math backend through its custom ops included), and a compiled training step
computes what the eager one does."""

import pytest
import torch

import kernels
from model import GPT, GPTConfig, attn_names


def tiny(attn, backend, T=32):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=T, vocab_size=11, n_layer=2, n_head=2, n_embd=16, attn=attn, attn_backend=backend))


CASES = [(a, b) for a in attn_names() for b in ("reference", *kernels.BACKENDS)]


@pytest.mark.parametrize("attn,backend", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_no_graph_breaks(attn, backend):
    model = tiny(attn, backend)
    x = torch.randint(0, 11, (2, 32))
    probe = torch.zeros(1, 1, 1, 8)
    for grad in (True, False):
        if backend not in ("auto", "reference") and kernels.why_not(backend, model.config.spec, probe, grad):
            continue  # this backend does not serve this call on this machine (e.g. flex training on CPU)
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(model)(x, x)
        assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
        assert explained.graph_count == 1


@pytest.mark.parametrize("attn", ["lssar", "softmax"])
def test_compiled_train_step_matches_eager(attn):
    """Loss and gradients of torch.compile(model) = eager (lssar: the math backend's custom ops, forward and backward)."""
    x = torch.randint(0, 11, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for compiled in (False, True):
        model = tiny(attn, "auto")
        run = torch.compile(model) if compiled else model
        _, loss = run(x, x)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layers", ["3*softmax:window=8,lssar:pos=none:temp=logn",
                                    "softmax:gate=forget:pos=none:window=8,stickbreak:pos=none"])
def test_mixed_stacks_compile_without_graph_breaks(layers):
    """A stack with a spec per layer (windows, a length temperature, gate, stick-breaking): one graph, training
    and no-grad, and a compiled training step's loss equals the eager one's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=11, n_layer=4, n_head=2, n_embd=16, layers=layers))
    x = torch.randint(0, 11, (2, 32), generator=torch.Generator().manual_seed(1))
    for grad in (True, False):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(model)(x, x)
        assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
        assert explained.graph_count == 1
    torch._dynamo.reset()
    eager, compiled = model(x, x)[1], torch.compile(model)(x, x)[1]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
