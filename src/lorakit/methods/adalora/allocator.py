"""AdaLoRA's rank allocation (Zhang et al. 2023, https://arxiv.org/abs/2303.10512, Sec. 3.2-3.3, Algorithm 1).

Importance of every entry w of P, E, Q from its sensitivity I = |w * grad w|, smoothed by two EMAs:

    Ibar = beta1 * Ibar + (1 - beta1) * I                 (sensitivity)
    U    = beta2 * U    + (1 - beta2) * |I - Ibar|        (uncertainty)
    s(w) = Ibar * U

Importance of triplet i of a layer: s(E_i) + mean_j s(Q_ij) + mean_k s(P_ki). The total budget b(t) (kept
triplets over all layers) falls from b0 = sum of initial ranks to bT = target_r * layers on a cubic curve:

    b(t) = b0                                                  t <= tinit
    b(t) = bT + (b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3   (floored; T = total_step)
    b(t) = bT                                                  t > T - tfinal

Every deltaT steps the triplets whose importance is among the b0 - b(t) smallest get E_i = 0. At t = T - tfinal
the final rank pattern is fixed and the EMAs are dropped; after it every step re-applies the pattern. This follows
PEFT's RankAllocator step for step (same arithmetic, same order), so both prune the same triplets.
"""

from __future__ import annotations

import torch

from lorakit.methods.adalora.config import AdaLoraConfig
from lorakit.methods.adalora.layer import AdaLoraLayer

FACTORS = ("lora_A", "lora_E", "lora_B")  # Q, E, P


def budget_schedule(step: int, config: AdaLoraConfig, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(total budget at `step`, whether to mask at this step)."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (remaining ** 3) + target_budget), step % config.deltaT == 0


class RankAllocator:
    """Importance EMAs and the rank pattern of one adapter over its layers ({module path: layer})."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, AdaLoraLayer], adapter_name: str) -> None:
        self.config = config
        self.layers = layers
        self.adapter_name = adapter_name
        self.init_budget = sum(layer.r[adapter_name] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # "<module path>.<factor>" -> EMA, shaped like the factor
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None  # module path -> kept triplets
        self.budget: int | None = None  # the budget of the last allocation

    def _factors(self):
        for path, layer in self.layers.items():
            for factor in FACTORS:
                yield f"{path}.{factor}", getattr(layer, factor)[self.adapter_name]

    # ---- one step ------------------------------------------------------------------------------------
    def update_and_allocate(self, step: int) -> dict[str, list[bool]] | None:
        """Update the importance from the current gradients and prune as the schedule says. Returns the rank
        pattern when this step allocated one (the final one at step total_step - tfinal), else None."""
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self.update_importance()
            budget, mask_now = budget_schedule(step, self.config, self.init_budget, self.target_budget)
            return self.mask_to_budget(budget) if mask_now else None
        if step == final:
            pattern = self.mask_to_budget(budget_schedule(step, self.config, self.init_budget, self.target_budget)[0])
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
            return pattern
        if self.rank_pattern is None:
            raise ValueError(f"AdaLoRA: update_and_allocate({step}) is past the final allocation at step {final} "
                             f"(total_step - tfinal) but no rank pattern was allocated; call it every step from the "
                             "first one")
        self.apply(self.rank_pattern)
        return None

    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, param in self._factors():
            if param.grad is None:
                raise ValueError(f"AdaLoRA: {key} has no gradient; update_and_allocate needs this step's gradients "
                                 "(call it after loss.backward() and optimizer.step(), before optimizer.zero_grad())")
            ipt = (param * param.grad).abs()
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(param)
                self.exp_avg_unc[key] = torch.zeros_like(param)
            self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
            self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - self.exp_avg_ipt[key]).abs()

    def triplet_importance(self) -> dict[str, torch.Tensor]:
        """module path -> importance of each of its triplets, shape (r,)."""
        out = {}
        for path in self.layers:
            score = {f: self.exp_avg_ipt[f"{path}.{f}"] * self.exp_avg_unc[f"{path}.{f}"] for f in FACTORS}
            q_and_p = torch.cat([score["lora_A"].mean(dim=1, keepdim=True),
                                 score["lora_B"].mean(dim=0).view(-1, 1)], dim=1).sum(dim=1)
            out[path] = score["lora_E"].view(-1) + q_and_p
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Prune the init_budget - budget least important triplets (ties at the threshold go too, as in PEFT)."""
        importance = self.triplet_importance()
        to_prune = self.init_budget - budget
        if to_prune > 0:
            threshold = torch.kthvalue(torch.cat(list(importance.values())), k=to_prune)[0].item()
            pattern = {path: (~(score <= threshold)).tolist() for path, score in importance.items()}
        else:  # target_r == init_r: nothing to prune
            pattern = {path: [True] * score.numel() for path, score in importance.items()}
        self.apply(pattern)
        self.rank_pattern, self.budget = pattern, budget
        return pattern

    @torch.no_grad()
    def apply(self, pattern: dict[str, list[bool]]) -> None:
        """E_i = 0 for every pruned triplet."""
        for path, layer in self.layers.items():
            lora_e = layer.lora_E[self.adapter_name]
            keep = torch.tensor(pattern[path], dtype=torch.bool, device=lora_e.device)
            lora_e.masked_fill_(~keep.view(-1, 1), 0.0)

    # ---- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {f"exp_avg_ipt.{k}": v for k, v in self.exp_avg_ipt.items()}
        state.update({f"exp_avg_unc.{k}": v for k, v in self.exp_avg_unc.items()})
        state.update(rank_pattern=self.rank_pattern, budget=self.budget)
        return state

    def load_state_dict(self, state: dict) -> None:
        params = dict(self._factors())
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        for key, value in state.items():
            for prefix, target in (("exp_avg_ipt.", self.exp_avg_ipt), ("exp_avg_unc.", self.exp_avg_unc)):
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    target[name] = value.to(device=params[name].device, dtype=params[name].dtype)
        self.rank_pattern, self.budget = state.get("rank_pattern"), state.get("budget")
