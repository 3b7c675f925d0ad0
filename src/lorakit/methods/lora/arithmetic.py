"""Adapter arithmetic: a new LoRA adapter as a weighted combination of existing ones (PEFT's
`add_weighted_adapter`, same combination types, same numbers).

The merge rules are plain functions over a list of same-shaped "task tensors" t_i and their weights w_i:
- task_arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089): sum_i w_i t_i.
- ties (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): keep the `density` fraction of largest-magnitude
  entries of each t_i, elect a sign per entry (sign of the sum, "total", or of the count, "frequency"), and
  average the weighted entries that agree with it.
- dare_linear / dare_ties (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop entries at random (keep each
  with probability `density`) and rescale by 1/density, then sum / ties-merge. Drawn from torch's global
  generator in PEFT's order, so the same seed gives PEFT's result.
- magnitude_prune: keep the `density` largest entries of each t_i, then sum.

How they apply to LoRA (s_i = adapter i's scaling; the new adapter has lora_alpha = r, so its scaling is 1):
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the rule is applied to the A's (weights
  sign(w_i s_i) sqrt|w_i s_i|) and to the B's (weights sqrt|w_i s_i|) separately. Cheap but only an
  approximation of sum_i w_i s_i B_i A_i (cross terms B_i A_j appear); needs equal ranks.
- "cat": A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 | B_2 | ...]: exactly sum_i w_i s_i B_i A_i, rank sum_i r_i.
- "svd" and "<rule>_svd": the rule is applied to the full updates s_i B_i A_i (matrix layout), and the result is
  truncated to rank `svd_rank` (default: the largest source rank) by SVD: B = U_k S_k, A = V_k^T (optionally
  clamped at the `svd_clamp` quantile of their entries).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from lorakit.methods.lora.init import rewrites_base
from lorakit.methods.lora.layer import LoraLayer
from lorakit.modules_to_save import ModulesToSaveWrapper
from lorakit.state import adapter_holders

MAJORITY_SIGN_METHODS = ("total", "frequency")


# ---- merge rules over task tensors -----------------------------------------------------------------------

def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i."""
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability `density` (torch's global generator) and divide by density (DARE)."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry, True where t_i has the elected sign: the sign of sum_i t_i ("total") or the more frequent sign
    ("frequency"); ties go to +."""
    signs = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over i of the entries the mask keeps (0 where none is kept)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def ties(tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    stacked = torch.stack([magnitude_pruned(t, density) for t in tensors])
    return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign_method))


def dare_linear(tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    return task_arithmetic([randomly_pruned(t, density) for t in tensors], weights)


def dare_ties(tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    stacked = torch.stack([randomly_pruned(t, density) for t in tensors])
    return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign_method))


def magnitude_prune(tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    return task_arithmetic([magnitude_pruned(t, density) for t in tensors], weights)


def _plain_sum(tensors, weights, density=None, majority_sign_method="total") -> torch.Tensor:
    return task_arithmetic(tensors, weights)


MERGE_RULES = {"linear": _plain_sum, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties,
               "magnitude_prune": magnitude_prune}
# combination type -> (merge rule, applied to "factors" (A's and B's) or to the full "updates" then SVD)
COMBINATION_TYPES = {
    **{name: (rule, "factors") for name, rule in MERGE_RULES.items()},
    "svd": (_plain_sum, "updates"),
    **{f"{name}_svd": (rule, "updates") for name, rule in MERGE_RULES.items() if name != "linear"},
    "cat": (None, "cat"),
}
USES_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# ---- LoRA adapters ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Combination:
    rule: object
    kind: str  # "factors", "updates" or "cat"
    rank: int
    density: float | None
    majority_sign_method: str
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None


def combine_lora_adapters(peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                          combination_type: str = "svd", svd_rank: int | None = None,
                          svd_clamp: float | None = None, svd_full_matrices: bool = True,
                          svd_driver: str | None = None, density: float | None = None,
                          majority_sign_method: str = "total") -> None:
    """Add `adapter_name` = combination of `adapters` (see the module doc). PeftModel.add_weighted_adapter has
    checked the names and weights; this checks what is LoRA-specific, then adds and fills the new adapter."""
    configs = [peft_model.peft_config[a] for a in adapters]
    combination = _check(adapters, configs, combination_type, svd_rank, svd_clamp, density, majority_sign_method,
                         svd_driver, svd_full_matrices)
    model = peft_model.get_base_model()
    holders = adapter_holders(model)
    for path, holder in holders:  # the combinations need each update in the base weight's layout
        if isinstance(holder, LoraLayer) and any(holder.has_adapter(a) for a in adapters) and holder.merge_refusal():
            raise ValueError(f"add_weighted_adapter: {path}: {holder.merge_refusal()}. Combine adapters that leave "
                             "this module out.")
    copies = _trained_copies(holders, adapters)
    targets = sorted(path for path, h in holders if isinstance(h, LoraLayer) and any(h.has_adapter(a) for a in adapters))
    new_config = dataclasses.replace(
        configs[0], r=combination.rank, lora_alpha=combination.rank, use_rslora=False, use_dora=False,
        # the first adapter's init as PEFT (its random draws come before DARE's), but never one rewriting the base
        init_lora_weights=True if rewrites_base(configs[0].init_lora_weights) else configs[0].init_lora_weights,
        rank_pattern={}, alpha_pattern={}, exclude_modules=None, layers_to_transform=None,
        layers_pattern=None, inference_mode=False,
        # the exact modules holding any source adapter, by full name (a target list matches full names exactly)
        target_modules=targets,
        modules_to_save=sorted({m for c in configs for m in (c.modules_to_save or [])}) or None,
    )
    peft_model.add_adapter(adapter_name, new_config)
    with torch.no_grad():
        for path, holder in adapter_holders(model):  # named_modules order: the order PEFT draws DARE's masks in
            if isinstance(holder, LoraLayer) and holder.has_adapter(adapter_name):
                _fill_layer(holder, path, adapters, weights, adapter_name, combination)
            elif isinstance(holder, ModulesToSaveWrapper) and path in copies:
                holder.modules_to_save[adapter_name].load_state_dict(holder.modules_to_save[copies[path]].state_dict())


def _check(adapters, configs, combination_type, svd_rank, svd_clamp, density, majority_sign_method, svd_driver,
           svd_full_matrices) -> Combination:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not one of {', '.join(COMBINATION_TYPES)}")
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one adapter is just scaled
    dora = [a for a, c in zip(adapters, configs) if c.use_dora]
    if dora:
        raise ValueError(f"add_weighted_adapter cannot combine DoRA adapters ({', '.join(dora)}): their magnitude "
                         "vectors do not combine with the B A updates")
    rule, kind = COMBINATION_TYPES[combination_type]
    base_type = combination_type.removesuffix("_svd")
    if base_type in USES_DENSITY:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0 <= density <= 1:
            raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of "
                             f"entries kept); got density={density!r}")
        if density >= 1:
            warnings.warn(f"density={density} keeps every entry: {combination_type} prunes nothing")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {MAJORITY_SIGN_METHODS}, got {majority_sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
    # the largest rank each adapter has anywhere (rank_pattern included), as PEFT sizes the new adapter
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if kind == "factors":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} combines the A and B matrices entry by entry, "
                             f"so all adapters need the same r; got {dict(zip(adapters, ranks))}. Use 'cat' or "
                             "'svd' for adapters of different ranks.")
        rank = ranks[0]
    elif kind == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
    return Combination(rule, kind, rank, density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)


def _trained_copies(holders, adapters) -> dict[str, str]:
    """Module path -> the one source adapter whose trained copy (modules_to_save) the new adapter takes over."""
    copies = {}
    for path, holder in holders:
        if isinstance(holder, ModulesToSaveWrapper):
            owners = [a for a in adapters if holder.has_adapter(a)]
            if len(owners) > 1:
                raise ValueError(f"adapters {owners} each train their own copy of {path} (modules_to_save); copies "
                                 "of whole modules cannot be combined. Combine adapters that share no such module.")
            if owners:
                copies[path] = owners[0]
    return copies


def _fill_layer(layer: LoraLayer, path: str, adapters, weights, new: str, combination: Combination) -> None:
    sources = [(a, w) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
    new_a, new_b = layer.matrix_factors(new)
    new_a.zero_()
    new_b.zero_()
    if combination.kind == "cat":
        a = torch.cat([layer.matrix_factors(s)[0] * w * layer.scaling[s] for s, w in sources], dim=0)
        b = torch.cat([layer.matrix_factors(s)[1] for s, _ in sources], dim=1)
    elif combination.kind == "factors":
        a, b = _combine_factors(layer, path, sources, combination)
    else:
        a, b = _combine_updates(layer, sources, combination)
    rank = a.shape[0]  # may be below the new adapter's r (a lower-rank layer, a small matrix): the rest stays 0
    new_a[:rank].copy_(a)
    new_b[:, :rank].copy_(b)


def _combine_factors(layer, path, sources, combination):
    ranks = {s: layer.r[s] for s, _ in sources}
    if len(set(ranks.values())) != 1:
        raise ValueError(f"{path}: the adapters have different ranks here {ranks} (rank_pattern), which a "
                         "factor-wise combination cannot mix; use 'cat' or an '_svd' combination type")
    weights_a, weights_b, tensors_a, tensors_b = [], [], [], []
    for source, weight in sources:
        scaled = weight * layer.scaling[source]
        sign = 1 if scaled >= 0 else -1  # the sign goes on A only, or it would cancel out
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
        a, b = layer.matrix_factors(source)
        tensors_a.append(a)
        tensors_b.append(b)
    merged = []
    for tensors, weights in ((tensors_a, weights_a), (tensors_b, weights_b)):
        weights = torch.tensor(weights, device=tensors[0].device)
        merged.append(combination.rule(tensors, weights, combination.density, combination.majority_sign_method)
                      .to(tensors[0].dtype))
    return merged


def _combine_updates(layer, sources, combination):
    # the rule sees the updates in the base weight's layout, as PEFT's get_delta_weight gives them: DARE draws its
    # masks over them in memory order, so the same seed gives PEFT's masks
    deltas = []
    for source, _ in sources:
        a, b = layer.matrix_factors(source)
        deltas.append(layer.from_matrix((b @ a) * layer.scaling[source]))
    weights = torch.tensor([w for _, w in sources], device=deltas[0].device)
    delta = layer.to_matrix(combination.rule(deltas, weights, combination.density, combination.majority_sign_method))
    u, s, vh = torch.linalg.svd(delta, full_matrices=combination.svd_full_matrices, driver=combination.svd_driver)
    k = min(combination.rank, s.shape[0])
    b, a = u[:, :k] * s[:k], vh[:k]
    if combination.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), combination.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b

