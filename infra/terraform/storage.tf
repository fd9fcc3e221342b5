# The models bucket (artifacts and drift reports), the source bucket, and the bundle uploaded once.

locals {
  bundle_path = var.bundle_path != "" ? var.bundle_path : "${path.module}/../../build/bundle.zip"
  # The zip's own hash names its object: a rebuilt bundle with other bytes is a new object, which
  # rebuilds every function; the same bytes (scripts/build_bundle.py is reproducible) change nothing.
  bundle_sha256 = filesha256(local.bundle_path)
  # ARTIFACT_STORE is gs://<models bucket>/<artifact_prefix>; the drift check writes its reports beside
  # the artifacts, at <artifact_prefix>/drift-reports/<check_id>.html (shared/drift.py REPORT_PREFIX).
  artifact_store      = "gs://${google_storage_bucket.models.name}/${var.artifact_prefix}"
  drift_report_prefix = "${var.artifact_prefix}/drift-reports/"
}

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:Access is recorded by Cloud Audit Logs (Data Access logs for storage); usage-log buckets are the legacy mechanism.
  name                        = "${var.project_id}-${var.name_prefix}-models"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # terraform destroy keeps the artifacts and reports: a bucket that still holds objects is not deleted.
  force_destroy = false

  # Published artifacts are never overwritten (uploads use if_generation_match=0), so versions only
  # protect against deletion; a deleted object stays recoverable for noncurrent_version_retention_days.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "lifecycle_rule" {
    for_each = var.drift_report_retention_days > 0 ? [var.drift_report_retention_days] : []
    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = [local.drift_report_prefix]
      }
      action {
        type = "Delete"
      }
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket" "source" {
  #checkov:skip=CKV_GCP_62:Access is recorded by Cloud Audit Logs (Data Access logs for storage); usage-log buckets are the legacy mechanism.
  name                        = "${var.project_id}-${var.name_prefix}-source"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

# The bundle, zipped once by scripts/build_bundle.py and uploaded once; every function builds from it.
resource "google_storage_bucket_object" "bundle" {
  name         = "bundles/bundle-${local.bundle_sha256}.zip"
  bucket       = google_storage_bucket.source.name
  source       = local.bundle_path
  content_type = "application/zip"

  lifecycle {
    # The functions switch to the new object before the old one goes.
    create_before_destroy = true
  }
}
