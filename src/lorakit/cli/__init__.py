"""The `lorakit` command line: one command table (main.py), one small module per command.

    lorakit train run.yaml train.learning_rate=1e-4
    lorakit eval --model smollm2 --adapter runs/my-run/adapter --data data/val.jsonl
    lorakit generate --adapter runs/my-run/adapter --prompt "Write a haiku about LoRA"
    lorakit chat --adapter runs/my-run/adapter
    lorakit merge --adapter runs/my-run/adapter --output merged/
    lorakit inspect --model smollm2 --target-modules all-linear --r 8
    lorakit data run.yaml                        # how training will see the data (tokenizer only)
"""
