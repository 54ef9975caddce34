"""Readers and writers: Sentinel-2 L2A products, tile zarr stores, COG maps, atomic outputs."""
