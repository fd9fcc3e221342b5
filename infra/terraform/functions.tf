# One Cloud Run function (2nd gen) per entry point of functions/main.py, all built from the one bundle.

locals {
  # Deterministic URLs of gen2 functions: https://REGION-PROJECT.cloudfunctions.net/NAME. They are
  # computed here rather than read from the resources because the functions need them before they exist:
  # the nightly dispatcher addresses its tasks to the worker's URL (WORKER_URL, TASKS_AUDIENCE), and
  # every task function checks that its callers' tokens are for its own URL (TASKS_AUTH_AUDIENCE),
  # which a resource cannot read from itself. The Scheduler jobs use the same strings, and a
  # postcondition below fails the apply if Google ever assigns a function another URL.
  # (The run.app URI of service_config is not computable before the service exists.)
  function_url_prefix = "https://${var.region}-${var.project_id}.cloudfunctions.net/${var.name_prefix}-"
  function_urls       = { for target in keys(local.functions) : target => "${local.function_url_prefix}${replace(target, "_", "-")}" }

  # The settings every function reads (README, Settings), the same for all: one deployment, one
  # configuration, so that no function falls back to an embedded default on the cloud.
  common_env = {
    ARTIFACT_STORE        = local.artifact_store
    DATABASE_URL          = "firestore://${var.project_id}/(default)"
    TASK_QUEUE            = "cloudtasks://${google_cloud_tasks_queue.batch.id}"
    WORKER_URL            = "${local.function_url_prefix}batch-worker"
    TASKS_AUDIENCE        = "${local.function_url_prefix}batch-worker"
    TASKS_SERVICE_ACCOUNT = google_service_account.tasks.email
    # The worker's last-attempt logic must agree with the queue's retry_config (tasks.tf).
    TASK_MAX_ATTEMPTS              = tostring(local.task_retry.max_attempts)
    TASK_DISPATCH_DEADLINE_SECONDS = tostring(local.task_retry.dispatch_deadline_seconds)
    METRICS                        = "monitoring://${var.project_id}"
    METRICS_LOCATION               = var.region
    LOG_LEVEL                      = var.log_level
  }

  # Sizing, from what was measured on the unpacked bundle (tests/test_bundle.py, Python 3.11, x86_64):
  # a serving process with all seven models loaded holds 97 MB resident (the whole instance, gunicorn's
  # master and its worker: 148 MB RSS, 108 MB PSS); once it has imported XGBoost (an explanation, or a
  # batch chunk) 125-131 MB (instance 181 MB RSS, 120 MB PSS); the drift check with matplotlib 137 MB
  # (instance 187 MB RSS). /tmp is held in memory on Cloud Run, and the artifact cache adds about 1 MB per
  # skill version. So 512 MiB (the minimum of Cloud Run's second-generation execution environment)
  # leaves room everywhere; the batch endpoint gets 1 GiB for 32 MB request bodies parsed whole, the
  # drift check for a week of profiles and its charts. Scoring is CPU-bound and single-threaded
  # (ONNX_THREADS and BATCH_THREADS are 1), so the CPU-bound targets take one request per vCPU
  # (concurrency 1), as the local server runs one sync worker per core; targets that mostly wait on
  # Firestore or answer from memory take a few at once.
  functions = {
    infer = {
      memory = "512Mi", cpu = "1", timeout = 30, concurrency = 1
      min    = var.infer_min_instances, max = var.infer_max_instances
      public = true, env = {}
    }
    infer_batch = {
      memory = "1Gi", cpu = "1", timeout = 120, concurrency = 1, min = 0, max = 10
      public = true, env = {}
    }
    list_skills = {
      memory = "512Mi", cpu = "1", timeout = 30, concurrency = 8, min = 0, max = 5
      public = true, env = {}
    }
    list_models = {
      memory = "512Mi", cpu = "1", timeout = 60, concurrency = 4, min = 0, max = 5
      public = true, env = {}
    }
    healthz = {
      memory = "512Mi", cpu = "1", timeout = 60, concurrency = 4, min = 0, max = 5
      public = true, env = {}
    }
    batch_run_status = {
      memory = "512Mi", cpu = "1", timeout = 60, concurrency = 4, min = 0, max = 5
      public = true, env = {}
    }
    drift_checks = {
      memory = "512Mi", cpu = "1", timeout = 60, concurrency = 4, min = 0, max = 5
      public = true, env = {}
    }
    # Task targets: a Google-signed ID token of their one caller, for their own URL, is checked twice:
    # by Cloud Run's IAM (run.invoker, iam.tf) and by the code (TASKS_AUTH=oidc).
    nightly = {
      # One dispatcher at a time; it streams the students and enqueues up to thousands of tasks.
      memory = "512Mi", cpu = "1", timeout = 1800, concurrency = 1, min = 0, max = 1
      public = false
      env = {
        TASKS_AUTH                = "oidc"
        TASKS_AUTH_AUDIENCE       = "${local.function_url_prefix}nightly"
        TASKS_AUTH_ALLOWED_EMAILS = google_service_account.scheduler.email
      }
    }
    batch_worker = {
      # A chunk of 200 takes about 1.5 s of one vCPU; the capacity plan counts on 100 such instances.
      memory = "512Mi", cpu = "1", timeout = local.task_retry.dispatch_deadline_seconds, concurrency = 1, min = 0, max = var.batch_worker_max_instances
      public = false
      env = {
        TASKS_AUTH                = "oidc"
        TASKS_AUTH_AUDIENCE       = "${local.function_url_prefix}batch-worker"
        TASKS_AUTH_ALLOWED_EMAILS = google_service_account.tasks.email
      }
    }
    drift_check = {
      memory = "1Gi", cpu = "1", timeout = 900, concurrency = 1, min = 0, max = 1
      public = false
      env = {
        TASKS_AUTH                = "oidc"
        TASKS_AUTH_AUDIENCE       = "${local.function_url_prefix}drift-check"
        TASKS_AUTH_ALLOWED_EMAILS = google_service_account.scheduler.email
        # The alert policies in monitoring.tf use the same thresholds.
        DRIFT_PSI_ALERT     = tostring(var.drift_psi_alert)
        DRIFT_MIN_TEACHER_R = tostring(var.drift_min_teacher_r)
      }
    }
    canary_check = {
      # Reads metrics back from Cloud Monitoring and the serving profiles; aborts a canary that trips a guardrail.
      memory = "512Mi", cpu = "1", timeout = 300, concurrency = 1, min = 0, max = 1
      public = false
      env = {
        TASKS_AUTH                = "oidc"
        TASKS_AUTH_AUDIENCE       = "${local.function_url_prefix}canary-check"
        TASKS_AUTH_ALLOWED_EMAILS = google_service_account.scheduler.email
      }
    }
  }
}

resource "google_cloudfunctions2_function" "function" {
  #checkov:skip=CKV_GCP_124:Ingress is a variable per group: the task targets default to internal-only; the public-facing ones must be reachable by the web platform, wherever it runs, and still require an ID token with run.invoker (no allUsers anywhere).
  for_each = local.functions

  name        = "${var.name_prefix}-${replace(each.key, "_", "-")}"
  location    = var.region
  description = "Skill inference service: the ${each.key} target of functions/main.py."

  build_config {
    runtime = var.python_runtime
    # The target's name in main.py; every function is built from the same bundle object.
    entry_point     = each.key
    service_account = google_service_account.build.id
    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.bundle.name
      }
    }
  }

  service_config {
    available_memory                 = each.value.memory
    available_cpu                    = each.value.cpu
    timeout_seconds                  = each.value.timeout
    max_instance_request_concurrency = each.value.concurrency
    min_instance_count               = each.value.min
    max_instance_count               = each.value.max
    ingress_settings                 = each.value.public ? var.public_functions_ingress : var.task_functions_ingress
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.runtime.email
    environment_variables            = merge(local.common_env, each.value.env)
  }

  lifecycle {
    postcondition {
      condition     = self.url == local.function_urls[each.key]
      error_message = "The function's URL is not the one its callers and its own audience were configured with (local.function_urls); update function_url_prefix."
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.build,
    google_storage_bucket_iam_member.build_source_reader,
  ]
}
