#!/usr/bin/env python
"""Train a sparse autoencoder on an activation store.

    python hub_scripts/train_sae.py --store runs/acts/blocks.14 --out-dir runs/sae/blocks.14 --k 24 --expansion 8

Writes OUT_DIR/sae/ (model.safetensors + config.json), metrics.json (validation FVU, explained variance, L0,
dead fraction, throughput), history.jsonl and curves.png. Killed? Run the same command again: it resumes from
OUT_DIR/checkpoint/.
"""

import argparse
import json

from nacosae.cli import add_dataclass_args, dataclass_from_args
from nacosae.train import TrainConfig, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    cfg = dataclass_from_args(TrainConfig, parser.parse_args(argv))
    _, metrics = train(cfg)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
