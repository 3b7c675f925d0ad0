"""Answer prompts with a model (and an adapter), batched.

    lorakit generate --model smollm2 --prompt "What is LoRA?" "Name three colours."
    lorakit generate --adapter runs/my-run/adapter --prompts-file prompts.txt --output answers.jsonl
    lorakit generate --model smollm2 --raw --prompt "Once upon a time" --do-sample --temperature 0.8

Each prompt becomes a user message (after the --system message, when given), rendered with the chat
template exactly as training renders conversations, ending with the assistant's turn. --raw feeds the
text as it is (plus BOS when the tokenizer uses one), as for prompt_completion training data.
--prompts-file: a .txt file (one prompt per line) or a .jsonl file (per line, a JSON string or an object
with a "prompt" field). Greedy decoding unless --do-sample.
"""

from __future__ import annotations

import argparse
import json
import os

from lorakit.cli.common import (
    add_generation_arguments, add_model_arguments, chat_prompt_ids, check_output_file, check_positive_option,
    generation_kwargs, load_model, prompt_encoder, user_messages,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    prompts = parser.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="extend", nargs="+", metavar="TEXT", help="one or more prompts")
    prompts.add_argument("--prompts-file", metavar="FILE", help="prompts from a .txt or .jsonl file")
    parser.add_argument("--system", metavar="TEXT", help="a system message before each prompt")
    parser.add_argument("--raw", action="store_true", help="no chat template: generate straight after the text")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per batch (default 8)")
    parser.add_argument("--output", metavar="FILE", help="also write {prompt, response} JSON lines to FILE")
    add_generation_arguments(parser, max_new_tokens=128)


def run(args: argparse.Namespace) -> int:
    from lorakit.eval import generate_batch

    check_positive_option("--batch-size", args.batch_size)
    check_output_file(args.output)
    options = generation_kwargs(args)
    prompts = args.prompt if args.prompt else read_prompts(args.prompts_file)
    if args.raw and args.system:
        raise ValueError("--system needs the chat template; drop --raw or --system")
    loaded = load_model(args, "CAUSAL_LM", why="generate (a causal language model)")
    prompt_ids = build_prompt_ids(loaded.tokenizer, prompts, args.system, args.raw, args.template)
    answers = generate_batch(loaded.model, loaded.tokenizer, prompt_ids, batch_size=args.batch_size, **options)
    print_answers(prompts, answers)
    if args.output:
        write_answers(args.output, prompts, answers)
    return 0


def build_prompt_ids(tokenizer, prompts: list[str], system: str | None, raw: bool, template: str) -> list[list[int]]:
    """Token ids of each prompt, as the data module renders prompts for training and evaluation."""
    from lorakit.train.data_formats import Completion

    encoder = prompt_encoder(tokenizer, template)
    if raw:
        return [encoder.generation_prompt(Completion(prompt=p, completion=""), f"prompt {i + 1}")[0]
                for i, p in enumerate(prompts)]
    return [chat_prompt_ids(encoder, user_messages(p, system), f"prompt {i + 1}") for i, p in enumerate(prompts)]


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts-file {path!r} not found")
    from lorakit.text_files import read_text

    lines = read_text(path, "prompt files").splitlines()
    if path.endswith((".jsonl", ".json")):
        prompts = [_json_prompt(line, path, n) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path!r} holds no prompts")
    return prompts


def _json_prompt(line: str, path: str, line_number: int) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from None
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str):
        raise ValueError(f"{path}, line {line_number}: expected a JSON string or an object with a \"prompt\" "
                         "string")
    return value


def print_answers(prompts: list[str], answers: list[str]) -> None:
    if len(prompts) == 1:
        print(answers[0])
        return
    for number, (prompt, answer) in enumerate(zip(prompts, answers), start=1):
        print(f"[{number}] {prompt}\n{answer}\n")


def write_answers(path: str, prompts: list[str], answers: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for prompt, answer in zip(prompts, answers):
            fh.write(json.dumps({"prompt": prompt, "response": answer}, ensure_ascii=False) + "\n")
