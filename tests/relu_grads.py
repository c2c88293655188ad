"""float64 gradients of relu(x W^T + b) through the ReLU mask of the output under test.

A pre-activation within rounding of 0 may land on either side of the kink in fp32 while float64
puts it on the other; one such element moves a whole grad_input row by grad * W[j] (seen in CI:
0.42 against a 6e-5 tolerance, about once in 700 runs of a 1023x71 fp32 case). Both sides are
right, and the backward must follow the output it was given (as torch's does), so the reference
takes its mask from that output. The forward is checked against float64 separately, so the mask
can only differ where |pre-activation| is within the forward's tolerance of 0."""


def relu_grads_through_output(y, grad, x, w, b=None):
    """(grad_x, grad_w, grad_b) in float64, shaped like x, w, b (grad_b is None without b).
    The gradient passes where y > 0 or y is NaN, as torch's threshold_backward lets it."""
    n, k = w.shape
    x64, w64 = x.detach().double().reshape(-1, k), w.detach().double()
    passes = ~(y.detach().double() <= 0)
    gz = (grad.detach().double() * passes).reshape(-1, n)
    grad_b = gz.sum(0) if b is not None else None
    return (gz @ w64).reshape(x.shape), gz.t() @ x64, grad_b
