# The Firestore database (native mode), its composite indexes and its single-field index exemptions,
# both read from firestore-indexes.json (decoded in firestore_indexes.tf).

resource "google_firestore_database" "default" {
  project = var.project_id
  # DATABASE_URL is firestore://PROJECT/(default): the database the code opens when none is named.
  name                              = "(default)"
  location_id                       = var.firestore_location != "" ? var.firestore_location : var.region
  type                              = "FIRESTORE_NATIVE"
  app_engine_integration_mode       = "DISABLED"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = "DELETE_PROTECTION_ENABLED"
  # terraform destroy forgets the database and keeps its data: the registry and every assessment.
  deletion_policy = "ABANDON"

  depends_on = [google_project_service.enabled]
}

resource "google_firestore_index" "composite" {
  for_each = local.firestore_composite_indexes

  project     = var.project_id
  database    = google_firestore_database.default.name
  collection  = each.value.collection
  query_scope = each.value.query_scope

  dynamic "fields" {
    for_each = each.value.fields
    content {
      field_path   = fields.value.field_path
      order        = fields.value.order
      array_config = fields.value.array_config
    }
  }
}

resource "google_firestore_field" "exemption" {
  for_each = local.firestore_field_exemptions

  project    = var.project_id
  database   = google_firestore_database.default.name
  collection = each.value.collection
  field      = each.value.field

  # An empty index_config turns off every automatic single-field index of the field (see the reasons in
  # firestore-indexes.json: large values that are read whole and never queried).
  index_config {}
}

# No TTL policy: the code sets no expiry field on any document. The one timestamp that looks like one,
# batch_runs.lease_expires_at, is a dispatcher's 60 s lease on a run being created (cleared once the run is
# ready): a TTL on it would delete runs. Assessments, runs and checks are kept until deleted on purpose.
