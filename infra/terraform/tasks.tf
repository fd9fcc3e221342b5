# The Cloud Tasks queue of the nightly batch: one task per chunk, delivered to the batch_worker function.

locals {
  # The code's retry contract, which the queue must repeat (shared/settings.py, shared/tasks.py):
  # TASK_MAX_ATTEMPTS = 3 deliveries in all (the worker records a chunk's students as failed on the last
  # one, which it recognises from X-CloudTasks-TaskRetryCount), the first retry TASK_MIN_BACKOFF_SECONDS
  # = 1 s after a failure, each later wait doubled, never more than 60 s (LocalTaskQueue's
  # max_backoff_seconds).
  task_retry = {
    # How long one delivery may take (TASK_DISPATCH_DEADLINE_SECONDS, set on every task) and the
    # batch_worker function's request timeout: the same, so the queue and Cloud Run cut an attempt together.
    dispatch_deadline_seconds = 300
    max_attempts              = 3
    min_backoff_seconds       = 1
    max_backoff_seconds       = 60
    # 1 s doubled 6 times is 64 s, past the 60 s cap: pure doubling up to the cap, no linear phase,
    # which is the code's min(60, 1 * 2^(n-1)).
    max_doublings = 6
  }
}

resource "google_cloud_tasks_queue" "batch" {
  name     = "${var.name_prefix}-batch"
  location = var.region

  # From the README's capacity plan. Compute is not the limit (100 one-vCPU workers score about
  # 13,200 students per second); Firestore's write ramp is. With today's write shape a chunk of 200
  # students costs about 3,000 writes, and Firestore's 500/50/5 guidance starts a cold collection at
  # 500 writes per second: 500 / 3,000 = 0.16 chunks per second, about 32 students per second (28,800
  # in 15 minutes; the plan's 47,484 assume the rate grows with the ramp). Raise it step by step (+50 %
  # every 5 minutes) for bigger nights, or with the per-student write shape, where the same writes carry
  # 7.5 times more students; 500 per second is Cloud Tasks' maximum.
  rate_limits {
    max_dispatches_per_second = var.tasks_max_dispatches_per_second
    # One chunk per worker instance at a time (concurrency 1): more in flight than the worker's max
    # instances would only wait for an instance.
    max_concurrent_dispatches = var.tasks_max_concurrent_dispatches
  }

  retry_config {
    max_attempts  = local.task_retry.max_attempts
    min_backoff   = "${local.task_retry.min_backoff_seconds}s"
    max_backoff   = "${local.task_retry.max_backoff_seconds}s"
    max_doublings = local.task_retry.max_doublings
    # No time limit: as in the code, the number of attempts alone ends a task's retries.
    max_retry_duration = "0s"
  }

  # One log entry per attempt: a few thousand a night, and the trail of every failed chunk.
  stackdriver_logging_config {
    sampling_ratio = 1.0
  }

  depends_on = [google_project_service.enabled]
}
