"""Small building blocks shared by the encoder, prompt encoder and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor (``forward``)
    or of channels-last tokens (B, D, H, W, C) (``tokens``): one fused
    ``layer_norm`` either way."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x.movedim(1, -1)).movedim(-1, 1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D/p, H/p, W/p, C*p^3), each patch flattened in the
    (c, pd, ph, pw) order of a Conv3d weight."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d // p, h // p, w // p, c * p ** 3)


def up_conv_tokens(conv: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """A ConvTranspose3d with stride = kernel on channels-last tokens
    (B, D, H, W, Cin) -> (B, kD, kH, kW, Cout): one matrix product and a pixel
    shuffle (on the CPU several times faster than the transposed convolution)."""
    k = conv.kernel_size[0]
    b, d, h, w, _ = x.shape
    cout = conv.out_channels
    weight = conv.weight.reshape(conv.in_channels, cout * k ** 3)      # (Cin, Cout*k^3): (o, i, j, l)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(k ** 3)
    y = F.linear(x, weight.t(), bias).reshape(b, d, h, w, cout, k, k, k)
    return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, d * k, h * k, w * k, cout)


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (keys ``lin1``, ``lin2``)."""

    def __init__(self, dim: int, hidden_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (keys ``layers.i``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
