"""The edgefleet router service: HTTP API, planner, job store, release scheduler, feedback loop."""
