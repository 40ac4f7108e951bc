import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF Llama), optionally fused with the residual add.

    ``norm(x)`` returns the normalised x; ``norm(x, residual)`` first adds the residual and
    returns ``(normalised sum, sum)`` so the caller can carry the new residual along.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
