"""The Celery app Flower runs with: `python -m celery -A edgefleet.flower_app --broker <redis> flower`.

Flower must use edgefleet's own broker transport options (priority steps, `sep`):
with Celery's defaults its remote-control replies land in Redis lists it never
reads, and /api/workers stays empty.
"""

from edgefleet.celery_app import create_celery
from edgefleet.settings import Settings

app = create_celery(Settings(), main="edgefleet-flower")
