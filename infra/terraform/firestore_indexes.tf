# firestore-indexes.json (owned by shared/gcp/firestore.py), decoded into the maps firestore.tf creates
# resources from. Locals only, on purpose: tests/test_terraform.py evaluates this file with Terraform
# alone (no provider), against a non-empty index list, since the file's list of composite indexes is
# empty today.

locals {
  firestore_indexes_file = jsondecode(file("${path.module}/firestore-indexes.json"))

  # Keyed by collection, scope and fields in order: stable when entries are reordered in the file, and
  # unique, since Firestore refuses two identical indexes anyway.
  firestore_composite_indexes = {
    for index in local.firestore_indexes_file.composite_indexes :
    "${index.collection}/${try(index.query_scope, "COLLECTION")}/${join(",", [for field in index.fields : "${field.field_path}:${try(field.order, field.array_config)}"])}" => {
      collection  = index.collection
      query_scope = try(index.query_scope, "COLLECTION")
      fields = [
        for field in index.fields : {
          field_path   = field.field_path
          order        = try(field.order, null)
          array_config = try(field.array_config, null)
        }
      ]
    }
  }

  # One single-field index exemption per (collection group, field).
  firestore_field_exemptions = {
    for exemption in local.firestore_indexes_file.single_field_exemptions :
    "${exemption.collection}.${exemption.field}" => {
      collection = exemption.collection
      field      = exemption.field
    }
  }
}
