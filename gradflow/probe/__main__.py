"""``python -m gradflow.probe --model resnet1001``: the probe's command line (:mod:`gradflow.cli.probe`)."""
from gradflow.cli.probe import cli

if __name__ == "__main__":
    cli()
