"""covariance ops (torch path) against fp64 references computed independently of the op."""

import pytest
import torch
import torch.nn.functional as F

from utilrank_kernels.ops import conv_covariance_update, covariance_update, mirror_upper_


def gram64(x2d: torch.Tensor) -> torch.Tensor:
    x = x2d.double()
    return x.T @ x


def im2col64(x, kernel_size, stride, padding, dilation):
    """Patches by explicit slicing of the zero-padded input (no F.unfold), one row per output pixel."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    xp = F.pad(x.double(), (pw, pw, ph, ph))
    n, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = torch.stack([
        xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
        for i in range(kh) for j in range(kw)
    ], dim=2)  # [n, c, kh*kw, oh, ow]
    return cols.reshape(n, c * kh * kw, oh * ow).transpose(1, 2).reshape(-1, c * kh * kw)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# fp32 products accumulate rounding ~ eps * sqrt(N); half-precision inputs are exact in fp32 products
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 7), (300, 17), (4, 33, 24), (2, 3, 5, 40), (2, 70, 300), (90, 600)],
                         ids=lambda s: "x".join(map(str, s)))
def test_covariance_matches_fp64(shape, dtype):
    x = torch.randn(shape).to(dtype)
    acc = torch.zeros(shape[-1], shape[-1], dtype=torch.float64)
    covariance_update(acc, x, backend="torch")
    ref = gram64(x.reshape(-1, shape[-1]))
    assert rel_err(acc, ref) < 1e-6
    assert torch.equal(acc, acc.T)


def test_covariance_accumulates_over_batches_and_noncontiguous():
    xs = [torch.randn(64, 20).T[:, :16] for _ in range(3)]  # non-contiguous (20, 16) views
    acc = torch.zeros(16, 16, dtype=torch.float64)
    for x in xs:
        covariance_update(acc, x)
    ref = sum(gram64(x) for x in xs)
    assert rel_err(acc, ref) < 1e-6


def test_upper_updates_then_one_mirror_equal_full_updates():
    """The statistics pass's mode: upper triangles only, the lower one untouched, one mirror after the last
    batch; bitwise the accumulator the full updates give (the same fp64 sums, in the same order)."""
    xs = [torch.randn(2, 40, 300) for _ in range(3)]
    convs = [torch.randn(2, 3, 9, 8) for _ in range(3)]
    full, upper = (torch.zeros(300, 300, dtype=torch.float64) for _ in range(2))
    full_c, upper_c = (torch.zeros(27, 27, dtype=torch.float64) for _ in range(2))
    for x, xc in zip(xs, convs, strict=True):
        covariance_update(full, x)
        covariance_update(upper, x, upper=True)
        conv_covariance_update(full_c, xc, 3, 2, 1, 1)
        conv_covariance_update(upper_c, xc, 3, 2, 1, 1, upper=True)
    for acc in (upper, upper_c):
        assert not acc.tril(-1).any()
    assert torch.equal(mirror_upper_(upper), full)
    assert torch.equal(mirror_upper_(upper_c), full_c)
    assert rel_err(full, sum(gram64(x.reshape(-1, 300)) for x in xs)) < 1e-6
    assert torch.equal(mirror_upper_(upper), full)  # idempotent


def test_covariance_mask_excludes_tokens():
    x = torch.randn(3, 11, 9)
    mask = torch.rand(3, 11) > 0.4
    x[~mask] = float("nan")  # masked tokens must not reach the statistics at all
    acc = torch.zeros(9, 9, dtype=torch.float64)
    covariance_update(acc, x, mask)
    assert rel_err(acc, gram64(x[mask])) < 1e-6


def test_covariance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="accumulator has shape"):
        covariance_update(torch.zeros(3, 3, dtype=torch.float64), torch.randn(5, 4))
    with pytest.raises(ValueError, match="mask must be bool"):
        covariance_update(torch.zeros(4, 4, dtype=torch.float64), torch.randn(5, 4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown backend"):
        covariance_update(torch.zeros(4, 4, dtype=torch.float64), torch.randn(5, 4), backend="fast")


CONV_CASES = [
    # (C, H, W, kernel, stride, padding, dilation)
    pytest.param(3, 9, 11, (3, 3), (2, 2), (1, 1), (1, 1), id="k3-s2-p1"),
    pytest.param(2, 12, 10, (3, 3), (1, 1), (2, 2), (2, 2), id="k3-d2-p2"),
    pytest.param(4, 8, 9, (3, 1), (1, 2), (1, 0), (1, 1), id="k3x1-s1x2"),
    pytest.param(3, 10, 7, (2, 3), (2, 1), (0, 1), (2, 1), id="k2x3-d2x1"),
    pytest.param(1, 16, 16, (4, 4), (4, 4), (0, 0), (1, 1), id="patchify-k4-s4"),
    # patches that tile the image take a reshape path: uneven sizes drop the last rows/columns
    pytest.param(2, 10, 9, (4, 4), (4, 4), (0, 0), (1, 1), id="patchify-k4-s4-uneven"),
    pytest.param(3, 8, 9, (2, 3), (2, 3), (0, 0), (1, 1), id="patchify-k2x3-s2x3"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("c,h,w,k,s,p,d", CONV_CASES)
def test_conv_covariance_matches_explicit_im2col(c, h, w, k, s, p, d, channels_last):
    x = torch.randn(3, c, h, w)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    acc = torch.zeros(c * k[0] * k[1], c * k[0] * k[1], dtype=torch.float64)
    conv_covariance_update(acc, x, k, s, p, d, backend="torch")
    assert rel_err(acc, gram64(im2col64(x, k, s, p, d))) < 1e-6


def test_conv_covariance_chunks_bound_memory(monkeypatch):
    import utilrank_kernels.ops.covariance as cov

    monkeypatch.setattr(cov, "_IM2COL_CHUNK_BYTES", 1)  # one image per chunk
    x = torch.randn(5, 2, 6, 6)
    acc = torch.zeros(18, 18, dtype=torch.float64)
    conv_covariance_update(acc, x, 3, 1, 1, 1)
    assert rel_err(acc, gram64(im2col64(x, (3, 3), (1, 1), (1, 1), (1, 1)))) < 1e-6


def test_covariance_custom_ops_under_torch_compile():
    """Eager calls skip the custom ops; torch.compile goes through them (schema, fake, mutation)."""
    ops = torch.ops.utilrank
    x, xc = torch.randn(2, 5, 130), torch.randn(2, 3, 8, 8)
    torch.library.opcheck(ops.covariance_update.default,
                          (torch.zeros(130, 130, dtype=torch.float64), x, x[..., 0] > 0, "torch", False))
    torch.library.opcheck(ops.covariance_update.default,
                          (torch.zeros(130, 130, dtype=torch.float64), x, None, "torch", False, True))
    torch.library.opcheck(ops.conv_covariance_update.default,
                          (torch.zeros(27, 27, dtype=torch.float64), xc, [3, 3], [2, 2], [1, 1], [1, 1], "torch"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def update(acc, x, xc, acc_conv):
        covariance_update(acc, x, backend="torch")
        conv_covariance_update(acc_conv, xc, 3, 2, 1, 1, backend="torch")

    acc, acc_conv = torch.zeros(130, 130, dtype=torch.float64), torch.zeros(27, 27, dtype=torch.float64)
    update(acc, x, xc, acc_conv)
    assert rel_err(acc, gram64(x.reshape(-1, 130))) < 1e-6
    assert rel_err(acc_conv, gram64(im2col64(xc, (3, 3), (2, 2), (1, 1), (1, 1)))) < 1e-6
