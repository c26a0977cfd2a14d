"""The ``hardneg`` command.

``hardneg fit|validate|test`` are LightningCLI subcommands (configs compose with repeated
``--config``; the last one wins). ``hardneg zoo`` lists the encoder presets; ``hardneg data check``
checks a benchmark folder and prints its split sizes. ``hardneg mine`` mines hard negatives for a
query/document DataModule offline (sentence-transformers' JSONL). ``hardneg compositional`` scores an
image-text model per category on SugarCrepe, SugarCrepe++ or the offline scenes. ``hardneg grid FILE`` runs an ablation grid on
Ray Tune; ``hardneg report GRID_DIR`` writes its tables and plots. Heavy libraries are
imported only by the subcommands that need them, so ``hardneg --help`` and ``hardneg zoo`` are fast.
"""

from __future__ import annotations

import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: hardneg {fit,validate,test,grid,report,zoo,data,mine,compositional} ...

Hard-negative mining for contrastive and deep metric learning.

subcommands:
  fit        train a model (LightningCLI): hardneg fit --config experiments/quickstart/fashion_mnist.yaml
  validate   evaluate on the validation split (LightningCLI)
  test       evaluate on the test split (LightningCLI)
  grid       run an ablation grid on Ray Tune (rerun to resume): hardneg grid experiments/grids/quickstart.yaml
  report     tables (mean +/- std over seeds) and plots of a grid: hardneg report runs/grids/quickstart
  zoo        list the encoder presets with their modality, embedding size and weight source
  data       check a DataModule (and every check fit runs) and print its split sizes: hardneg data check --data CONFIG.yaml [--verify]
  mine       mine hard negatives offline (resumable): hardneg mine --model minilm-l6 --data CONFIG.yaml --out negatives.jsonl
  compositional  per-category compositional accuracy: hardneg compositional --model lite0-minilm-clip --sugarcrepe DIR --coco-images DIR

Run `hardneg SUBCOMMAND --help` for the options of one subcommand.
"""


def zoo(argv: list[str]) -> int:
    from models import list_encoders

    rows = list_encoders()
    header = ("name", "modality", "embed_dim", "weights")
    table = [header] + [(str(r["name"]), str(r["modality"]), str(r["embed_dim"]), str(r["weights"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def run_status(cli) -> int:
    """Exit status of a LightningCLI run: 0 only when the trainer's loop finished.

    Lightning turns some failures (an interrupt, a callback's request to stop) into a trainer state
    rather than an exception; a run that did not finish must not exit 0.
    """
    trainer = getattr(cli, "trainer", None)
    if trainer is None:
        return 0  # --help, --print_config: nothing was run
    from lightning.pytorch.trainer.states import TrainerStatus

    return 0 if trainer.state.status == TrainerStatus.FINISHED else 1


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "zoo":
        return zoo(rest)
    if command == "grid":
        from experiments.grid.command import main as grid_main

        return grid_main(rest)
    if command == "report":
        from experiments.grid.report import main as report_main

        return report_main(rest)
    if command == "data":
        from experiments.data_check import main as data_main

        return data_main(rest)
    if command == "mine":
        from experiments.mine import main as mine_main

        return mine_main(rest)
    if command == "compositional":
        from experiments.compositional import main as compositional_main

        return compositional_main(rest)
    if command in LIGHTNING_SUBCOMMANDS:
        from experiments.callbacks.divergence_monitor import DivergenceError
        from experiments.lightning_cli import run_lightning_cli

        try:
            cli = run_lightning_cli(None if from_command_line else argv)
        except DivergenceError as err:  # the message names the step and the causes; a traceback adds nothing
            print(f"hardneg {command}: {err}", file=sys.stderr)
            return 1
        return run_status(cli)
    print(f"hardneg: unknown subcommand {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
