"""The router's HTTP routes, one APIRouter per area: jobs, fleet (and the scheduler), ops, webhooks."""
