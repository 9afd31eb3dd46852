"""Checkpoints made on the spot, for tests, benchmarks and smoke runs (nothing is downloaded): tiny or
real-size random Florence-2 models (``tiny``), and Microsoft-layout twins of them (``original_twin``)."""
