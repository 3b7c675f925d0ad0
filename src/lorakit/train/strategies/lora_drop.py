"""LoRA-drop: keep the adapters whose output matters, share one among the rest.

Zhou et al. 2024, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation",
https://arxiv.org/abs/2402.07721.

Phase 1 (in `setup`, before the run's optimizer exists): train the freshly initialised adapter for
`train.lora_drop_warmup_steps` steps on a random sample D_s of `train.lora_drop_sample_ratio` of the training
rows, then measure on D_s, for every transformer block i, the squared size of its adapters' outputs:

    g_i = sum over rows x in D_s, tokens t, adapter layers m in block i of  || s_m B_m A_m x_{m,t} ||^2
    I_i = g_i / sum_j g_j

(`adapter_output`, so any layer method works; padding tokens are left out). Blocks sorted by I_i, largest
first, are kept until their cumulative importance reaches T = `train.lora_drop_threshold`.

Phase 2: every trained tensor goes back to its value before the warm-up (the adapter a plain run starts
from, and any trained head); kept blocks own their adapter tensors, and the other blocks share one set (the
first dropped block's) per module kind (its path inside the block, e.g.
`self_attn.q_proj`): one set of tensors registered in each of those layers, so it trains once, with the
summed gradient of all of them. The run then trains this adapter from step 0. Layers outside the blocks
keep their own adapters.

Files: an adapter file holds the shared tensors once per layer (PEFT's format): PEFT and lorakit load it as a
plain adapter whose shared layers have equal tensors, with the same outputs. Checkpoints hold the kept
blocks (this hook's state), and a resumed run rebuilds the sharing from them instead of measuring again.
"""

from __future__ import annotations

import math

import torch

from lorakit.adapter_layer import AdapterLayer
from lorakit.eval.metrics import summed_token_loss
from lorakit.train.setup import transformer_blocks
from lorakit.train.strategies.adapters import peft_model, require_capability
from lorakit.train.strategies.base import Strategy, check_int, check_number
from lorakit.tuner import WRAPS_LAYERS


class LoraDrop(Strategy):
    name = "lora_drop"
    title = "LoRA-drop"
    options = ("lora_drop_threshold", "lora_drop_warmup_steps", "lora_drop_sample_ratio")
    adapter_runs = True

    @classmethod
    def check_options(cls, args) -> None:
        check_number("lora_drop_threshold", args.lora_drop_threshold, 0.0, 1.0, low_open=True)
        check_int("lora_drop_warmup_steps", args.lora_drop_warmup_steps, 1)
        check_number("lora_drop_sample_ratio", args.lora_drop_sample_ratio, 0.0, 1.0, low_open=True)

    def __init__(self, model, cfg, run) -> None:
        super().__init__(model, cfg, run)
        self.model = peft_model(model, self.title)
        require_capability(self.model, WRAPS_LAYERS, self.title, "it ranks and shares adapter layers")
        try:
            blocks = transformer_blocks(self.model.get_base_model())
        except ValueError:
            raise ValueError(f"train.lora_drop_threshold: LoRA-drop ranks transformer blocks, but "
                             f"{type(self.model.get_base_model()).__name__} has no list of blocks") from None
        names = self.model.active_adapters
        # block index -> {path inside the block: (layer, adapter name)}
        self.block_layers = [
            {path: (m, name) for path, m in block.named_modules() if isinstance(m, AdapterLayer)
             for name in names if m.has_adapter(name)}
            for block in blocks]
        if not any(self.block_layers):
            raise ValueError("train.lora_drop_threshold: the adapter has no layers inside the transformer blocks, "
                             "so there is nothing to rank; target modules inside the blocks")
        self.importance: list[float] = []
        self.kept: list[int] = []

    # ---- phase 1: warm-up and measurement ------------------------------------------------------------
    def setup(self, model) -> None:
        saved = self.run.resumed_state.get(self.name)
        if saved and saved.get("kept") is not None:  # a resume: the sharing the checkpoint was made with
            self.importance, kept = [float(v) for v in saved["importance"]], [int(i) for i in saved["kept"]]
        else:
            initial = {p: p.detach().clone() for p in self.model.parameters() if p.requires_grad}
            sample = self.sample_rows()
            self.warm_up(sample)
            self.importance = self.measure(sample)
            kept = select_blocks(self.importance, self.args.lora_drop_threshold)
            with torch.no_grad():  # phase 2 starts from the adapter (and heads) a plain run starts from
                for param, value in initial.items():
                    param.copy_(value)
        self.share(kept)
        if self.run.rank == 0:
            shared = [i for i in range(len(self.block_layers)) if i not in kept and self.block_layers[i]]
            print(f"LoRA-drop: blocks {kept} keep their adapters; blocks {shared} share one (importance "
                  f"{[round(v, 4) for v in self.importance]})", flush=True)

    def sample_rows(self) -> list[dict]:
        rows = self.run.rows
        if not rows or self.run.collate is None:
            raise ValueError("LoRA-drop needs the training rows to measure the adapters' outputs")
        n = max(1, math.ceil(self.args.lora_drop_sample_ratio * len(rows)))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.args.seed))
        return [rows[i] for i in sorted(order[:n].tolist())]

    def batches(self, rows: list[dict]):
        size = self.args.batch_size
        for start in range(0, len(rows), size):
            batch = self.run.collate(rows[start:start + size])
            yield {k: v.to(self.run.device) for k, v in batch.items()}

    def warm_up(self, sample: list[dict]) -> None:
        """Train the adapter for lora_drop_warmup_steps steps on the sample (its own AdamW), as the run would."""
        from lorakit.train.optim import build_optimizer

        optimizer = build_optimizer(self.model, self.args)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        was_training = self.model.training
        self.model.train()
        batches: list[dict] = []
        for _ in range(self.args.lora_drop_warmup_steps):
            if not batches:
                batches = list(self.batches(sample))
            batch = batches.pop(0)
            loss_sum, tokens = summed_token_loss(self.model, batch, config=self.run.model_config)
            (loss_sum / max(tokens, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.model.train(was_training)

    @torch.no_grad()
    def measure(self, sample: list[dict]) -> list[float]:
        """I_i for every block: the share of sum ||adapter output||^2 over the sample's tokens."""
        totals = [0.0] * len(self.block_layers)
        mask: list[torch.Tensor | None] = [None]

        def recorder(index: int, name: str):
            def hook(layer, inputs, output):
                x = inputs[0]
                squares = layer.adapter_output(name, x, layer.base_layer(x)).float().pow(2).sum(-1)
                if mask[0] is not None and squares.shape == mask[0].shape:
                    squares = squares * mask[0]
                totals[index] += float(squares.sum())
            return hook

        handles = [layer.register_forward_hook(recorder(i, name))
                   for i, layers in enumerate(self.block_layers) for layer, name in layers.values()]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.batches(sample):
                mask[0] = batch["attention_mask"].float() if "attention_mask" in batch else None
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                self.model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        total = sum(totals)
        if not total > 0:
            raise ValueError("LoRA-drop: every adapter output is zero after the warm-up, so the blocks cannot be "
                             "ranked; raise train.lora_drop_warmup_steps or train.learning_rate")
        return [t / total for t in totals]

    # ---- phase 2: the shared adapter -----------------------------------------------------------------
    def share(self, kept: list[int]) -> None:
        """Blocks not in `kept` take the adapter tensors of the first such block, per module kind."""
        owners: dict[str, AdapterLayer] = {}
        for index, layers in enumerate(self.block_layers):
            if index in kept:
                continue
            for path, (layer, name) in layers.items():
                owner = owners.setdefault(path, layer)
                if owner is not layer:
                    tie_adapter(layer, owner, name, path)
        self.kept = sorted(kept)

    def state_dict(self) -> dict:
        return {"importance": self.importance, "kept": self.kept}


def select_blocks(importance: list[float], threshold: float) -> list[int]:
    """Indices of the most important blocks whose importances add up to at least `threshold` (sorted)."""
    order = sorted(range(len(importance)), key=lambda i: -importance[i])  # stable: ties keep block order
    kept, total = [], 0.0
    for index in order:
        if total >= threshold - 1e-12:
            break
        kept.append(index)
        total += importance[index]
    return sorted(kept)


def tie_adapter(layer: AdapterLayer, owner: AdapterLayer, name: str, path: str) -> None:
    """Make `layer` use `owner`'s tensors of adapter `name` (the same objects: trained once, saved per layer)."""
    if type(layer) is not type(owner):
        raise ValueError(f"LoRA-drop cannot share adapters between {type(owner).__name__} and "
                         f"{type(layer).__name__} ({path})")
    mine, theirs = layer.adapter_tensors(name), owner.adapter_tensors(name)
    if {k: tuple(v.shape) for k, v in mine.items()} != {k: tuple(v.shape) for k, v in theirs.items()}:
        raise ValueError(f"LoRA-drop shares one adapter among the blocks it drops, but their {path} adapters have "
                         "different shapes (a rank_pattern?); give those modules one rank")
    for attr in layer.adapter_param_names:
        container = getattr(layer, attr)
        if name in container:
            container[name] = getattr(owner, attr)[name]
