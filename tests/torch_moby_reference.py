"""Independent PyTorch reference for the MoBY training step.

Written from SPEC §2 (algorithm) and §5 (state_dict names) for the parity tests of the JAX
port and for the speed benchmark; it is not copied from the released code. The backbones
come from :mod:`torch_reference`. ``MoBY.state_dict()`` yields exactly the official keys:
``encoder.*``, ``encoder_k.*``, ``projector.*``, ``projector_k.*``, ``predictor.*``,
``queue1``, ``queue2`` (proj_dim, queue_size) and ``queue_ptr`` (1,) int64. The momentum
step counter ``MoBY.k`` is a plain Python int and is not part of the state_dict.

One step (SPEC §2): online queries for both views; momentum update of the target encoder
and projector parameters (not buffers) from the online weights *before* the optimizer
step; keys from the target in training mode (batch-stat BN) without gradient; symmetric
InfoNCE against the queues as they were before this step; enqueue of both key sets; then
(in :func:`train_step`) backward, grad-norm clipping and AdamW. Everything is float32.
Heads use BatchNorm1d(eps 1e-5, momentum 0.1) with per-view statistics (each view goes
through the heads separately, so each BN updates its running stats twice per step).
Head Linear layers are initialised truncated normal std 0.02 / bias 0 (our choice; tests
load weights from fixtures anyway).
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_reference


class MLPHead(nn.Module):
    """num_layers Linear layers, each but the last followed by BatchNorm1d + ReLU.

    state_dict names: ``linear_hidden.0`` is an nn.Identity, then (Linear, BatchNorm1d,
    ReLU) at indices 1, 2, 3, then 4, 5, 6, ...; the last Linear is ``linear_out``.
    """

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers=2):
        super().__init__()
        layers = [nn.Identity()]
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1),
                       nn.ReLU(inplace=True)]
            dim = hidden_dim
        self.linear_hidden = nn.Sequential(*layers)
        self.linear_out = nn.Linear(dim, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.linear_out(self.linear_hidden(x))


def _features(encoder, x):
    """Pooled backbone feature of an NCHW batch."""
    f = getattr(encoder, "forward_features", None)
    return f(x) if f is not None else encoder(x)


def contrastive_loss(q, k, queue, temperature):
    """Cross-entropy with label 0 over [q.k, q @ queue] / T, averaged over the batch."""
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


class MoBY(nn.Module):
    def __init__(self, encoder, encoder_k, feat_dim, proj_hidden_dim=4096, proj_dim=256,
                 pred_hidden_dim=4096, proj_layers=2, pred_layers=2, queue_size=4096,
                 temperature=0.2, momentum=0.99, total_steps=1):
        super().__init__()
        self.encoder, self.encoder_k = encoder, encoder_k
        self.projector = MLPHead(feat_dim, proj_hidden_dim, proj_dim, proj_layers)
        self.projector_k = MLPHead(feat_dim, proj_hidden_dim, proj_dim, proj_layers)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, pred_layers)
        self.queue_size, self.temperature = queue_size, temperature
        self.m0, self.total_steps = momentum, total_steps
        self.k = 0  # steps done so far (drives the momentum schedule); not in the state_dict
        self.last_momentum = None  # the m used by the latest forward
        # Target = copy of the online weights and BN buffers; never trained by the optimizer.
        for online, target in ((self.encoder, self.encoder_k), (self.projector, self.projector_k)):
            target.load_state_dict(copy.deepcopy(online.state_dict()))
            for p in target.parameters():
                p.requires_grad = False
        self.register_buffer("queue1", F.normalize(torch.randn(proj_dim, queue_size), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(proj_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def momentum_value(self) -> float:
        """m_k = 1 - (1 - m0) * (cos(pi * k / K) + 1) / 2: m0 at k = 0, 1.0 at k = K."""
        return 1.0 - (1.0 - self.m0) * (math.cos(math.pi * self.k / self.total_steps) + 1.0) / 2.0

    @torch.no_grad()
    def _momentum_update(self):
        """target = m * target + (1 - m) * online for encoder and projector parameters."""
        m = self.momentum_value()
        for online, target in ((self.encoder, self.encoder_k), (self.projector, self.projector_k)):
            for p, p_k in zip(online.parameters(), target.parameters()):
                p_k.data.mul_(m).add_(p.data, alpha=1.0 - m)
        self.k += 1
        return m

    @torch.no_grad()
    def _enqueue(self, k1, k2):
        B = k1.shape[0]
        assert self.queue_size % B == 0, "queue_size must be a multiple of the batch size"
        ptr = int(self.queue_ptr[0])
        self.queue1[:, ptr:ptr + B] = k1.T
        self.queue2[:, ptr:ptr + B] = k2.T
        self.queue_ptr[0] = (ptr + B) % self.queue_size

    def forward(self, view1, view2):
        """The MoBY loss of one step (also updates target weights, counter and queues)."""
        q1 = F.normalize(self.predictor(self.projector(_features(self.encoder, view1))), dim=1)
        q2 = F.normalize(self.predictor(self.projector(_features(self.encoder, view2))), dim=1)
        self.last_momentum = self._momentum_update()
        with torch.no_grad():
            k1 = F.normalize(self.projector_k(_features(self.encoder_k, view1)), dim=1)
            k2 = F.normalize(self.projector_k(_features(self.encoder_k, view2)), dim=1)
        loss = (contrastive_loss(q1, k2, self.queue2.clone().detach(), self.temperature)
                + contrastive_loss(q2, k1, self.queue1.clone().detach(), self.temperature))
        self._enqueue(k1, k2)
        return loss


def param_groups(model, weight_decay):
    """MoBY decay mask: no decay for params with ndim <= 1 or names ending in '.bias'.

    Everything else decays (the relative position bias table included). Only trainable
    parameters (online encoder, projector, predictor) are listed.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def train_step(model, optimizer, view1, view2, clip_grad=5.0, lr=None) -> dict:
    """One MoBY step; returns loss, grad norm (before clipping) and the momentum used."""
    model.train()
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = lr
    optimizer.zero_grad()
    loss = model(view1, view2)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
            "momentum": float(model.last_momentum)}


def like(config, total_steps):
    """The reference MoBY with the architecture of a moby_jax config (hyperparameters only:
    backbone, drop path rates, head widths, queue, temperature, momentum)."""
    from moby_jax.models import build_encoder

    backbone = build_encoder(config.model)
    m = config.moby
    return MoBY(torch_reference.like(backbone),
                torch_reference.like(backbone, m.target_drop_path_rate),
                backbone.num_features, proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                pred_hidden_dim=m.pred_hidden_dim, proj_layers=m.proj_layers,
                pred_layers=m.pred_layers, queue_size=m.queue_size,
                temperature=m.temperature, momentum=m.momentum, total_steps=total_steps)
