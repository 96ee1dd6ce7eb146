"""A convolution's bias and activation in one pass over its channels-last output [P, C] (P = N*H*W).

cuDNN convolutions take no bias: ATen adds it in a pass of its own, a broadcast add that does not vectorize
over a channels-last output, and the ReLU after it is another pass (benchmarks/RESULTS.md, seventh session:
4.5 ms of such adds in one training step at 256 px, batch 16)."""
import triton
import triton.language as tl

BLOCK_P = 64
BLOCK_C = 64  # a 64 x 64 tile: in_apply's, which reaches 84-94% of copy bandwidth in fp32 on an H200
NUM_WARPS = 4


@triton.jit
def bias_act(x_ptr, b_ptr, y_ptr, P, C, slope, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(x + b[c]): ACT 0 none, 1 ReLU, 2 leaky ReLU with `slope`. The sum is rounded once, to y's
    dtype, after the activation: for ReLU the reference's rounded sum then ReLU, to the bit."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m = (p < P)[:, None] & cm[None, :]
    off = p.to(tl.int64)[:, None] * C + c[None, :]
    y = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    y = add_bias_act(y, b_ptr, c, cm, slope, HAS_BIAS, ACT)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def add_bias_act(y, b_ptr, c, cm, slope, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """act(y + b[c]) for an fp32 [rows, channels] tile y of channels c (cm: c in range); also the thin-input
    convolution's epilogue (kernels/thin_conv.py)."""
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.where(y > 0, y, y * slope)
    return y
