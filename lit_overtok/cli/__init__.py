"""The command line: ``train.py fit | validate | test | generate | export | strip`` and the config-key checks."""
