"""``python -m gradflow.trainability``: the same command as ``python -m gradflow trainability``."""
from gradflow.cli.trainability import cli

if __name__ == "__main__":
    cli()
