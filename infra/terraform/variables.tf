# Every input of the deployment. terraform.tfvars.example lists each one with its default.

# -- where ----------------------------------------------------------------------------------------------

variable "project_id" {
  description = "Google Cloud project to deploy into (its id, not its number)."
  type        = string
  validation {
    # The code's own check of TASK_QUEUE and METRICS accepts only this shape (shared/settings.py).
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be 6 to 30 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "region" {
  description = "Region of the functions, the queue, the scheduler jobs and the buckets."
  type        = string
  default     = "us-central1"
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a Google Cloud region such as us-central1 or europe-west1."
  }
}

variable "firestore_location" {
  description = "Location of the Firestore database: a region (e.g. us-central1) or a multi-region (nam5, eur3). Empty means the same region as the functions."
  type        = string
  default     = ""
  validation {
    condition     = var.firestore_location == "" || can(regex("^[a-z0-9-]+$", var.firestore_location))
    error_message = "firestore_location must be a Firestore location id such as us-central1 or nam5."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (functions are named PREFIX-TARGET, e.g. skills-batch-worker)."
  type        = string
  default     = "skills"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,14}$", var.name_prefix))
    error_message = "name_prefix must be 2 to 15 lowercase letters, digits or hyphens, starting with a letter (service account ids are at most 30 characters)."
  }
}

variable "labels" {
  description = "Extra labels on every resource that takes labels."
  type        = map(string)
  default     = {}
}

# -- what is deployed -----------------------------------------------------------------------------------

variable "bundle_path" {
  description = "The source bundle built by scripts/build_bundle.py. Empty means build/bundle.zip of this repository."
  type        = string
  default     = ""
}

variable "python_runtime" {
  description = "Cloud Run functions runtime; the bundle's pins were installed and tested on Python 3.11."
  type        = string
  default     = "python311"
  validation {
    condition     = can(regex("^python3[0-9]+$", var.python_runtime))
    error_message = "python_runtime must be a Python runtime id such as python311."
  }
}

variable "artifact_prefix" {
  description = "Folder of the models bucket that ARTIFACT_STORE points at; drift reports go to its drift-reports/ subfolder."
  type        = string
  default     = "models"
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]*$", var.artifact_prefix))
    error_message = "artifact_prefix must be one folder name (lowercase letters, digits, '-' or '_')."
  }
}

variable "log_level" {
  description = "LOG_LEVEL of every function."
  type        = string
  default     = "INFO"
  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

# -- storage --------------------------------------------------------------------------------------------

variable "noncurrent_version_retention_days" {
  description = "Days a replaced or deleted object of the models and source buckets is kept before it is deleted for good."
  type        = number
  default     = 30
  validation {
    condition     = var.noncurrent_version_retention_days >= 1 && floor(var.noncurrent_version_retention_days) == var.noncurrent_version_retention_days
    error_message = "noncurrent_version_retention_days must be a whole number of days, at least 1."
  }
}

variable "drift_report_retention_days" {
  description = "Days a drift report (drift-reports/<check_id>.html) is kept; 0 keeps them forever."
  type        = number
  default     = 365
  validation {
    condition     = var.drift_report_retention_days >= 0 && floor(var.drift_report_retention_days) == var.drift_report_retention_days
    error_message = "drift_report_retention_days must be a whole number of days (0 keeps reports forever)."
  }
}

# -- who calls ------------------------------------------------------------------------------------------

variable "web_service_account_email" {
  description = "Service account of the web platform: it may invoke the public-facing functions (infer, infer_batch, list_models, list_skills, batch_run_status, drift_checks, healthz), nothing else."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9-]+@[a-z0-9.-]+\\.iam\\.gserviceaccount\\.com$", var.web_service_account_email))
    error_message = "web_service_account_email must be a service account email (NAME@PROJECT.iam.gserviceaccount.com)."
  }
}

variable "public_functions_ingress" {
  description = "Ingress of the public-facing functions. ALLOW_ALL still requires an ID token of an account with run.invoker; ALLOW_INTERNAL_AND_GCLB when the web platform reaches them through a load balancer or from the same VPC."
  type        = string
  default     = "ALLOW_ALL"
  validation {
    condition     = contains(["ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"], var.public_functions_ingress)
    error_message = "public_functions_ingress must be ALLOW_ALL, ALLOW_INTERNAL_ONLY or ALLOW_INTERNAL_AND_GCLB."
  }
}

variable "task_functions_ingress" {
  description = "Ingress of the functions only Cloud Scheduler and Cloud Tasks call (nightly, batch_worker, drift_check, canary_check). Cloud Run counts Scheduler and Tasks of the same project as internal; set ALLOW_ALL to call them from a workstation."
  type        = string
  default     = "ALLOW_INTERNAL_ONLY"
  validation {
    condition     = contains(["ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"], var.task_functions_ingress)
    error_message = "task_functions_ingress must be ALLOW_ALL, ALLOW_INTERNAL_ONLY or ALLOW_INTERNAL_AND_GCLB."
  }
}

# -- scale ----------------------------------------------------------------------------------------------

variable "infer_min_instances" {
  description = "Instances of the single-inference function kept warm (a cold one pays the cold start measured in the README)."
  type        = number
  default     = 1
  validation {
    condition     = var.infer_min_instances >= 0 && var.infer_min_instances <= 100
    error_message = "infer_min_instances must be between 0 and 100."
  }
}

variable "infer_max_instances" {
  description = "Most instances of the single-inference function (one request at a time each)."
  type        = number
  default     = 50
  validation {
    condition     = var.infer_max_instances >= 1 && var.infer_max_instances <= 1000
    error_message = "infer_max_instances must be between 1 and 1000."
  }
}

variable "batch_worker_max_instances" {
  description = "Most instances of the chunk worker: the capacity plan's compute figure assumes 100 (1 vCPU each, one chunk at a time)."
  type        = number
  default     = 100
  validation {
    condition     = var.batch_worker_max_instances >= 1 && var.batch_worker_max_instances <= 1000
    error_message = "batch_worker_max_instances must be between 1 and 1000."
  }
}

variable "tasks_max_dispatches_per_second" {
  description = "Cloud Tasks dispatch rate of the nightly queue, in chunks per second (see tasks.tf for why the default is low)."
  type        = number
  default     = 0.16
  validation {
    condition     = var.tasks_max_dispatches_per_second > 0 && var.tasks_max_dispatches_per_second <= 500
    error_message = "tasks_max_dispatches_per_second must be above 0 and at most 500 (Cloud Tasks' maximum)."
  }
}

variable "tasks_max_concurrent_dispatches" {
  description = "Chunks in flight at once; more than the worker's max instances would only wait for an instance."
  type        = number
  default     = 100
  validation {
    condition     = var.tasks_max_concurrent_dispatches >= 1 && var.tasks_max_concurrent_dispatches <= 5000
    error_message = "tasks_max_concurrent_dispatches must be between 1 and 5000 (Cloud Tasks' maximum)."
  }
}

# -- schedules ------------------------------------------------------------------------------------------

variable "scheduler_time_zone" {
  description = "Time zone of the schedules (a tz database name)."
  type        = string
  default     = "Etc/UTC"
}

variable "nightly_schedule" {
  description = "Cron schedule of the nightly batch (POST {} to the nightly function)."
  type        = string
  default     = "0 2 * * *"
  validation {
    condition     = length(split(" ", trimspace(var.nightly_schedule))) == 5
    error_message = "nightly_schedule must be a five-field cron expression."
  }
}

variable "drift_check_schedule" {
  description = "Cron schedule of the drift check (after the nightly run has written its serving profiles)."
  type        = string
  default     = "0 5 * * *"
  validation {
    condition     = length(split(" ", trimspace(var.drift_check_schedule))) == 5
    error_message = "drift_check_schedule must be a five-field cron expression."
  }
}

variable "canary_check_schedule" {
  description = "Cron schedule of the canary check (hourly by default: a bad canary is aborted within the hour)."
  type        = string
  default     = "15 * * * *"
  validation {
    condition     = length(split(" ", trimspace(var.canary_check_schedule))) == 5
    error_message = "canary_check_schedule must be a five-field cron expression."
  }
}

# -- alerts ---------------------------------------------------------------------------------------------

variable "alert_email" {
  description = "Email address the alert policies notify."
  type        = string
  validation {
    condition     = can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.alert_email))
    error_message = "alert_email must be an email address."
  }
}

variable "infer_p95_latency_ms" {
  description = "Alert when the single-inference function's p95 handler latency (request_latency, all skills) stays above this many milliseconds for 5 minutes; warm requests take about 1 ms."
  type        = number
  default     = 50
  validation {
    condition     = var.infer_p95_latency_ms > 0
    error_message = "infer_p95_latency_ms must be positive."
  }
}

variable "error_ratio_threshold" {
  description = "Alert when the share of 5xx answers of the public-facing functions stays above this for 5 minutes."
  type        = number
  default     = 0.02
  validation {
    condition     = var.error_ratio_threshold > 0 && var.error_ratio_threshold < 1
    error_message = "error_ratio_threshold must be between 0 and 1."
  }
}

variable "batch_worker_failures_threshold" {
  description = "Alert when the chunk worker answers more than this many 5xx (each one a retried or failed chunk) within 15 minutes."
  type        = number
  default     = 10
  validation {
    condition     = var.batch_worker_failures_threshold >= 0
    error_message = "batch_worker_failures_threshold must not be negative."
  }
}

variable "queue_backlog_minutes" {
  description = "Alert when the nightly queue has not been empty for this many minutes (a backlog that does not drain)."
  type        = number
  default     = 120
  validation {
    condition     = var.queue_backlog_minutes >= 5 && var.queue_backlog_minutes <= 1380
    error_message = "queue_backlog_minutes must be between 5 and 1380."
  }
}

variable "drift_psi_alert" {
  description = "PSI from which a drift check alerts (DRIFT_PSI_ALERT of the drift function, and the alert policy's threshold)."
  type        = number
  default     = 0.2
  validation {
    condition     = var.drift_psi_alert > 0
    error_message = "drift_psi_alert must be positive."
  }
}

variable "drift_min_teacher_r" {
  description = "Pearson r with teacher ratings below which a drift check alerts (DRIFT_MIN_TEACHER_R, and the alert policy's threshold)."
  type        = number
  default     = 0.5
  validation {
    condition     = var.drift_min_teacher_r >= -1 && var.drift_min_teacher_r <= 1
    error_message = "drift_min_teacher_r must be between -1 and 1."
  }
}

variable "nightly_missing_hours" {
  description = "Alert when no nightly run has been dispatched for this many hours (25 to 47)."
  type        = number
  default     = 26
  validation {
    # Built as a 24 h window held for (hours - 24) h: see monitoring.tf.
    condition     = var.nightly_missing_hours >= 25 && var.nightly_missing_hours <= 47 && floor(var.nightly_missing_hours) == var.nightly_missing_hours
    error_message = "nightly_missing_hours must be a whole number of hours from 25 to 47."
  }
}
