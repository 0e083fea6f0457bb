"""Prometheus metric names shared by the services, the feedback loop and the Grafana dashboard.

Conventions: `edgefleet_` prefix, base units (seconds, bytes, ratios), `_total`
counters, no per-job labels. The `celery_*` names follow danihodovic/celery-exporter
(labels `name` = `<plugin>.<action>`, `hostname` = `<class>@<node>`, `queue_name`)
so that dashboards made for it work.
"""

# --- router -----------------------------------------------------------------------------
JOBS_SUBMITTED = "edgefleet_jobs_submitted_total"  # {priority}
JOBS_FINISHED = "edgefleet_jobs_finished_total"  # {priority, state}: finishes this router counted (each by one router)
JOBS_BY_STATE = "edgefleet_jobs"  # {state}: jobs per state, from the Redis indexes (survives restarts)
JOB_SECONDS = "edgefleet_job_duration_seconds"  # {priority}: created -> finished
SUBMIT_SECONDS = "edgefleet_submit_duration_seconds"  # POST /v1/jobs handling time
BACKLOG_DEPTH = "edgefleet_backlog_depth"  # {resource_class, priority_class}: sum by resource_class for the old view
QUEUED_DEPTH = "edgefleet_queued_depth"  # {resource_class}: released, not yet claimed
BROKER_QUEUE_DEPTH = "edgefleet_broker_queue_depth"  # {queue_name}: messages waiting in the Celery queue
RUNNING_SUBTASKS = "edgefleet_running_subtasks"
LIVE_NODES = "edgefleet_live_nodes"
RELEASED = "edgefleet_subtasks_released_total"
REQUEUED = "edgefleet_subtasks_requeued_total"
CALLBACKS = "edgefleet_callbacks_total"
ARTIFACT_DOWNLOADS = "edgefleet_artifact_downloads_total"  # {by}: node or client; GET /v1/artifacts/{id}
ARTIFACT_UPLOADS = "edgefleet_artifact_uploads_total"  # {by}: node or client; stored uploads
ARTIFACT_BYTES_SENT = "edgefleet_artifact_sent_bytes_total"

# --- feedback loop ----------------------------------------------------------------------
TARGET_DEPTH = "edgefleet_scheduler_target_depth"  # {resource_class}: what the feedback loop decided
SCHEDULER_WEIGHT = "edgefleet_scheduler_weight"  # {name}
FEEDBACK_SOURCE = "edgefleet_feedback_source"  # {source}: 1 for the source of the last round
FEEDBACK_ROUNDS = "edgefleet_feedback_rounds_total"  # {source}
FEEDBACK_CHANGES = "edgefleet_feedback_changes_total"  # {kind}
FEEDBACK_SLOTS = "edgefleet_feedback_slots"  # {resource_class}
FEEDBACK_INTERACTIVE_P95 = "edgefleet_feedback_interactive_p95_seconds"

# --- workers ----------------------------------------------------------------------------
SUBTASKS_RUN = "edgefleet_worker_subtasks_total"  # {plugin, resource_class, outcome}
SUBTASK_SECONDS = "edgefleet_worker_subtask_seconds"  # {plugin, resource_class}
QUEUE_WAIT_SECONDS = "edgefleet_worker_queue_wait_seconds"  # {plugin, resource_class}
SUBTASK_FAILURES = "edgefleet_worker_subtask_failures_total"  # {plugin, resource_class, reason}
IN_FLIGHT = "edgefleet_worker_subtasks_in_flight"  # {resource_class}
RETRIES = "edgefleet_worker_retries_total"  # {plugin, resource_class}: attempts after the first
REDELIVERIES = "edgefleet_worker_redeliveries_total"  # {reason}: deliveries not run
SANDBOX_STARTS = "edgefleet_worker_sandbox_starts_total"  # {plugin, start}: warm (pre-started) or cold
SUBTASKS_CHAINED = "edgefleet_worker_subtasks_chained_total"  # {resource_class}: taken by a slot, not delivered
NODE_SLOTS = "edgefleet_node_slots"  # {node, resource_class}
NODE_CPU = "edgefleet_node_cpu_usage_ratio"  # {node}
NODE_CORES = "edgefleet_node_cpu_cores"  # {node}
NODE_MEMORY_TOTAL = "edgefleet_node_memory_total_bytes"  # {node}
NODE_MEMORY_AVAILABLE = "edgefleet_node_memory_available_bytes"  # {node}
NODE_LOAD = "edgefleet_node_load_average"  # {node, period}
NODE_GPU_UTIL = "edgefleet_node_gpu_utilization_ratio"  # {node, gpu}
NODE_GPU_MEMORY_USED = "edgefleet_node_gpu_memory_used_bytes"  # {node, gpu}
NODE_GPU_MEMORY_TOTAL = "edgefleet_node_gpu_memory_total_bytes"  # {node, gpu}

# --- Celery-exporter compatible ---------------------------------------------------------
CELERY_TASK_RECEIVED = "celery_task_received_total"
CELERY_TASK_STARTED = "celery_task_started_total"
CELERY_TASK_SUCCEEDED = "celery_task_succeeded_total"
CELERY_TASK_FAILED = "celery_task_failed_total"
CELERY_TASK_RUNTIME = "celery_task_runtime"
CELERY_QUEUE_LENGTH = "celery_queue_length"  # {queue_name}
CELERY_WORKER_UP = "celery_worker_up"  # {hostname}

# kombu's Redis priority lists with sep ':' and priority_steps 0..9: `q`, `q:1` .. `q:9`.
PRIORITY_LIST_SUFFIXES = ("", *tuple(f":{i}" for i in range(1, 10)))
