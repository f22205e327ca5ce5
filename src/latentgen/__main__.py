"""``python -m latentgen``: the same command line as ``latentgen``."""

from latentgen.cli import main

if __name__ == "__main__":
    main(prog_name="latentgen")
