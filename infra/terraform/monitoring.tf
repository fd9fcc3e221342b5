# Alert policies and the dashboard, over the metrics the code writes (shared/metrics.py: CUMULATIVE
# series per process on a generic_task resource, so conditions align with ALIGN_DELTA or ALIGN_RATE and
# then reduce across task_id) and two of Google's own (the queue's depth, the functions' instances).

locals {
  metric_prefix = "custom.googleapis.com/skills/"
  # Every custom series is written on the process's generic_task resource.
  custom = "resource.type = \"generic_task\" AND metric.type = \"${local.metric_prefix}"
  # The functions the web platform calls: the error ratio is theirs (the worker's 503s are retries,
  # alerted on separately).
  public_targets = join(", ", [for target, spec in local.functions : "\"${target}\"" if spec.public])
  notify         = [google_monitoring_notification_channel.email.name]
}

resource "google_monitoring_notification_channel" "email" {
  display_name = "Skill inference on-call (${var.alert_email})"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }
  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "infer_latency" {
  display_name          = "Skills: single inference p95 latency above ${var.infer_p95_latency_ms} ms"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = local.notify

  conditions {
    display_name = "p95 of request_latency (function infer, all skills) > ${var.infer_p95_latency_ms} ms for 5 min"
    condition_threshold {
      filter = "${local.custom}request_latency\" AND metric.labels.function = \"infer\""
      # The delta of each process's distribution over 5 minutes, merged across processes (task_id)
      # and skills, then its 95th percentile.
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_PERCENTILE_95"
        group_by_fields      = []
      }
      comparison              = "COMPARISON_GT"
      threshold_value         = var.infer_p95_latency_ms
      duration                = "300s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Warm single inferences take about 1 ms of handler time. A high p95 means instances loading models (a new version, cold starts: raise infer_min_instances), or CPU starvation. The dashboard shows latency per skill."
  }
}

resource "google_monitoring_alert_policy" "error_ratio" {
  display_name          = "Skills: 5xx ratio of the public functions above ${var.error_ratio_threshold * 100} %"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = local.notify

  conditions {
    display_name = "5xx / all answers (${local.public_targets}) > ${var.error_ratio_threshold} for 5 min"
    condition_threshold {
      filter = "${local.custom}request_count\" AND metric.labels.function = one_of(${local.public_targets}) AND metric.labels.status = starts_with(\"5\")"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = []
      }
      denominator_filter = "${local.custom}request_count\" AND metric.labels.function = one_of(${local.public_targets})"
      denominator_aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = []
      }
      comparison              = "COMPARISON_GT"
      threshold_value         = var.error_ratio_threshold
      duration                = "300s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The error_count chart of the dashboard names the error codes: store_unavailable (Firestore, Cloud Storage), model_unavailable (no loadable version: /healthz lists the problems), internal (logged with its traceback)."
  }
}

resource "google_monitoring_alert_policy" "batch_worker_failures" {
  display_name          = "Skills: nightly chunks failing"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = local.notify

  conditions {
    display_name = "batch_worker 5xx answers > ${var.batch_worker_failures_threshold} in 15 min"
    condition_threshold {
      filter = "${local.custom}request_count\" AND metric.labels.function = \"batch_worker\" AND metric.labels.status = starts_with(\"5\")"
      aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = []
      }
      comparison              = "COMPARISON_GT"
      threshold_value         = var.batch_worker_failures_threshold
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Each 503 makes Cloud Tasks retry the chunk (3 attempts in all); on the last one its students are recorded on the run as failed. `GET /api/v1/batch/runs/RUN_ID` shows the run; the worker's log lines give each chunk's reason."
  }
}

resource "google_monitoring_alert_policy" "queue_backlog" {
  display_name          = "Skills: nightly queue not draining"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = local.notify

  conditions {
    # Cloud Tasks publishes no age of the oldest task; a queue that has not once been empty for this
    # long is the same signal: its oldest task is at least that old.
    display_name = "tasks waiting in ${google_cloud_tasks_queue.batch.name} for ${var.queue_backlog_minutes} min without a pause"
    condition_threshold {
      filter = "resource.type = \"cloud_tasks_queue\" AND resource.labels.queue_id = \"${google_cloud_tasks_queue.batch.name}\" AND metric.type = \"cloudtasks.googleapis.com/queue/depth\""
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_MIN"
      }
      comparison              = "COMPARISON_GT"
      threshold_value         = 0
      duration                = "${var.queue_backlog_minutes * 60}s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The queue dispatches at most tasks_max_dispatches_per_second (tasks.tf explains the default). A backlog that does not drain means the worker is failing (see the chunk failures alert) or the rate is too low for the night's students."
  }
}

resource "google_monitoring_alert_policy" "drift_psi" {
  display_name          = "Skills: drift PSI above ${var.drift_psi_alert}"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = local.notify

  # Each drift check writes one point per skill and serving version; a point above the threshold opens
  # an incident for that skill, which closes once the next check's point is below it.
  conditions {
    display_name = "drift_psi_prediction > ${var.drift_psi_alert} on a skill"
    condition_threshold {
      filter = "${local.custom}drift_psi_prediction\""
      aggregations {
        alignment_period     = "3600s"
        per_series_aligner   = "ALIGN_MAX"
        cross_series_reducer = "REDUCE_MAX"
        group_by_fields      = ["metric.label.skill", "metric.label.model_version"]
      }
      comparison              = "COMPARISON_GT"
      threshold_value         = var.drift_psi_alert
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  conditions {
    display_name = "drift_psi_feature_max > ${var.drift_psi_alert} on a skill"
    condition_threshold {
      filter = "${local.custom}drift_psi_feature_max\""
      aggregations {
        alignment_period     = "3600s"
        per_series_aligner   = "ALIGN_MAX"
        cross_series_reducer = "REDUCE_MAX"
        group_by_fields      = ["metric.label.skill", "metric.label.model_version"]
      }
      comparison              = "COMPARISON_GT"
      threshold_value         = var.drift_psi_alert
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Read the check's report: `GET /api/v1/drift/checks/latest` gives its report_uri (gs://.../drift-reports/CHECK_ID.html), or `skillctl drift --url URL --open`. It shows which features moved and the scores against teacher ratings."
  }
}

resource "google_monitoring_alert_policy" "teacher_correlation" {
  display_name          = "Skills: scores no longer agree with teachers (r below ${var.drift_min_teacher_r})"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = local.notify

  conditions {
    display_name = "drift_teacher_pearson < ${var.drift_min_teacher_r} on a skill"
    condition_threshold {
      filter = "${local.custom}drift_teacher_pearson\""
      aggregations {
        alignment_period     = "3600s"
        per_series_aligner   = "ALIGN_MIN"
        cross_series_reducer = "REDUCE_MIN"
        group_by_fields      = ["metric.label.skill", "metric.label.model_version"]
      }
      comparison              = "COMPARISON_LT"
      threshold_value         = var.drift_min_teacher_r
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The model's scores correlate less with teachers' ratings than the threshold. Check the drift report; if a recent version is to blame, `skillctl rollback SKILL` returns to the previous production version."
  }
}

resource "google_monitoring_alert_policy" "nightly_missing" {
  display_name          = "Skills: no nightly run in ${var.nightly_missing_hours} h"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = local.notify

  conditions {
    display_name = "no 202 from the nightly function in ${var.nightly_missing_hours} h"
    # The signal: the dispatcher's 202, which it answers once the run is recorded and its chunks
    # enqueued (request_count{function=nightly,status=202}); batch_students would stay silent on a night
    # with nothing to re-score. A metric-absence condition cannot wait longer than about a day, so this
    # sums a 24 h window (the longest alignment an alert takes is 25 h) and requires that sum to stay
    # below 1 for the remaining hours: no dispatch in 24 h + (hours - 24) h.
    condition_threshold {
      filter = "${local.custom}request_count\" AND metric.labels.function = \"nightly\" AND metric.labels.status = \"202\""
      aggregations {
        alignment_period     = "86400s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = []
      }
      comparison      = "COMPARISON_LT"
      threshold_value = 1
      duration        = "${(var.nightly_missing_hours - 24) * 3600}s"
      # No series at all in the window is exactly the failure to catch.
      evaluation_missing_data = "EVALUATION_MISSING_DATA_ACTIVE"
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Cloud Scheduler did not start a nightly run, or the dispatcher failed (its log lines say why). Fire it by hand: `gcloud scheduler jobs run ${var.name_prefix}-nightly --location ${var.region}`. A fresh deployment has no run yet: firing it once after deploying starts the clock."
  }
}

resource "google_monitoring_dashboard" "service" {
  # dashboard.json is the dashboard as the Monitoring API stores it; only the queue and the name prefix
  # are filled in here.
  dashboard_json = replace(replace(file("${path.module}/dashboard.json"), "__QUEUE_ID__", google_cloud_tasks_queue.batch.name), "__NAME_PREFIX__", var.name_prefix)
  depends_on     = [google_project_service.enabled]
}
