"""How privacy composes with the other server settings, checked when the settings are loaded.

The server's pipeline runs ``admission -> privacy (clip, sum, noise) -> server optimiser``: admission sees
every update as sent (its checks read raw updates, so they run before any noise and are not covered by it);
the server optimiser steps from the noised mean, which is post-processing and costs no privacy. What would
let a client's data reach the model without passing the clip and the noise is refused, one line naming the
fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcmi.config import Config


def check_composition(cfg: Config) -> None:
    """Raise ValueError naming the fields when ``cfg``'s privacy contradicts its server settings."""
    if cfg.server.clip_norm is not None:
        raise ValueError(f"server.clip_norm ({cfg.server.clip_norm}) and privacy.mechanism "
                         f"{cfg.privacy.mechanism!r} both clip: privacy clips each change to privacy.clip_norm "
                         "before its noise; set server.clip_norm null")
    if cfg.server.rule != "mean":
        raise ValueError(f"server.rule {cfg.server.rule!r} with privacy.mechanism {cfg.privacy.mechanism!r}: the "
                         "noise is calibrated to one client's share of a clipped sum, and a robust rule's output "
                         "moves by another amount; use server.rule 'mean' (admission still refuses malformed "
                         "updates)")
    if cfg.control_variates:
        raise ValueError(f"algorithm.name {cfg.algorithm.name!r} (control variates) with privacy.mechanism "
                         f"{cfg.privacy.mechanism!r}: each client's control variate reaches the server state "
                         "unclipped and unnoised, past the privacy stage; use another algorithm")
    if cfg.privacy.clipping == "adaptive":
        sigma = cfg.privacy.noise_multiplier
        if sigma is not None:  # a target epsilon is checked once its noise is chosen
            model_noise(sigma, count_noise(cfg, sigma))


def check_dp_sgd(cfg: Config, obstacle: str | None) -> None:
    """Raise ValueError naming the fields when DP-SGD cannot serve ``cfg``'s local training: the method's loss
    is not a sum of per-example terms (``obstacle`` says why), or mixed precision is asked for."""
    if obstacle is not None:
        raise ValueError(f"privacy.dp_sgd.enabled with algorithm.name {cfg.algorithm.name!r}: {obstacle}")
    if cfg.optim.precision != "32":
        raise ValueError(f"privacy.dp_sgd.enabled with optim.precision {cfg.optim.precision!r}: per-example "
                         "gradients are computed and clipped in float32; set optim.precision '32'")


def count_noise(cfg: Config, sigma: float) -> float:
    """Noise std (in clients) of adaptive clipping's clipped count: the setting, or the larger of the paper's
    ``clients_per_round / 20`` and the noise multiplier ``sigma`` (with few clients a round the paper's
    choice leaves nothing for the changes' noise; at ``sigma`` the changes' noise is 15% above ``sigma``)."""
    given = cfg.privacy.adaptive.count_noise
    return given if given is not None else max(cfg.federation.clients_per_round / 20, sigma)


def model_noise(sigma: float, count_sigma: float) -> float:
    """The noise multiplier of the changes that, with the count's noise, gives ``sigma`` in all (Andrew et
    al. 2021, Theorem 1: the count query has sensitivity 1/2)."""
    if sigma == 0:
        return 0.0
    rest = sigma ** -2 - (2 * count_sigma) ** -2
    if rest <= 0:
        raise ValueError(f"privacy.adaptive.count_noise ({count_sigma:g}) is too small for a noise multiplier of "
                         f"{sigma:g}: it must exceed {sigma / 2:g} (half the noise multiplier)")
    return rest ** -0.5
