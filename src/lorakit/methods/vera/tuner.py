"""Registration of VeRA and its lifecycle: the shared projections live on the host, outside the layers.

    prepare()   create base_model.vera_A[adapter] (r, max d_in) and vera_B[adapter] (max d_out, r) over the targets
    inject()    wrap the targets; every layer reads the host's projections
    state       + base_model.vera_A / base_model.vera_B (PEFT's file keys), rebuilt from the seed when
                save_projection is False (optional_state_keys)
    remove()    drop this adapter's projections (and the containers with the last one)

Several adapters on one model share the first adapter's projections, as in PEFT (which requires the same
projection_prng_key and save_projection of all of them): a later adapter takes the block it needs from them, so
its layers must fit and its r must be the same.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.inject import base_of, find_targets
from lorakit.methods.vera.config import VeraConfig
from lorakit.methods.vera.layer import VeraLinear, in_out_features
from lorakit.methods.vera.projections import ProjectionBuffers, generate_projections
from lorakit.methods.quant import NF4Linear
from lorakit.registry import register_method
from lorakit.tuner import Tuner, bias_parameter_names

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # file keys, as PEFT writes them


@register_method("vera")
class VeraTuner(Tuner):
    config_cls = VeraConfig
    display_name = "VeRA"
    prefix = "vera_lambda_"
    layers = {nn.Linear: VeraLinear, Conv1D: VeraLinear, NF4Linear: VeraLinear}

    # ---- building ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        targets = find_targets(self.model, self.config, type(self))
        shapes = {name: in_out_features(base_of(self.model.get_submodule(name))) for name in targets}
        in_max = max(d_in for d_in, _ in shapes.values())
        out_max = max(d_out for _, d_out in shapes.values())
        if getattr(self.host, "vera_A", None) is None or not len(self.host.vera_A):
            vera_a, vera_b = generate_projections(self.config.projection_prng_key, self.config.r, in_max, out_max)
            self.host.vera_A, self.host.vera_B = ProjectionBuffers(), ProjectionBuffers()
            self.host.vera_A.shared_settings = self._shared_settings()
        else:
            vera_a, vera_b = self._share_existing(shapes, in_max, out_max)
        device = next(iter(self.model.get_submodule(targets[0]).parameters())).device
        self.host.vera_A.set(self.adapter_name, vera_a.to(device), persistent=self.config.save_projection)
        self.host.vera_B.set(self.adapter_name, vera_b.to(device), persistent=self.config.save_projection)

    def _shared_settings(self) -> dict:
        return {"projection_prng_key": self.config.projection_prng_key, "save_projection": self.config.save_projection}

    def _share_existing(self, shapes: dict[str, tuple[int, int]], in_max: int, out_max: int):
        """The block of the existing projections this adapter needs, as copies (loading a file into them must not
        change another adapter's)."""
        first = self.host.vera_A.keys()[0]
        shared_a, shared_b = self.host.vera_A[first], self.host.vera_B[first]
        r, shared_in, shared_out = shared_a.shape[0], shared_a.shape[1], shared_b.shape[0]
        for field, value in self._shared_settings().items():
            wanted = self.host.vera_A.shared_settings[field]
            if value != wanted:
                raise ValueError(f"VeraConfig.{field}={value!r}: every VeRA adapter of a model shares the first one's "
                                 f"projections, so it must be {wanted!r} (as for adapter {first!r})")
        if self.config.r != r:
            raise ValueError(f"VeraConfig.r={self.config.r}: every VeRA adapter of a model shares the projections of "
                             f"adapter {first!r}, whose rank is {r}; use r={r} (or add this adapter to a fresh model)")
        too_big = {n: s for n, s in shapes.items() if s[0] > shared_in or s[1] > shared_out}
        if too_big:
            name, (d_in, d_out) = next(iter(too_big.items()))
            raise ValueError(
                f"VeraConfig.target_modules: {name} (d_in={d_in}, d_out={d_out}) cannot share the VeRA projections of "
                f"adapter {first!r}, which cover d_in <= {shared_in} and d_out <= {shared_out}; target layers "
                f"that fit, or add the adapter with the largest layers first")
        if not self.config.save_projection and (in_max, out_max) != (shared_in, shared_out):
            raise ValueError(
                f"VeraConfig.save_projection=False with target_modules whose largest layer is d_in={in_max}, "
                f"d_out={out_max}: this adapter would use a block of adapter {first!r}'s projections (d_in={shared_in}, "
                f"d_out={shared_out}), which the seed alone cannot regenerate when the adapter is loaded; target "
                "layers of the same largest size, or set save_projection=True")
        return shared_a[:, :in_max].clone(), shared_b[:out_max, :].clone()

    def inject(self) -> list[str]:
        targets = super().inject()
        for name in targets:
            self.model.get_submodule(name).use_projections(self.host.vera_A, self.host.vera_B)
        return targets

    def remove(self) -> None:
        holders = [getattr(self.host, attr, None) for attr in ("vera_A", "vera_B")]
        for holder in holders:
            if holder is not None and self.adapter_name in holder:
                del holder[self.adapter_name]
        if all(holder is not None and not len(holder) for holder in holders):
            del self.host.vera_A, self.host.vera_B

    # ---- tensors -----------------------------------------------------------------------------------------
    def trainable_base_parameters(self) -> list[str]:
        return bias_parameter_names(self.model, self.adapter_name, self.config.bias)

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        return {PROJECTION_KEYS[0]: self.host.vera_A[self.adapter_name],
                PROJECTION_KEYS[1]: self.host.vera_B[self.adapter_name]}

    def optional_state_keys(self) -> set[str]:
        return set() if self.config.save_projection else set(PROJECTION_KEYS)

    # ---- conformance -------------------------------------------------------------------------------------
    @classmethod
    def sample_config(cls, target_modules: list[str], identity: bool) -> VeraConfig:
        """identity: b = 0; otherwise b = 1 and d ~ N(0, 1) (PEFT's init_weights=False)."""
        return VeraConfig(r=4, target_modules=target_modules, init_weights=identity)
