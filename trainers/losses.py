"""BPR objective and LightGCN's L2 term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bpr_loss(users_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor) -> Tensor:
    """mean(-log sigmoid(pos - neg)), written as softplus for numerical stability."""
    pos = (users_emb * pos_emb).sum(dim=-1)
    neg = (users_emb * neg_emb).sum(dim=-1)
    return F.softplus(neg - pos).mean()


def l2_reg(user_ego: Tensor, pos_ego: Tensor, neg_ego: Tensor, batch_size: int) -> Tensor:
    """0.5 * (||u||^2 + ||p||^2 + ||n||^2) / batch_size on the batch's layer-0 embeddings.

    Matches LightGCN-PyTorch (callers multiply by the weight decay, e.g. 1e-4).
    """
    return 0.5 * (user_ego.pow(2).sum() + pos_ego.pow(2).sum() + neg_ego.pow(2).sum()) / float(batch_size)


def softmax_loss(users_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor, temperature: float) -> Tensor:
    """Sampled softmax over cosine scores: each user's positive against the batch's positives and negatives.

    Still a ranking loss, but every step ranks the positive against ~2B items instead of one, which is what lets
    the model pass iALS within a CPU budget (BPR needs hundreds of epochs on Gowalla).
    """
    u = F.normalize(users_emb, dim=-1)
    candidates = F.normalize(torch.cat([pos_emb, neg_emb]), dim=-1)
    logits = u @ candidates.T / temperature
    # An item that is a positive of several users in the batch is not their negative: mask those duplicates.
    labels = torch.arange(len(u), device=u.device)
    return F.cross_entropy(logits, labels)
