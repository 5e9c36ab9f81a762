"""Entry point: ``python -m lightning_afterkernel fit --config configs/quickstart.yaml``."""

from lightning_afterkernel.cli import main

if __name__ == "__main__":
    main()
