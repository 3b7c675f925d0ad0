"""`python -m lorakit ...`, which is also what `torchrun --nproc_per_node=N -m lorakit train run.yaml` runs."""

from lorakit.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
