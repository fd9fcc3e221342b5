# Who is who: the functions' runtime identity, the build identity, the two invokers (Scheduler, Tasks),
# and the web platform. Each gets only the roles it uses, on the narrowest resource that takes them.

resource "google_service_account" "runtime" {
  account_id   = "${var.name_prefix}-runtime"
  display_name = "Skill inference functions (runtime)"
  description  = "Identity every function runs as: reads models, writes drift reports, Firestore, enqueues chunks, writes metrics and logs."
}

resource "google_service_account" "build" {
  account_id   = "${var.name_prefix}-build"
  display_name = "Skill inference functions (build)"
  description  = "Identity Cloud Build runs as when it builds the functions from the source bundle."
}

resource "google_service_account" "scheduler" {
  account_id   = "${var.name_prefix}-scheduler"
  display_name = "Skill inference scheduler (invoker)"
  description  = "Identity of the Cloud Scheduler jobs' OIDC tokens: invokes the nightly, drift_check and canary_check functions only."
}

resource "google_service_account" "tasks" {
  account_id   = "${var.name_prefix}-tasks"
  display_name = "Skill inference tasks (invoker)"
  description  = "Identity of the nightly chunk tasks' OIDC tokens (TASKS_SERVICE_ACCOUNT): invokes the batch_worker function only."
}

# -- the runtime ----------------------------------------------------------------------------------------

# Project-wide only where the service has no narrower resource: Firestore access is granted per
# project (roles/datastore.user covers the one database), and metrics and logs are written to the project.
resource "google_project_iam_member" "runtime" {
  for_each = toset(["roles/datastore.user", "roles/monitoring.metricWriter", "roles/logging.logWriter"])
  project  = var.project_id
  role     = each.value
  member   = google_service_account.runtime.member
}

# Reads every artifact (and reads back a report whose upload was retried).
resource "google_storage_bucket_iam_member" "runtime_models_reader" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.runtime.member
}

# Creates drift reports, and nothing else: objectCreator on the bucket, limited by an IAM condition
# to object names under <artifact_prefix>/drift-reports/ (conditions need uniform bucket-level access,
# which the bucket has). Artifacts are published by an operator with skillctl, never by a function.
resource "google_storage_bucket_iam_member" "runtime_reports_writer" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectCreator"
  member = google_service_account.runtime.member
  condition {
    title       = "drift-reports-only"
    description = "Only objects under ${local.drift_report_prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.models.name}/objects/${local.drift_report_prefix}\")"
  }
}

# The nightly dispatcher enqueues one task per chunk, on this queue only.
resource "google_cloud_tasks_queue_iam_member" "runtime_enqueuer" {
  project  = var.project_id
  location = google_cloud_tasks_queue.batch.location
  name     = google_cloud_tasks_queue.batch.name
  role     = "roles/cloudtasks.enqueuer"
  member   = google_service_account.runtime.member
}

# A task that carries an OIDC token of the tasks account may only be created by someone allowed to act
# as that account: the runtime, on that one account.
resource "google_service_account_iam_member" "runtime_acts_as_tasks" {
  service_account_id = google_service_account.tasks.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.runtime.member
}

# -- the build ------------------------------------------------------------------------------------------

# What a Cloud Run functions build needs of its service account: write build logs, read the source
# Cloud Functions stages in its own gcf-v2-sources bucket, push the image to Artifact Registry. That is
# the Cloud Run Builder role, which Google documents for a build service account, on the project
# (roles/cloudbuild.builds.builder would do too, but also lets builds act as other service accounts).
resource "google_project_iam_member" "build" {
  for_each = toset(["roles/run.builder"])
  project  = var.project_id
  role     = each.value
  member   = google_service_account.build.member
}

resource "google_storage_bucket_iam_member" "build_source_reader" {
  bucket = google_storage_bucket.source.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member
}

# -- who may invoke what --------------------------------------------------------------------------------

locals {
  # run.invoker on the Cloud Run service under each function, one binding per (caller, function):
  # the web platform calls the public-facing functions, Scheduler the two scheduled ones, Tasks the worker.
  invokers = merge(
    {
      for target, spec in local.functions : "web/${target}" => {
        target = target
        member = "serviceAccount:${var.web_service_account_email}"
      } if spec.public
    },
    {
      "scheduler/nightly"      = { target = "nightly", member = google_service_account.scheduler.member }
      "scheduler/drift_check"  = { target = "drift_check", member = google_service_account.scheduler.member }
      "scheduler/canary_check" = { target = "canary_check", member = google_service_account.scheduler.member }
      "tasks/batch_worker"     = { target = "batch_worker", member = google_service_account.tasks.member }
    },
  )
}

resource "google_cloud_run_v2_service_iam_member" "invoker" {
  for_each = local.invokers
  project  = var.project_id
  location = var.region
  # A gen2 function's Cloud Run service bears the function's name.
  name   = google_cloudfunctions2_function.function[each.value.target].name
  role   = "roles/run.invoker"
  member = each.value.member
}
