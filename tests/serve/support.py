"""Shared pieces of the serving tests: tiny float64 models, adapters of several shapes, references, a server.

float64 makes "equal to the adapter run alone" exact: a batched matmul and a single-row one differ in the
last bits of fp32, which could flip a greedy token when two logits nearly tie; in fp64 they cannot.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli.common import chat_prompt_ids, prompt_encoder
from lorakit.eval.generation import stop_token_ids
from lorakit.serve.app import ServerSettings
from lorakit.serve.engine import EngineSettings
from lorakit.serve.server import Server, ServerThread, build_server
from lorakit.train.data_formats import Completion
from tests.tiny import tiny_llama, tiny_tokenizer

BASE_NAME = "tiny"
MAX_MODEL_LEN = 512
# eight adapters side by side: ranks 1..16, rsLoRA, rank/alpha patterns, different target sets
ADAPTER_SPECS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora-r16": dict(r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "mlp-r2": dict(r=2, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "pattern": dict(r=4, lora_alpha=4, target_modules="all-linear", rank_pattern={"q_proj": 8, "down_proj": 1},
                    alpha_pattern={"v_proj": 64}),
    "layer1-r1": dict(r=1, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "regex-r6": dict(r=6, lora_alpha=12, target_modules=r".*\.self_attn\.(k|v)_proj"),
    "o-r3": dict(r=3, lora_alpha=9, target_modules=["o_proj"]),
}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed, max_position_embeddings=MAX_MODEL_LEN).double()


def make_adapter(directory: str, seed: int = 0, **lora) -> str:
    """A LoRA adapter with random A and B (big enough to change greedy answers), saved in PEFT's format."""
    model = tiny_model()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(directory)
    return directory


def make_adapters(root: str, specs: dict = ADAPTER_SPECS) -> dict[str, str]:
    return {name: make_adapter(os.path.join(root, name), seed=i, **spec)
            for i, (name, spec) in enumerate(specs.items())}


def chat_ids(tokenizer, text: str) -> list[int]:
    return chat_prompt_ids(prompt_encoder(tokenizer), [{"role": "user", "content": text}])


def raw_ids(tokenizer, text: str) -> list[int]:
    """A completions prompt as the server tokenizes it (as `lorakit generate --raw`: BOS only if the tokenizer
    adds one by itself)."""
    return prompt_encoder(tokenizer).generation_prompt(Completion(prompt=text, completion=""), "prompt")[0]


class References:
    """What each adapter (or the base) answers alone: lorakit's PeftModel + generate, greedy, one prompt."""

    def __init__(self, adapter_dirs: dict[str, str]) -> None:
        self.adapter_dirs = adapter_dirs
        self.models: dict[str | None, torch.nn.Module] = {}
        self.cache: dict[tuple, list[int]] = {}
        self.tokenizer = tiny_tokenizer()

    def model(self, adapter: str | None):
        if adapter not in self.models:
            base = tiny_model()
            self.models[adapter] = (base if adapter is None else
                                    PeftModel.from_pretrained(base, self.adapter_dirs[adapter])).eval()
        return self.models[adapter]

    def ids(self, adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
        """Generated ids, up to (without) the first stop token."""
        key = (adapter, tuple(prompt), max_tokens)
        if key not in self.cache:
            model = self.model(adapter)
            stops = stop_token_ids(tiny_model(), self.tokenizer)
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     do_sample=False, eos_token_id=stops, pad_token_id=0)
            new = out[0, len(prompt):].tolist()
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            self.cache[key] = new[:cut]
        return self.cache[key]

    def text(self, adapter: str | None, prompt: list[int], max_tokens: int) -> str:
        return self.tokenizer.decode(self.ids(adapter, prompt, max_tokens), skip_special_tokens=True)


@dataclass
class RunningServer:
    server: Server
    url: str
    adapter_dirs: dict[str, str]
    adapter_root: str

    @property
    def engine(self):
        return self.server.engine


def start_server(adapter_root: str, adapters: dict[str, str] | None = None, settings: dict | None = None,
                 engine: dict | None = None) -> tuple[RunningServer, ServerThread]:
    server_settings = ServerSettings(BASE_NAME, adapter_dir=adapter_root, **(settings or {}))
    engine_settings = EngineSettings(**{"max_batch": 32, "max_model_len": MAX_MODEL_LEN, **(engine or {})})
    server = build_server(tiny_model(), tiny_tokenizer(), server_settings, engine_settings, adapters or {})
    thread = ServerThread(server.app)
    return RunningServer(server, thread.start(), adapters or {}, adapter_root), thread


def http(url: str, method: str = "GET", body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one plain HTTP request (no client library)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text
