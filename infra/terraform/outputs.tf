# What an operator needs after `terraform apply`: where to call, where things are, who is who.

output "function_urls" {
  description = "URL of each function, by target (the same strings the Scheduler jobs, the tasks and the functions' audiences use)."
  value       = { for target, function in google_cloudfunctions2_function.function : target => function.url }
}

output "function_run_uris" {
  description = "run.app URI of the Cloud Run service under each function."
  value       = { for target, function in google_cloudfunctions2_function.function : target => function.service_config[0].uri }
}

output "models_bucket" {
  description = "Bucket of the model artifacts and the drift reports."
  value       = google_storage_bucket.models.name
}

output "source_bucket" {
  description = "Bucket of the source bundle."
  value       = google_storage_bucket.source.name
}

output "bundle_object" {
  description = "The uploaded bundle every function was built from (its name carries the bundle's sha256)."
  value       = "gs://${google_storage_bucket.source.name}/${google_storage_bucket_object.bundle.name}"
}

output "artifact_store" {
  description = "ARTIFACT_STORE of the functions, for the operator CLI (skillctl publish)."
  value       = local.artifact_store
}

output "drift_reports" {
  description = "Where the drift checks write their HTML reports."
  value       = "gs://${google_storage_bucket.models.name}/${local.drift_report_prefix}"
}

output "database_url" {
  description = "DATABASE_URL of the functions, for the operator CLI."
  value       = local.common_env.DATABASE_URL
}

output "queue_id" {
  description = "The nightly Cloud Tasks queue (projects/P/locations/L/queues/Q)."
  value       = google_cloud_tasks_queue.batch.id
}

output "scheduler_jobs" {
  description = "Cloud Scheduler job names, by target (gcloud scheduler jobs run NAME --location REGION)."
  value       = { for target, job in google_cloud_scheduler_job.job : target => job.name }
}

output "service_accounts" {
  description = "Email of each service account this configuration made."
  value = {
    runtime   = google_service_account.runtime.email
    build     = google_service_account.build.email
    scheduler = google_service_account.scheduler.email
    tasks     = google_service_account.tasks.email
  }
}

output "dashboard" {
  description = "The Cloud Monitoring dashboard's id."
  value       = google_monitoring_dashboard.service.id
}
