"""The edge worker runtime: Celery workers per resource class, plugin execution, node heartbeats."""
