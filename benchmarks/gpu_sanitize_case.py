"""One small fused DMFB forward+backward (bf16 and fp32, odd sizes) and one centroid call on CUDA: the
workload gpu_check.sh runs under compute-sanitizer memcheck. Exits non-zero if a result is not finite."""
import torch

from dmfn_fast.models import DMFB
from dmfn_fast.ops import centroid_align as ca

torch.manual_seed(0)
for dt in (torch.bfloat16, torch.float32):
    m = DMFB(64, 16, impl="fast").cuda().to(dt).to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 13, 11, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = m(x)
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
a = torch.rand(2, 8, 5, 7, device="cuda", requires_grad=True)
loss = ca.centroid_align_loss(a, torch.rand_like(a), impl="fast")
loss.backward()
assert torch.isfinite(a.grad).all()
torch.cuda.synchronize()
print("sanitize case ok")
