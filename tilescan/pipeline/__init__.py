"""The run: units and shards, the model engine, the per-unit pipeline and the run's report.
"""
