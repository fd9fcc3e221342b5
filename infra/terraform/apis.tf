# Every Google API the service and its deployment call, enabled once for the project.

locals {
  apis = toset([
    "artifactregistry.googleapis.com",     # the images Cloud Build makes of the functions
    "cloudbuild.googleapis.com",           # builds each function from the bundle
    "cloudfunctions.googleapis.com",       # the functions (2nd gen)
    "cloudresourcemanager.googleapis.com", # project IAM bindings made by this configuration
    "cloudscheduler.googleapis.com",       # the nightly batch and the drift check
    "cloudtasks.googleapis.com",           # one task per nightly chunk
    "firestore.googleapis.com",            # registry, features, assessments, runs, profiles, ratings, checks
    "iam.googleapis.com",                  # the service accounts
    "logging.googleapis.com",              # the functions' JSON log lines
    "monitoring.googleapis.com",           # custom metrics, alert policies, the dashboard
    "run.googleapis.com",                  # the Cloud Run services under the functions
    "storage.googleapis.com",              # model artifacts, drift reports, the source bundle
  ])
  # Not enabled: eventarc.googleapis.com (every function has an HTTP trigger, none an event trigger) and
  # pubsub.googleapis.com (Scheduler calls the functions over HTTP with an OIDC token, not through a topic).
}

resource "google_project_service" "enabled" {
  for_each = local.apis
  project  = var.project_id
  service  = each.value
  # Turning an API off on destroy would break anything else in the project that uses it.
  disable_on_destroy         = false
  disable_dependent_services = false
}
