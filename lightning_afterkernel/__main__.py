"""Entry point: ``python -m lightning_afterkernel {fit,validate,test,predict} --config configs/<name>.yaml``,
``python -m lightning_afterkernel reproduce ...`` (the paper grid) and ``... report ...`` (its report)."""

import sys

REPORTING_COMMANDS = ("reproduce", "report")
EXTRA_HELP = (
    "Paper reproduction (besides LightningCLI's subcommands below):\n"
    "  reproduce   run the paper grid:\n"
    "              python -m lightning_afterkernel reproduce --out runs/paper [--scale tiny|cpu|full]\n"
    "  report      write docs/reproduction.md from one or more scales' results, side by side:\n"
    "              python -m lightning_afterkernel report results/full results/cpu\n"
    "  (each takes --help)\n"
)


def run(argv: list[str]) -> None:
    """``reproduce``/``report`` go to the reporting layer; everything else to LightningCLI (which reads sys.argv)."""
    if argv[:1] and argv[0] in REPORTING_COMMANDS:
        # The entry point is the only place below the reporting layer that names it, and only on demand.
        from lightning_afterkernel.reporting.commands import main as reporting_main

        reporting_main(argv)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(EXTRA_HELP)
    from lightning_afterkernel.cli import main

    main()


if __name__ == "__main__":
    run(sys.argv[1:])
