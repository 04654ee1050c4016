"""The output head's small-batch CPU path: the same logits as ``F.linear``, on every input shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unmask.models.config import ModelConfig
from unmask.models.transformer import StreamingLinear, Transformer
from unmask.models.weights import HalfLinear, half_linears


@pytest.mark.parametrize("bias", [False, True])
def test_streaming_linear_is_f_linear(bias):
    torch.manual_seed(0)
    layer = StreamingLinear(48, 300, bias=bias)
    for shape in [(1, 48), (2, 48), (1, 4, 48), (2, 4, 48), (1, 5, 48), (3, 3, 48), (1, 9, 48), (1, 0, 48)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ours, plain = layer(x), F.linear(x, layer.weight, layer.bias)
        assert ours.shape == plain.shape and ours.is_contiguous()
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
        rows = x.numel() // 48
        if not 2 <= rows <= 8:  # one row, many rows, none: F.linear itself
            assert torch.equal(ours, plain)


def test_streaming_linear_trains():
    torch.manual_seed(0)
    layer = StreamingLinear(16, 8)
    x = torch.randn(1, 3, 16, requires_grad=True)
    layer(x).square().sum().backward()
    ref = nn.Linear(16, 8)
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(x.grad, xr.grad)


def test_the_head_streams_stays_tied_and_halves():
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                    tie_embeddings=True))
    assert isinstance(model.head, StreamingLinear) and model.head.weight is model.embed.weight
    assert set(model.state_dict()) >= {"head.weight", "embed.weight"}
    assert isinstance(half_linears(model).head, HalfLinear)
