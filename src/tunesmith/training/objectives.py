"""Preference objectives on the answers' log-probabilities: DPO, IPO, ORPO, SimPO.

Every loss here is per pair; the loop sums them over a micro-batch and divides by the pairs of the optimizer step
(so a step's loss is the mean over its pairs, whatever the micro-batching). Inputs are, per pair, the summed
log-probability of each answer's trained tokens under the policy (`pc`, `pr`), the same under the reference (`rc`,
`rr`; DPO and IPO only) and the answers' trained token counts (`nc`, `nr`).

- DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigmoid(beta * ((pc - rc) - (pr - rr))). beta 0.1
  as in the paper's experiments and TRL's DPOConfig.
- IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): ((pc - rc) - (pr - rr) - 1 / (2 beta))^2 on log-ratios
  averaged over the answer tokens, as TRL computes it (`loss_type="ipo"` divides the log-probs by the
  completion lengths); TRL's default beta 0.1.
- RPO term (`dpo.sft_weight`; Pang et al. 2024, arXiv:2404.19733; TRL's rpo_alpha): plus weight times the chosen
  answer's mean token negative log-likelihood.
- ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7): the chosen answer's mean token NLL
  - lambda * log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = P / (1 - P) with P = exp(mean token
  log-prob). lambda 0.1 as in the paper and TRL's ORPOConfig.beta. No reference.
- SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): -log sigmoid(beta * (mean log p(chosen) - mean log
  p(rejected)) - gamma). beta 2.0, gamma 1.0: the SimPO repository's defaults (gamma/beta 0.5). No reference.

The rewards logged (and used for preference accuracy) are each objective's own implicit reward: beta times the
log-ratio to the reference for DPO (summed log-probs) and IPO (averaged), beta times the mean log-prob for SimPO,
and the mean log-prob (lambda-free) for ORPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEEDS_REFERENCE = {"dpo": True, "orpo": False, "simpo": False}


@dataclass
class PairLosses:
    loss: torch.Tensor  # (n,) per-pair loss, differentiable
    chosen_reward: torch.Tensor  # (n,) detached
    rejected_reward: torch.Tensor  # (n,) detached


def pair_losses(cfg, pc, pr, nc, nr, rc=None, rr=None) -> PairLosses:
    """Per-pair losses and rewards of cfg.train.objective (dpo, orpo, simpo) with its section's options."""
    objective = cfg.train.objective
    nc, nr = nc.clamp(min=1).to(pc.dtype), nr.clamp(min=1).to(pr.dtype)
    if objective == "dpo":
        beta = cfg.dpo.beta
        if cfg.dpo.loss == "ipo":
            chosen, rejected = (pc - rc) / nc, (pr - rr) / nr
            loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
        else:
            chosen, rejected = pc - rc, pr - rr
            loss = -F.logsigmoid(beta * (chosen - rejected))
        if cfg.dpo.sft_weight:
            loss = loss + cfg.dpo.sft_weight * (-pc / nc)
        return PairLosses(loss, (beta * chosen).detach(), (beta * rejected).detach())
    if objective == "orpo":
        mc, mr = pc / nc, pr / nr
        # log odds = log p - log(1 - p), with log(1 - p) = log(-expm1(log p)); clamped below 0 so p < 1
        log_odds = (mc - mr) - (_log1m_exp(mc) - _log1m_exp(mr))
        loss = -mc - cfg.orpo.lambda_ * F.logsigmoid(log_odds)
        return PairLosses(loss, mc.detach(), mr.detach())
    if objective == "simpo":
        mc, mr = pc / nc, pr / nr
        loss = -F.logsigmoid(cfg.simpo.beta * (mc - mr) - cfg.simpo.gamma)
        return PairLosses(loss, (cfg.simpo.beta * mc).detach(), (cfg.simpo.beta * mr).detach())
    raise ValueError(f"not a preference objective: {objective!r}")


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 (TRL computes torch.log1p(-torch.exp(x)), which is the same
    where both are finite)."""
    x = x.clamp(max=-1e-6)
    return torch.log(-torch.expm1(x))
