import torch

from litevar import sampling
from litevar.sampling import filter_top_k_top_p_


def _reference_filter(logits, top_k, top_p):
    """Upstream's procedure: mask below the k-th value, sort the whole vocabulary, cut the low tail."""
    out = logits.clone()
    kth = out.topk(top_k, dim=-1)[0].amin(dim=-1, keepdim=True)
    out.masked_fill_(out < kth, -torch.inf)
    sorted_logits, sorted_idx = out.sort(dim=-1)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[..., -1:] = False
    return out.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)


def test_sorted_top_k_path_equals_full_sort():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 512, generator=gen) * 3
    for top_k, top_p in [(100, 0.96), (7, 0.5), (300, 0.999)]:
        fast = filter_top_k_top_p_(logits.clone(), top_k, top_p)
        assert torch.equal(fast, _reference_filter(logits, top_k, top_p))


def test_ties_at_the_kth_value_fall_back_and_survive(monkeypatch):
    logits = torch.tensor([[[5.0, 4.0, 3.0, 3.0, 1.0, 0.0]]])
    calls = []
    original = sampling._filter_sorted_top_k_
    monkeypatch.setattr(sampling, "_filter_sorted_top_k_", lambda *a: calls.append(1) or original(*a))
    out = filter_top_k_top_p_(logits.clone(), 3, 0.999)
    assert calls and torch.isfinite(out).sum() == 4
    assert torch.equal(out, _reference_filter(logits, 3, 0.999))
