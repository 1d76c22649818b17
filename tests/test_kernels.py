"""lcq/kernels.py: the fused MLP and softcapped CE equal the unfused torch math in values and gradients, both the torch
reference (in this process) and the Triton kernels (run by Triton's interpreter on CPU tensors, in a subprocess with
TRITON_INTERPRET=1, so no other test runs under the interpreter)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lcq import kernels

# (N, d, hidden): single tiles, and shapes past one tile that are multiples of no block side (tiles 64 x 64, inner 32)
MLP_SHAPES = [(5, 16, 32), (37, 24, 50), (131, 70, 150)]
# (rows, vocab): vocab below, at and past the CE kernel's block (1024) without being a multiple of it
CE_SHAPES = [(3, 37), (6, 1024), (4, 2500)]


def unfused_mlp(x, w1, w2, slope):
    return F.linear(F.leaky_relu(F.linear(x, w1), slope).square(), w2)


def unfused_ce(z, t, cap, cap_neg=None):
    z = z.float()
    soft = cap * torch.tanh(z / cap)
    if cap_neg is not None:  # the asymmetric softcap (#1923): its own cap below zero
        soft = torch.where(z >= 0, soft, cap_neg * torch.tanh(z / cap_neg))
    return F.cross_entropy(soft, t)


def grads(fn, *args):
    args = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*args)
    out.backward(torch.ones_like(out) if out.ndim else None)
    return out.detach(), [a.grad for a in args if a.is_floating_point()]


def check_mlp(n, d, hidden, slope, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w1, w2 = (torch.randn(*s, generator=g) for s in ((n, d), (hidden, d), (d, hidden)))
    w1 /= d ** 0.5
    w2 /= hidden ** 0.5
    out, gr = grads(lambda a, b, c: kernels.mlp(a, b, c, slope), x, w1, w2)
    ref, gref = grads(lambda a, b, c: unfused_mlp(a, b, c, slope), x, w1, w2)
    # fp32 throughout: only the summation order differs (tile by tile against one matmul)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(gr, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def check_ce(rows, vocab, caps=(30.0,), seed=0):
    """caps: (cap,) or (positive cap, negative cap), the latter passed as the model's 0-d tensors."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * 25  # past the cap, so the softcap bends
    t = torch.randint(0, vocab, (rows,), generator=g)
    args = caps if len(caps) == 1 else [torch.tensor(c) for c in caps]
    out, (gz,) = grads(lambda a: kernels.softcap_ce(a, t, *args), z)
    ref, (gref,) = grads(lambda a: unfused_ce(a, t, *caps), z)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz, gref, rtol=1e-4, atol=1e-7)
    if len(caps) == 1:  # both learned caps at the scalar cap: the same loss and gradient, bit for bit
        same, (gsame,) = grads(lambda a: kernels.softcap_ce(a, t, torch.tensor(caps[0]), torch.tensor(caps[0])), z)
        assert torch.equal(same, out) and torch.equal(gsame, gz)


def run_all():
    for n, d, hidden in MLP_SHAPES:
        for slope in (0.5, 0.0):  # LeakyReLU(0.5)^2 and relu^2
            check_mlp(n, d, hidden, slope)
    for rows, vocab in CE_SHAPES:
        for caps in ((30.0,), (30.0, 20.0), (12.0, 40.0)):  # one cap; asymmetric caps either way round
            check_ce(rows, vocab, caps)


def test_reference_path_is_the_unfused_math():
    assert not kernels.use_triton(torch.zeros(1)) or kernels.INTERPRET
    run_all()


def test_triton_kernels_match_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton kernels checked" in proc.stdout


def check_saved():
    """The CE keeps one logits-sized tensor for its backward (the gradient its forward formed), the MLP (x, w1, w2,
    pre-activation): the unfused graphs keep the fp32 logits, their tanh and the softcapped log-softmax, and the
    pre-activation, its LeakyReLU and the activation."""
    z = torch.randn(8, 40, requires_grad=True)
    loss = kernels.softcap_ce(z, torch.randint(0, 40, (8,)), 30.0)
    saved = loss.grad_fn.next_functions[0][0].saved_tensors
    assert [tuple(s.shape) for s in saved] == [(8, 40)]
    x = torch.randn(6, 16, requires_grad=True)
    out = kernels.mlp(x, torch.randn(32, 16), torch.randn(16, 32), 0.5)
    assert [tuple(s.shape) for s in out.grad_fn.saved_tensors] == [(6, 16), (32, 16), (16, 32), (6, 32)]


def test_ce_kernel_offsets_are_int64():
    """Issue 27: the CE kernel's row offsets (row * stride, row * V) in int32 wrap at 2**31 elements, 262,144 rows of
    vocab 8192; the interpreter computes in numpy int64 and cannot show it, so the source is checked: the row index is
    cast to int64 before any offset is formed from it."""
    import inspect
    import re

    module = inspect.getsource(kernels)  # the text, so the check holds without triton installed too
    src = module[module.index("def _ce_kernel("):module.index("\ndef ", module.index("def _ce_kernel("))]
    assert re.search(r"row = tl\.program_id\(0\)\.to\(tl\.int64\)", src), src
    assert src.count("program_id") == 1  # no second, uncast index
    assert 262_144 * 8192 >= 2**31  # the row count the comment names is where int32 ends


def test_bf16_autocast_keeps_the_residual_in_bf16():
    from lcq.config import make_config
    from lcq.data import segment_bounds
    from lcq.model import GPT

    torch.manual_seed(0)
    model = GPT(make_config("tiny", vocab_size=64), bos_id=1)
    ids = torch.randint(2, 64, (40,))
    ids[0] = ids[17] = 1
    cu = segment_bounds(ids, 1, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.hidden(ids, cu, 64).dtype == torch.bfloat16
        loss = model.loss(ids, ids, cu, 64)
    loss.backward()
    assert loss.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay fp32
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    with torch.no_grad():
        assert model.hidden(ids, cu, 64).dtype == torch.float32  # no autocast: fp32 as before


def test_gpu_box_recipe_is_one_recipe_and_preflight_names_each_missing_piece(monkeypatch):
    from pathlib import Path

    from lcq import artifact, attention
    from lcq.tools import preflight
    from lcq.config import make_config

    repo = Path(__file__).resolve().parents[1]
    req, readme = (repo / "requirements-gpu.txt").read_text(), (repo / "README.md").read_text()
    assert "torch==2.9.1+cu128" in req.splitlines() and "--extra-index-url https://download.pytorch.org/whl/cu128" in req
    for text in (req, readme, attention.INSTALL_HINT):
        assert preflight.FA3_INSTALL in text
    assert artifact.LRZIP_INSTALL in readme and "pip install -r requirements-gpu.txt" in readme
    cfg = make_config("tiny", compressor="group")
    assert preflight.setup_row(cfg, torch.device("cpu")).status in ("GO", "WARN")  # CPU needs no GPU piece
    monkeypatch.setattr(kernels, "triton", None)
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(artifact, "lrzip_binary", lambda: None)
    row = preflight.setup_row(cfg, torch.device("cuda"))
    assert row.status == "NO-GO" and preflight.FA3_INSTALL in row.result and preflight.TORCH_INSTALL in row.result
    assert artifact.LRZIP_INSTALL in row.result and set(row.data["missing"]) == {"triton", "flash-attn 3 (flash_attn_interface)"}


if __name__ == "__main__":
    assert kernels.INTERPRET and kernels.use_triton(torch.zeros(1)), "run with TRITON_INTERPRET=1 and triton installed"
    run_all()
    check_saved()
    print("triton kernels checked")
