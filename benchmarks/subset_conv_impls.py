"""Three ways to compute a per-sample channel subset, against a prefix slice and full width (docs/benchmarks.md).

Two 3x3 convolutions C -> P -> C, each sample keeping its own k = P/2 inner channels: grouped convolution with
per-sample gathered weights (what dsnet.layers.channel_subset uses), a per-sample loop of dense convolutions, and
im2col + batched matmul. ``python benchmarks/subset_conv_impls.py [threads]``.
"""

import sys

import torch
import torch.nn.functional as F

from dsnet.bench.timing import interleaved, summarize
from dsnet.layers.channel_subset import subset_conv2d, topk_channels


def loop(x, w, out_idx, in_idx, stride, pad):
    outs = []
    for n in range(x.shape[0]):
        wn = w[out_idx[n]] if out_idx is not None else w
        wn = wn[:, in_idx[n]] if in_idx is not None else wn
        outs.append(F.conv2d(x[n : n + 1], wn, None, stride, pad))
    return torch.cat(outs)


def im2col_bmm(x, w, out_idx, in_idx, stride, pad):
    n, k = x.shape[0], w.shape[2]
    if out_idx is not None:
        wg = w[out_idx]
    else:
        wg = w[torch.arange(w.shape[0])[None, :, None], in_idx[:, None, :]]
    cols = F.unfold(x, k, padding=pad, stride=stride)
    size = (x.shape[2] + 2 * pad - k) // stride + 1
    return torch.bmm(wg.reshape(n, wg.shape[1], -1), cols).view(n, wg.shape[1], size, -1)


def measure(c: int, hw: int, n: int) -> str:
    """One shape: medians (ms) of every implementation, interleaved."""
    k = c // 2
    w1, w2, x = torch.randn(c, c, 3, 3), torch.randn(c, c, 3, 3), torch.randn(n, c, hw, hw)
    idx, _ = topk_channels(torch.rand(n, c), k)
    p1, p2 = w1[:k].contiguous(), w2[:, :k].contiguous()

    def pair(impl):
        return lambda: impl(impl(x, w1, idx, None, 1, 1), w2, None, idx, 1, 1)

    ref = pair(subset_conv2d)()
    for impl in (loop, im2col_bmm):
        assert torch.allclose(ref, pair(impl)(), atol=1e-2, rtol=1e-3)
    fns = {
        "grouped": pair(subset_conv2d),
        "loop": pair(loop),
        "bmm": pair(im2col_bmm),
        "prefix": lambda: F.conv2d(F.conv2d(x, p1, None, 1, 1), p2, None, 1, 1),
        "full": lambda: F.conv2d(F.conv2d(x, w1, None, 1, 1), w2, None, 1, 1),
    }
    with torch.inference_mode():
        samples = interleaved(fns, 7 if n > 1 else 30, 2)
    row = " ".join(f"{name}={summarize(t).median:.2f}ms" for name, t in samples.items())
    return f"C=P={c} {hw}x{hw} batch {n}, k={k}: {row}"


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    for c, hw, n in [(64, 16, 32), (32, 14, 32), (64, 16, 1), (256, 14, 32)]:
        print(measure(c, hw, n), flush=True)


if __name__ == "__main__":
    main()
