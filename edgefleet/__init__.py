"""edgefleet: turn home-lab and edge boxes into one task cluster for local-AI work."""

__version__ = "0.1.0"
