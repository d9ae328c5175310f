"""The double-headed dynamic gate (DS-Net, SPEC section 2).

A shared encoder ``z = ReLU(FC_r(GAP(h)))`` feeds two heads:

* the **attention head** (squeeze-excitation), ``h <- h * sigmoid(FC_e(z))``,
  part of the backbone and trained with the supernet;
* the **slimming head**, ``FC_g(z)``: logits over the routing space, trained in
  stage II. Training uses straight-through Gumbel-softmax (hard one-hot
  forward, soft gradient backward); inference uses a plain argmax, no noise.

Two routing rules read the head (``ROUTERS``, the models' ``router`` option):

* ``"logits"`` (the paper's): the head's outputs are logits over the choices,
  SGS-trained; a scalar knob ``b`` moves them along :func:`bias_ramp`.
* ``"utility"`` [ours]: output ``u_j`` is the logit of P(choice ``j``
  classifies this image correctly), trained with binary cross-entropy; the
  gate scores are ``sigmoid(u_j)`` and the knob ``b = lam`` moves them along
  :func:`cost_direction`, so the choice is ``argmax_j sigmoid(u_j) - lam * c_j``
  with ``c_j`` the choice's MACs relative to the widest.

Either way the operating point is ``argmax(scores + b * direction)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.layers.sliced import SliceableModule, SlicedLinear

__all__ = [
    "SqueezeExcite",
    "StaticSqueezeExcite",
    "DynamicGate",
    "ExitHead",
    "GATE_MODES",
    "ROUTERS",
    "bias_ramp",
    "cost_direction",
    "routing_scores",
    "straight_through_gumbel",
    "make_divisible",
]

GATE_MODES = ("pre", "exit")
ROUTERS = ("logits", "utility")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% below it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class StaticSqueezeExcite(nn.Module):
    """``x * gain * sigmoid(expand(relu(reduce(GAP(x)))))`` (gain 1: plain squeeze-excitation).

    What a :class:`SqueezeExcite` (and the gate's attention head) becomes in an extracted sub-network: plain
    ``nn.Linear`` layers, no slicing (also importable from :mod:`dsnet.models.static`, with the other static
    building blocks).
    """

    def __init__(self, reduce: nn.Linear, expand: nn.Linear, gain: float = 1.0) -> None:
        super().__init__()
        self.reduce = reduce
        self.expand = expand
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.reduce(x.mean((2, 3))))
        attn = torch.sigmoid(self.expand(z))
        if self.gain != 1.0:
            attn = attn * self.gain
        return x * attn[:, :, None, None]


class SqueezeExcite(SliceableModule):
    """Channel attention over a prefix of ``channels``.

    As in the official DS-Net code, the reduced width is fixed (a fraction of
    the *widest* channel count) and only the outer dimensions slice.
    """

    def __init__(self, channels: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        self.channels = channels
        self.reduced = max(1, int(round(channels * se_ratio)))
        self.reduce = SlicedLinear(channels, self.reduced)  # FC_r
        self.expand = SlicedLinear(self.reduced, channels)  # FC_e

    def encode(self, h: Tensor) -> Tensor:
        """The shared encoder: ``ReLU(FC_r(GAP(h)))``."""
        return F.relu(self.reduce(h.mean((2, 3))))

    def attention(self, z: Tensor, channels: int) -> Tensor:
        """Per-channel attention weights ``sigmoid(FC_e(z))`` for the first ``channels`` channels, ``(N, channels)``."""
        return torch.sigmoid(self.expand(z, channels))

    def attend(self, h: Tensor, z: Tensor) -> Tensor:
        return h * self.attention(z, h.shape[1])[:, :, None, None]

    def forward(self, h: Tensor) -> Tensor:
        return self.attend(h, self.encode(h))

    def to_static(self, channels: int) -> nn.Module:
        return StaticSqueezeExcite(
            self.reduce.to_static(channels), self.expand.to_static(self.reduced, channels), self._static_gain()
        )

    def _static_gain(self) -> float:
        return 1.0


def bias_ramp(num_choices: int) -> Tensor:
    """``linspace(+1, -1, R)``: the direction a scalar budget bias moves the gate in.

    Positive on slim choices and negative on wide ones, so ``b > 0`` saves
    compute; antisymmetric, so ``b = 0`` leaves the gate as trained.
    """
    if num_choices < 1:
        raise ValueError(f"need at least one routing choice, got {num_choices}")
    if num_choices == 1:
        return torch.zeros(1)
    return torch.linspace(1.0, -1.0, num_choices)


def cost_direction(choice_macs: Tensor) -> Tensor:
    """``-(c - mean(c))`` with ``c = choice_macs / max(choice_macs)``: the knob direction of the utility router.

    Adding ``lam * cost_direction`` to the scores and taking the argmax is
    ``argmax_j (score_j - lam * c_j)`` (the mean is the same for every choice),
    so ``lam`` is the expected accuracy traded per unit of relative compute:
    ``lam > 0`` saves compute, ``lam = 0`` is the most likely correct choice.
    """
    macs = torch.as_tensor(choice_macs, dtype=torch.float32).flatten()
    if macs.numel() < 1:
        raise ValueError("need at least one routing choice")
    if not bool((macs > 0).all()):
        raise ValueError(f"routing choices need positive MACs, got {macs.tolist()}")
    c = macs / macs.max()
    return -(c - c.mean())


def routing_scores(raw: Tensor, router: str) -> Tensor:
    """The gate scores a knob bias is added to: the head's logits (``"logits"``) or ``sigmoid`` (``"utility"``)."""
    if router == "logits":
        return raw
    if router == "utility":
        return torch.sigmoid(raw)
    raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")


class DynamicGate(SqueezeExcite):
    """Squeeze-excitation plus a slimming head over ``num_choices`` widths.

    ``budget_bias`` (a buffer, saved with the model) is added to the slimming
    head's logits at every call: stage II sets it so the trained gate meets a
    target mean-MACs budget (see ``dsnet.train.gate.calibrate_budget``); it is
    zero otherwise.

    ``attention_gain`` (a scalar buffer, saved with the model) multiplies the
    attention head: ``h * gain * sigmoid(FC_e(z))``. It is 1 (the plain
    squeeze-excitation of DS-Net) unless :meth:`init_identity_attention` set
    it; see there.
    """

    def __init__(self, channels: int, num_choices: int, se_ratio: float = 0.25) -> None:
        super().__init__(channels, se_ratio)
        self.num_choices = num_choices
        # bias-free, as the official gate head; budget and run-time biases are added to the logits instead
        # a sliceable layer at its full size: at inference its weight cast to the autocast dtype is cached
        self.slim_head = SlicedLinear(self.reduced, num_choices, bias=False)  # FC_g
        self.register_buffer("budget_bias", torch.zeros(num_choices))
        self.register_buffer("attention_gain", torch.ones(()))

    def attention(self, z: Tensor, channels: int) -> Tensor:
        return torch.sigmoid(self.expand(z, channels)) * self.attention_gain

    @torch.no_grad()
    def init_identity_attention(self) -> None:
        """Make the attention head the identity, exactly: ``FC_e = 0`` and gain 2.

        Used when the gate is inserted into a network that had no attention
        there (an imported torchvision/timm network, ``make_dynamic``), so the
        widest sub-network computes exactly the source network's function:
        ``2 * sigmoid(0) = 2 * 0.5 = 1.0`` holds bit for bit in floating point,
        and ``h * 1.0 == h``. A large positive bias instead (``sigmoid(b)``
        rounding to 1.0) would also be exact, but it saturates the sigmoid and
        leaves the head without gradient, so it could never learn; here the
        head trains from the first step (``sigmoid'(0) = 1/4``). The gain of 2
        is NF-Net's squeeze-excitation gain (timm ``attn_gain=2.0``): attention
        may then scale channels up as well as down, by at most 2x.
        """
        nn.init.zeros_(self.expand.weight)
        if self.expand.bias is not None:
            nn.init.zeros_(self.expand.bias)
        self.attention_gain.fill_(2.0)

    def raw_logits(self, z: Tensor) -> Tensor:
        """The slimming head alone (what stage II trains)."""
        return self.slim_head(z)

    def logits(self, z: Tensor) -> Tensor:
        """Routing logits: the slimming head plus the stored budget bias."""
        return self.slim_head(z) + self.budget_bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # checkpoints written before the budget bias existed load with a zero bias
        state_dict.setdefault(prefix + "budget_bias", torch.zeros_like(self.budget_bias))
        # ... and before the attention gain existed, with the plain squeeze-excitation (gain 1)
        state_dict.setdefault(prefix + "attention_gain", torch.ones_like(self.attention_gain))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _static_gain(self) -> float:
        return float(self.attention_gain)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduced={self.reduced}, num_choices={self.num_choices}"


class ExitHead(nn.Module):
    """Routing logits of an early-exit gate (``gate_mode="exit"``) [ours].

    The paper's slimming head decides from the pre-gate features alone, before
    any routed layer runs. This head decides *after* the slimmest sub-network
    has run: its input is the gate's shared encoding ``z`` and what the
    slimmest predicted -- its sorted top-``k`` class probabilities and the
    entropy of its prediction (how confident it is, the signal a confidence
    cascade thresholds). Choice 0 exits with the slimmest's answer at no extra
    cost; choice ``j > 0`` runs routed sub-network ``j`` after the gate (the
    pre-gate part is shared, the slimmest's post-gate part has been paid).

    A BatchNorm puts the encoding (arbitrary scale) and the probabilities (in
    [0, 1]) on one scale; a hidden layer lets it combine "how confident" with
    "what kind of image". A few thousand multiply-adds.
    """

    def __init__(self, encoding_dim: int, num_classes: int, num_choices: int, hidden: int = 32, top_k: int = 3) -> None:
        super().__init__()
        self.top_k = min(top_k, num_classes)
        features = encoding_dim + self.top_k + 1
        self.norm = nn.BatchNorm1d(features)
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, num_choices)

    def features(self, z: Tensor, slim_logits: Tensor) -> Tensor:
        log_p = F.log_softmax(slim_logits.float(), dim=1)
        p = log_p.exp()
        top = p.topk(self.top_k, dim=1).values
        entropy = -(p * log_p).sum(1, keepdim=True)
        return torch.cat([z.float(), top, entropy], dim=1).to(z.dtype)

    def forward(self, z: Tensor, slim_logits: Tensor) -> Tensor:
        f = self.features(z, slim_logits)
        if self.training and f.shape[0] == 1:  # one sample has no batch statistics: normalise with the running ones
            n = self.norm
            f = F.batch_norm(f, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        else:
            f = self.norm(f)
        return self.out(F.relu(self.hidden(f)))

    def macs(self) -> int:
        return self.hidden.in_features * self.hidden.out_features + self.out.in_features * self.out.out_features


def straight_through_gumbel(logits: Tensor, tau: float = 1.0) -> Tensor:
    """Hard one-hot sample in the forward pass, Gumbel-softmax gradient in the backward pass."""
    return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)
