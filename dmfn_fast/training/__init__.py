"""Training DMFN, in the pieces train.py reads top to bottom:

- build: models, optimizers, schedulers, grad scaler, VGG, criterion and data from the parsed flags;
- step: one G+D update and the discriminator's inputs;
- checkpoint: the checkpoint format, atomic saving, and resuming a run from a checkpoint;
- rundir: the output folder (its lock, refusing or moving aside another run's files);
- report: validation, sample grids, the JSONL log and the loss curve;
- config: train.py's flags, the --config file, the presets and every check.

Nothing is imported here: `import train` and the benchmarks take only the pieces they use."""
