"""The edgefleet router service: the HTTP API, the planner and the background loops (release,
reaper, retention, webhooks, feedback) that drive the job store and the release scheduler,
which live in the core (`edgefleet/`). It never imports `workers`; `edgefleet.cli` starts it."""
