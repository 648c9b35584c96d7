"""EDM training loss and deterministic Heun sampler (Karras et al. 2022, "Elucidating the Design Space...").

`model` is any callable `model(x, sigma, labels) -> D(x; sigma)` (a DiffiT, or a DeepSpeed/Accelerate wrapper
around one), so nothing here reads attributes of it; the loss passes a fourth argument, the augmentation labels,
only when it is given some (``model/augment.py``). All randomness comes from arguments: the loss draws from
the caller's `torch.Generator` (checkpointable), the sampler takes its initial noise from the caller.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


#################################################################################
#                                 Training loss                                 #
#################################################################################


def edm_loss(
    model: Callable[..., Tensor],
    images: Tensor,
    labels: Tensor | None,
    *,
    num_classes: int,
    label_dropout: float,
    generator: torch.Generator | Sequence[torch.Generator],
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    share: tuple[int, int] = (0, 1),
    augment_labels: Tensor | None = None,
) -> Tensor:
    """EDM loss: E_σ,n [λ(σ)·mean_pixels (D(y + n; σ) − y)²] with ln σ ~ N(p_mean, p_std²), averaged over the batch.

    ``share=(rank, world_size)``: ``images`` is this rank's contiguous share of a global batch of
    ``len(images) × world_size``. The random draws are made for the whole global batch and cut the same way,
    so with a generator seeded alike on every rank the training noise does not depend on the process count.
    ``generator`` may instead be one generator per image (``share`` left alone): each image then has draws of
    its own, whatever batch it is in and on whichever process (validation on any number of processes).
    ``augment_labels`` (N, augment_dim): how ``images`` were augmented (``model.augment.augment``), passed to
    the model as ``model(x, sigma, labels, augment_labels)``; None calls ``model(x, sigma, labels)``.
    """
    y = images.float()  # (N, C, H, W)
    n = y.shape[0]
    device = y.device
    if isinstance(generator, torch.Generator):
        rank, world_size = share
        mine = slice(rank * n, (rank + 1) * n)
        sigma, noise, drop = (d[mine] for d in _draws(n * world_size, y.shape[1:], generator, device))
    else:
        if len(generator) != n or share != (0, 1):
            raise ValueError(
                f"one generator per image: {n} images, {len(generator)} generators, share {share}"
            )
        per_image = [_draws(1, y.shape[1:], g, device) for g in generator]
        sigma, noise, drop = (torch.cat(d) for d in zip(*per_image, strict=True))
    sigma = (sigma * p_std + p_mean).exp()  # (N,)
    noise = noise * sigma.view(-1, *[1] * (y.ndim - 1))
    if num_classes == 0:
        labels = None
    elif labels is not None:
        # Classifier-free guidance training: replace labels by the null label num_classes.
        labels = torch.where(drop < label_dropout, torch.full_like(labels, num_classes), labels)
    # λ(σ) = 1/c_out² makes the effective target of F unit-variance at every σ.
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # (N,)
    extra = () if augment_labels is None else (augment_labels,)
    denoised = model(y + noise, sigma, labels, *extra).float()  # (N, C, H, W)
    per_image_loss = ((denoised - y) ** 2).flatten(1).mean(dim=1)  # (N,)
    return (weight * per_image_loss).mean()


def _draws(
    total: int, shape: torch.Size, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, ...]:
    """``total`` images' draws in a fixed order (ln σ standardised, unit noise, label-dropout uniforms), so
    that one generator state gives one loss."""
    sigma = torch.randn(total, generator=generator, device=device)
    noise = torch.randn((total, *shape), generator=generator, device=device)
    drop = torch.rand(total, generator=generator, device=device)
    return sigma, noise, drop


#################################################################################
#                                    Sampler                                    #
#################################################################################


@dataclass(frozen=True)
class EDMSchedule:
    """Sampler settings; the defaults are EDM's CIFAR-10 values (18 steps = 35 network evaluations)."""

    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ValueError(
                f"num_steps must be >= 2 (the schedule divides by num_steps - 1), got {self.num_steps}"
            )
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")

    def sigmas(self, device: torch.device | str | None = None) -> Tensor:
        """t_0 > ... > t_{N-1} = sigma_min, then t_N = 0: shape (num_steps + 1,), float32."""
        i = torch.arange(self.num_steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        t = (hi + i / (self.num_steps - 1) * (lo - hi)) ** self.rho
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(device=device, dtype=torch.float32)


class SamplingStopped(Exception):
    """``edm_sample``'s ``should_stop`` asked it to stop."""


@torch.no_grad()
def edm_sample(
    model: Denoiser,
    noise: Tensor,
    class_labels: Tensor | None,
    *,
    num_classes: int,
    schedule: EDMSchedule = EDMSchedule(),  # frozen, so safe to share as a default
    guidance: float = 1.0,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Deterministic Heun sampler (EDM Algorithm 1, S_churn = 0); images clamped to [-1, 1].

    `noise` is standard normal (N, C, H, W); put the model in eval() first (dropout). With a class-conditional
    model and guidance != 1, D = D_uncond + guidance·(D_cond − D_uncond) in one batched forward.
    ``should_stop`` is asked before each step; True raises ``SamplingStopped``.
    """
    n = noise.shape[0]
    if num_classes == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.full((n,), num_classes, dtype=torch.long, device=noise.device)
    guided = class_labels is not None and guidance != 1.0

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        sigma = t.expand(n)  # (N,)
        if not guided:
            return model(x, sigma, class_labels).float()
        assert class_labels is not None
        null = torch.full_like(class_labels, num_classes)
        both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null])).float()
        d_cond, d_uncond = both.chunk(2)  # (N, C, H, W) each
        return d_uncond + guidance * (d_cond - d_uncond)

    t_steps = schedule.sigmas(noise.device)  # (num_steps + 1,)
    x = noise.float() * t_steps[0]  # (N, C, H, W)
    for i in range(schedule.num_steps):
        if should_stop is not None and should_stop():
            raise SamplingStopped(f"stopped before step {i + 1} of {schedule.num_steps}")
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        d_cur = (x - denoise(x, t_cur)) / t_cur  # dx/dt of the probability-flow ODE
        x_next = x + (t_next - t_cur) * d_cur  # Euler step
        if i < schedule.num_steps - 1:  # 2nd-order correction, skipped at t_N = 0
            d_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.clamp(-1.0, 1.0)
