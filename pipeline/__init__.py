"""Sentinel-2 land-cover map production chain (Stoian et al. 2019, operational variant).

Every stage is a plain function over arrays plus a thin I/O shell; `pipeline.cli` exposes one
subcommand per stage so any Snakemake rule can be rerun by hand.
"""

__version__ = "0.1.0"
