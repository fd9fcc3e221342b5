# Cloud Scheduler: the nightly batch, the drift check and the canary check, each a POST with an OIDC token of the
# scheduler account for the function's own URL (its TASKS_AUTH_AUDIENCE).

locals {
  scheduled = {
    nightly = {
      schedule    = var.nightly_schedule
      description = "Nightly re-score: picks the students with new data and enqueues one task per chunk."
      # The dispatcher answers once every task is enqueued (about 10 s per 5,000 tasks); the deadline
      # is Scheduler's maximum, and the function's own timeout.
      deadline = "1800s"
    }
    drift_check = {
      schedule    = var.drift_check_schedule
      description = "Daily drift check of every serving model version; stores the check and its HTML report."
      deadline    = "900s"
    }
    canary_check = {
      schedule    = var.canary_check_schedule
      description = "Compares each running canary with production; aborts one that trips a guardrail."
      deadline    = "300s"
    }
  }
}

resource "google_cloud_scheduler_job" "job" {
  for_each = local.scheduled

  name             = "${var.name_prefix}-${replace(each.key, "_", "-")}"
  region           = var.region
  description      = each.value.description
  schedule         = each.value.schedule
  time_zone        = var.scheduler_time_zone
  attempt_deadline = each.value.deadline

  # A retried firing is safe: the nightly run id is nightly-YYYYMMDD and task names derive from it, so a
  # second firing enqueues nothing new; a second drift check is just another check.
  retry_config {
    retry_count          = 3
    min_backoff_duration = "60s"
    max_backoff_duration = "600s"
    max_doublings        = 3
  }

  http_target {
    http_method = "POST"
    uri         = local.function_urls[each.key]
    body        = base64encode("{}")
    headers = {
      "Content-Type" = "application/json"
    }
    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = local.function_urls[each.key]
    }
  }

  depends_on = [google_project_service.enabled, google_cloud_run_v2_service_iam_member.invoker]
}
