"""``python -m melter.farm COMMAND``: the farm's commands without the ``melter`` entry point."""

from melter.farm.cli import main

main()
