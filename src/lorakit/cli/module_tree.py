"""Text views of a model for `lorakit inspect`: the module tree with repeated blocks collapsed, and the
modules an adapter could target (grouped by short name, with types and shapes).

    LlamaForCausalLM: 134,515,008 parameters
      model: LlamaModel (134,515,008 parameters)
        embed_tokens: Embedding(49152 x 576)
        layers.0-29: 30 x LlamaDecoderLayer (3,540,096 parameters)
          self_attn: LlamaAttention (884,736 parameters)
            q_proj: Linear(576 -> 576)
"""

from __future__ import annotations

from collections import Counter

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.inject import base_of, candidate_modules, is_linear, output_head_names
from lorakit.model import parameter_counts


def parameter_count(module: nn.Module) -> int:
    return parameter_counts(module)[1]  # quantized weights included


# ---- the module tree ------------------------------------------------------------------------------------
def tree_lines(model: nn.Module) -> list[str]:
    lines = [f"{type(model).__name__}: {parameter_count(model):,d} parameters"]
    _add_children(model, 1, lines)
    return lines


def _add_children(module: nn.Module, depth: int, lines: list[str]) -> None:
    for label, child, repeats in _children(module):
        times = f"{repeats} x " if repeats > 1 else ""
        lines.append(f"{'  ' * depth}{label}: {times}{describe(child)}")
        _add_children(child, depth + 1, lines)


def _children(module: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(label, module, repeats): a list of blocks becomes runs of identical blocks ("layers.0-29")."""
    out = []
    for name, child in module.named_children():
        numbered = [n for n, _ in child.named_children()]
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and numbered and all(n.isdigit() for n in numbered):
            for first, last, block in _runs(child):
                label = f"{name}.{first}" if first == last else f"{name}.{first}-{last}"
                out.append((label, block, int(last) - int(first) + 1))
        else:
            out.append((name, child, 1))
    return out


def _runs(blocks: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Consecutive blocks with the same structure: (first index, last index, first block)."""
    runs: list[list] = []
    for name, block in blocks.named_children():
        if runs and _signature(runs[-1][2]) == _signature(block):
            runs[-1][1] = name
        else:
            runs.append([name, name, block])
    return [tuple(run) for run in runs]


def _signature(module: nn.Module) -> tuple:
    return (tuple((n, type(m).__name__) for n, m in module.named_modules())
            + tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


def describe(module: nn.Module) -> str:
    """One module in a few words: its type, and its shape for the layer types adapters wrap."""
    shape = layer_shape(module)
    if shape is not None:
        return f"{type(module).__name__}({shape})"
    if any(True for _ in module.children()):
        return f"{type(module).__name__} ({parameter_count(module):,d} parameters)"
    params = ", ".join(f"{n} {'x'.join(map(str, p.shape))}" for n, p in module.named_parameters(recurse=False))
    return f"{type(module).__name__}({params})" if params else type(module).__name__


def layer_shape(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or is_linear(module) and hasattr(module, "in_features"):  # also NF4Linear
        return f"{module.in_features} -> {module.out_features}{', bias' if module.bias is not None else ''}"
    if isinstance(module, Conv1D):  # GPT-2 style: weight stored (in, out)
        return f"{module.weight.shape[0]} -> {module.weight.shape[1]}"
    if isinstance(module, nn.Embedding):
        return f"{module.num_embeddings} x {module.embedding_dim}"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kernel = "x".join(map(str, module.kernel_size))
        groups = f", groups {module.groups}" if module.groups > 1 else ""
        return f"{module.in_channels} -> {module.out_channels}, kernel {kernel}{groups}"
    if isinstance(module, nn.MultiheadAttention):
        return f"{module.embed_dim} wide, {module.num_heads} heads"
    return None


# ---- target candidates ------------------------------------------------------------------------------------
def candidate_rows(model: nn.Module, layer_types: tuple[type, ...], task_type: str | None) -> list[list[str]]:
    """[short name, type, shape, count, example full name, note] for every module of `layer_types`."""
    heads = output_head_names(model, task_type)
    groups: dict[tuple, list[str]] = {}
    for name, module in candidate_modules(model):
        base = base_of(module)
        if name and isinstance(base, layer_types):
            key = (name.rsplit(".", 1)[-1], type(base).__name__, layer_shape(base) or "", name in heads)
            groups.setdefault(key, []).append(name)
    rows = []
    for (short, kind, shape, is_head), names in groups.items():
        note = "output head: all-linear leaves it out" if is_head else ""
        rows.append([short, kind, shape.removesuffix(", bias"), str(len(names)), names[0], note])
    return rows


def format_columns(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    render = lambda row: indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [render(header), *map(render, rows)]


def count_by_short_name(names: list[str]) -> str:
    """"q_proj x 30, v_proj x 30" in order of first appearance."""
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    return ", ".join(f"{short} x {count}" for short, count in counts.items())
