"""Command-line utilities around kdjax runs (`python -m kdjax.tools.<name> --help`).

  import_torch  converts a PyTorch state_dict of the reference codebases' CIFAR models into a kdjax checkpoint.
  report        redraws results.csv, the mean ± std tables and the figures of finished (or running) workdirs, and
                compares several side by side.
"""
