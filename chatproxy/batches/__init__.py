"""Batches: their table (store), the Batch API itself (service) and its command line (cli)."""
