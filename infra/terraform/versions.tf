# The skill inference service on Google Cloud: one `terraform apply` provisions every piece of it.
# Build the bundle first (`make bundle`): storage.tf uploads build/bundle.zip and every function is built from it.

terraform {
  # Postconditions need 1.2; 1.5 adds the import blocks the README suggests for an existing database.
  required_version = ">= 1.5.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x and 7.x carry every argument used here (build_config.service_account, the function's `url`,
      # alert policy severity, google_cloud_run_v2_service_iam_member). Commit .terraform.lock.hcl after
      # the first `terraform init` so every operator runs the same provider build.
      version = ">= 6.0, < 8.0"
    }
  }

  # No resource here needs google-beta, so it is not declared: every resource is GA.

  # Keep the state in Cloud Storage, not on one laptop (create the bucket once, by hand, with versioning):
  # backend "gcs" {
  #   bucket = "PROJECT-terraform-state"
  #   prefix = "skills"
  # }
}

provider "google" {
  project = var.project_id
  region  = var.region
  # Every resource carries these labels (where the resource takes labels).
  default_labels = merge({ service = var.name_prefix, managed-by = "terraform" }, var.labels)
}
