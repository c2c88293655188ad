"""Both ops (and cuBLASLt's fused_linear GELU on CUDA), forward and backward, at small odd sizes: what bench/device_check.sh runs under
compute-sanitizer memcheck (and, in its dry run, on the CPU without it).

python -m bench.memcheck_snippet [cuda|cpu]
"""
import sys

import torch

import bigmodel


def main(device):
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32,)
    ran = []
    for dtype in dtypes:
        opts = dict(device=device, dtype=dtype, requires_grad=True)
        x, w, b = torch.randn(67, 45, **opts), torch.randn(33, 45, **opts), torch.randn(33, **opts)
        for name in ("auto", "cublaslt") if device == "cuda" else ("auto",):
            with bigmodel.use_backend(name):
                bigmodel.linear_relu(x, w, b).sum().backward()
            ran.append(f"linear_relu {name} {dtype}")
        if device == "cuda":  # cuBLASLt's GELU_AUX_BIAS path, and its fallback (N = 33 is odd)
            for n in (33, 40):
                wn, bn = torch.randn(n, 45, **opts), torch.randn(n, **opts)
                with bigmodel.use_backend("cublaslt"):
                    bigmodel.fused_linear(x, wn, bn, "gelu", approximate="tanh").sum().backward()
                ran.append(f"fused_linear gelu-tanh cublaslt N={n} {dtype}")
        for causal in (False, True):
            q, k, v = (torch.randn(2, 3, n, 72, **opts) for n in (37, 53, 53))
            bigmodel.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            ran.append(f"attention {dtype} causal={int(causal)}")
    if device == "cuda":
        torch.cuda.synchronize()
    print("memcheck snippet ran: " + "; ".join(ran))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
