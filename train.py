"""Training entry point: the Lightning CLI over lit_overtok's LightningModule and data modules.

    python train.py fit                                   # the embedded default: a small OE-free model on cfg3f, CPU
    python train.py fit --config configs/cfg/cfg3f_small.yaml
    python train.py fit --print_config                    # the full resolved config
"""

from lit_overtok.cli.main import main

if __name__ == "__main__":
    main()
