"""infra/terraform: formatted, clean under checkov, and consistent with the code it deploys (entry points,
settings, the queue's retries, the Firestore index file, the metrics the code writes).

`terraform validate` needs the google provider, which this machine cannot download; these checks read
the configuration itself (python-hcl2), and evaluate with Terraform alone the one part that needs no
provider: the decoding of firestore-indexes.json.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from shared import metrics
from shared.settings import PROJECT_ROOT, Settings
from shared.tasks import LocalTaskQueue

TF_DIR = PROJECT_ROOT / "infra" / "terraform"
CHECKOV = PROJECT_ROOT / ".venv-checkov" / "bin" / "checkov"
MAIN = PROJECT_ROOT / "functions" / "main.py"
SETTINGS = PROJECT_ROOT / "shared" / "settings.py"
INDEXES = TF_DIR / "firestore-indexes.json"

# Google's own metrics the alerts and the dashboard may name besides the code's.
BUILTIN_METRICS = {
    "cloudtasks.googleapis.com/queue/depth",  # tasks waiting in the nightly queue
    "run.googleapis.com/container/instance_count",  # instances of each function's Cloud Run service
}
# Settings that must be set on Google Cloud: their defaults are the embedded stack's (a folder, SQLite,
# the local queue, log lines) or name nothing (no token for tasks).
CLOUD_REQUIRED = {
    "ARTIFACT_STORE", "DATABASE_URL", "TASK_QUEUE", "WORKER_URL", "TASKS_SERVICE_ACCOUNT", "TASKS_AUDIENCE",
    "METRICS", "METRICS_LOCATION",
}
# Set by Cloud Run itself; a function may not set them.
RESERVED = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
_OPTIONS = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
_SETTING = re.compile(r'reader\.\w+\(\s*"([A-Z][A-Z0-9_]*)"')
_LOCAL_REF = re.compile(r"\$\{local\.([a-z_]+)\}")
_METRIC_TYPE = re.compile(r'metric\.type\s*=\s*"([^"]+)"')


# -- tools ------------------------------------------------------------------------------------------------


def _require(path: str | None, what: str, install: str) -> str:
    """Returns the tool's path; skips the test without it, or fails it in CI, where it must be installed."""
    if path and Path(path).exists():
        return path
    message = f"{what} is not installed: {install}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _terraform_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "terraformrc"
    config.write_text("")
    # No CLI config warning, no version check call to the network, no prompts.
    return {**os.environ, "TF_CLI_CONFIG_FILE": str(config), "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}


@pytest.fixture
def terraform(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    yield _require(shutil.which("terraform"), "terraform", "install Terraform 1.5 or newer"), _terraform_env(tmp_path)


def test_terraform_is_formatted(terraform: tuple[str, dict[str, str]]) -> None:
    binary, env = terraform
    done = subprocess.run(
        [binary, "fmt", "-check", "-recursive", "-diff", str(TF_DIR)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, f"run `terraform fmt -recursive infra/terraform`:\n{done.stdout}{done.stderr}"


def test_checkov_finds_no_failed_check() -> None:
    checkov = _require(str(CHECKOV), "checkov", "make checkov (a venv of its own: infra/requirements-checkov.txt)")
    done = subprocess.run(
        [checkov, "--skip-download", "--quiet", "--compact", "--framework", "terraform", "-d", str(TF_DIR)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert re.search(r"Failed checks: 0\b", done.stdout), done.stdout[-3000:]
    # A check may be skipped only inline, beside the resource, with its reason.
    for path in sorted(TF_DIR.glob("*.tf")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "checkov:skip" in line:
                assert re.search(r"#checkov:skip=CKV2?_[A-Z0-9_]+:\S.{20,}", line), f"{path.name}:{number} skips without a reason"


# -- the configuration, parsed ------------------------------------------------------------------------------


def _parse(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        return hcl2.load(handle, serialization_options=_OPTIONS)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """Every .tf file merged: {"resource": {type: {name: body}}, "locals": {...}, "variable": {...}, ...}."""
    merged: dict[str, Any] = {"resource": {}, "locals": {}, "variable": {}, "output": {}, "data": {}}
    for path in sorted(TF_DIR.glob("*.tf")):
        parsed = _parse(path)
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                for name, body in named.items():
                    assert name not in merged["resource"].setdefault(kind, {}), f"{kind}.{name} declared twice"
                    merged["resource"][kind][name] = body
        for block in parsed.get("locals", []):
            for name, value in block.items():
                assert name not in merged["locals"], f"local.{name} declared twice"
                merged["locals"][name] = value
        for key in ("variable", "output"):
            for block in parsed.get(key, []):
                merged[key].update(block)
    return merged


def _resource(config: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    assert name in config["resource"].get(kind, {}), f"no resource {kind}.{name}"
    return config["resource"][kind][name]


def _block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """Returns the one nested block `name` (python-hcl2 gives blocks as lists)."""
    blocks = body[name]
    assert isinstance(blocks, list) and len(blocks) == 1, f"expected one {name} block"
    return blocks[0]


def _resolve(text: str, locals_: dict[str, Any]) -> str:
    """Replaces ${local.NAME} by the local's text where that local is a plain string, repeatedly."""
    for _ in range(10):
        replaced = _LOCAL_REF.sub(lambda m: locals_[m.group(1)] if isinstance(locals_.get(m.group(1)), str) else m.group(0), text)
        if replaced == text:
            return text
        text = replaced
    return text


def _endpoints() -> dict[str, bool]:
    """Returns {target: is a task target} for every @endpoint function of functions/main.py."""
    found = {}
    for node in ast.parse(MAIN.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "endpoint":
                task = any(k.arg == "task" and isinstance(k.value, ast.Constant) and k.value.value is True for k in decorator.keywords)
                found[node.name] = task
    return found


def _settings_read() -> set[str]:
    return set(_SETTING.findall(SETTINGS.read_text()))


# -- functions and their settings ----------------------------------------------------------------------------


def test_every_entry_point_is_deployed_once_from_the_bundle(config: dict[str, Any]) -> None:
    endpoints = _endpoints()
    functions = config["locals"]["functions"]
    assert len(endpoints) == 11
    assert set(functions) == set(endpoints), "one function per @endpoint of functions/main.py, and no other"
    assert set(config["resource"]["google_cloudfunctions2_function"]) == {"function"}, "declared once, with for_each"
    function = _resource(config, "google_cloudfunctions2_function", "function")
    assert function["for_each"] == "${local.functions}"
    build = _block(function, "build_config")
    assert build["entry_point"] == "${each.key}"
    source = _block(_block(build, "source"), "storage_source")
    assert source["object"] == "${google_storage_bucket_object.bundle.name}"
    bundle = _resource(config, "google_storage_bucket_object", "bundle")
    assert bundle["source"] == "${local.bundle_path}"
    assert "build/bundle.zip" in config["locals"]["bundle_path"]
    assert "local.bundle_sha256" in bundle["name"], "the object is named by the bundle's hash"


def test_task_targets_check_their_callers_and_others_are_public(config: dict[str, Any]) -> None:
    functions, prefix = config["locals"]["functions"], "${local.function_url_prefix}"
    for target, task in _endpoints().items():
        spec = functions[target]
        assert spec["public"] is (not task), target
        if task:
            env = spec["env"]
            assert env["TASKS_AUTH"] == "oidc", target
            assert env["TASKS_AUTH_AUDIENCE"] == prefix + target.replace("_", "-"), f"{target} must expect tokens for its own URL"
            assert env["TASKS_AUTH_ALLOWED_EMAILS"].startswith("${google_service_account."), target
    assert functions["batch_worker"]["env"]["TASKS_AUTH_ALLOWED_EMAILS"] == "${google_service_account.tasks.email}"
    assert config["locals"]["function_url_prefix"] == "https://${var.region}-${var.project_id}.cloudfunctions.net/${var.name_prefix}-"


def test_environment_variables_are_settings_the_code_reads(config: dict[str, Any]) -> None:
    read = _settings_read()
    assert {"ARTIFACT_STORE", "DATABASE_URL", "TASKS_AUTH_ALLOWED_EMAILS"} <= read, "the settings regex found the settings"
    common = config["locals"]["common_env"]
    per_function = {name for spec in config["locals"]["functions"].values() for name in spec["env"]}
    assert not (set(common) | per_function) - read, "every variable set must be a setting the code reads"
    assert not (set(common) | per_function) & RESERVED
    assert CLOUD_REQUIRED <= set(common), sorted(CLOUD_REQUIRED - set(common))
    function = _resource(config, "google_cloudfunctions2_function", "function")
    assert _block(function, "service_config")["environment_variables"] == "${merge(local.common_env, each.value.env)}"

    locals_ = config["locals"]
    assert _resolve(common["ARTIFACT_STORE"], locals_).startswith("gs://${google_storage_bucket.models.name}/")
    assert common["DATABASE_URL"] == "firestore://${var.project_id}/(default)"
    assert common["TASK_QUEUE"] == "cloudtasks://${google_cloud_tasks_queue.batch.id}"
    assert common["METRICS"] == "monitoring://${var.project_id}"
    assert common["WORKER_URL"] == common["TASKS_AUDIENCE"] == "${local.function_url_prefix}batch-worker"
    assert common["TASKS_SERVICE_ACCOUNT"] == "${google_service_account.tasks.email}"
    # Drift reports go where the runtime may write them: under ARTIFACT_STORE's prefix.
    assert locals_["drift_report_prefix"] == "${var.artifact_prefix}/drift-reports/"
    assert locals_["artifact_store"] == "gs://${google_storage_bucket.models.name}/${var.artifact_prefix}"


def test_the_queue_retries_as_the_code_does(config: dict[str, Any]) -> None:
    defaults = Settings.from_env({})
    retry = config["locals"]["task_retry"]
    assert retry["max_attempts"] == defaults.task_max_attempts
    assert retry["min_backoff_seconds"] == defaults.task_min_backoff_seconds
    assert retry["max_backoff_seconds"] == inspect.signature(LocalTaskQueue).parameters["max_backoff_seconds"].default
    # Doubling all the way to the cap, as the code's min(max, min * 2^(n-1)): never a linear phase.
    doublings = retry["max_doublings"]
    assert retry["min_backoff_seconds"] * 2 ** (doublings - 1) < retry["max_backoff_seconds"] <= retry["min_backoff_seconds"] * 2**doublings

    queue = _resource(config, "google_cloud_tasks_queue", "batch")
    retry_config = _block(queue, "retry_config")
    assert retry_config["max_attempts"] == "${local.task_retry.max_attempts}"
    assert retry_config["min_backoff"] == "${local.task_retry.min_backoff_seconds}s"
    assert retry_config["max_backoff"] == "${local.task_retry.max_backoff_seconds}s"
    assert retry_config["max_doublings"] == "${local.task_retry.max_doublings}"
    assert config["locals"]["common_env"]["TASK_MAX_ATTEMPTS"] == "${tostring(local.task_retry.max_attempts)}"
    rates = _block(queue, "rate_limits")
    assert rates["max_dispatches_per_second"] == "${var.tasks_max_dispatches_per_second}"
    assert 0 < config["variable"]["tasks_max_dispatches_per_second"]["default"] <= 500
    assert config["variable"]["tasks_max_concurrent_dispatches"]["default"] == config["variable"]["batch_worker_max_instances"]["default"]


def test_scheduler_jobs_post_to_their_function_with_a_token_for_its_url(config: dict[str, Any]) -> None:
    scheduled = config["locals"]["scheduled"]
    assert set(scheduled) == {"nightly", "drift_check", "canary_check"}
    job = _resource(config, "google_cloud_scheduler_job", "job")
    assert job["for_each"] == "${local.scheduled}"
    target = _block(job, "http_target")
    assert (target["http_method"], target["body"]) == ("POST", '${base64encode("{}")}')
    token = _block(target, "oidc_token")
    assert target["uri"] == token["audience"] == "${local.function_urls[each.key]}"
    assert token["service_account_email"] == "${google_service_account.scheduler.email}"
    assert "retry_config" in job


def test_no_function_is_public_and_each_caller_invokes_only_its_functions(config: dict[str, Any]) -> None:
    # No member anywhere is everyone (a comment may still say so).
    members = re.findall(r"\b(?:member|members)\s*=\s*(.+)", "\n".join(p.read_text() for p in sorted(TF_DIR.glob("*.tf"))))
    assert members and not [m for m in members if "allUsers" in m or "allAuthenticatedUsers" in m]
    assert not re.search(r'"all(?:Authenticated)?Users"', json.dumps(config))
    invoker = _resource(config, "google_cloud_run_v2_service_iam_member", "invoker")
    assert (invoker["role"], invoker["for_each"]) == ("roles/run.invoker", "${local.invokers}")
    invokers = config["locals"]["invokers"]
    # The web platform: every public function (the comprehension filters on spec.public).
    assert 'for target, spec in local.functions : "web/${target}"' in invokers and "if spec.public" in invokers
    named = set(re.findall(r'"(scheduler|tasks)/(\w+)" = \{target = "(\w+)"', invokers))
    assert named == {
        ("scheduler", "nightly", "nightly"), ("scheduler", "drift_check", "drift_check"),
        ("scheduler", "canary_check", "canary_check"), ("tasks", "batch_worker", "batch_worker"),
    }


# -- Firestore ----------------------------------------------------------------------------------------------------


def test_terraform_declares_every_index_of_the_indexes_file(config: dict[str, Any]) -> None:
    locals_ = config["locals"]
    assert locals_["firestore_indexes_file"] == '${jsondecode(file("${path.module}/firestore-indexes.json"))}'
    assert "local.firestore_indexes_file.composite_indexes" in locals_["firestore_composite_indexes"]
    assert "local.firestore_indexes_file.single_field_exemptions" in locals_["firestore_field_exemptions"]
    index = _resource(config, "google_firestore_index", "composite")
    assert index["for_each"] == "${local.firestore_composite_indexes}"
    field = _resource(config, "google_firestore_field", "exemption")
    assert field["for_each"] == "${local.firestore_field_exemptions}"
    assert field["index_config"] == [{}], "an empty index_config turns the field's indexes off"
    assert "ttl_config" not in field, "the code sets no expiry field"
    database = _resource(config, "google_firestore_database", "default")
    assert (database["name"], database["type"]) == ("(default)", "FIRESTORE_NATIVE")


def _evaluate_index_locals(terraform: tuple[str, dict[str, str]], indexes: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Evaluates firestore_indexes.tf with Terraform alone over this index file; returns its two maps."""
    folder.mkdir()
    shutil.copy(TF_DIR / "firestore_indexes.tf", folder / "firestore_indexes.tf")
    (folder / "firestore-indexes.json").write_text(json.dumps(indexes))
    binary, env = terraform
    done = subprocess.run(
        [binary, "console"],
        input="jsonencode({composite = local.firestore_composite_indexes, fields = local.firestore_field_exemptions})\n",
        capture_output=True, text=True, cwd=folder, env=env, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(json.loads(done.stdout.strip()))


def test_the_index_file_decodes_to_one_resource_per_entry(terraform: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    real = json.loads(INDEXES.read_text())
    decoded = _evaluate_index_locals(terraform, real, tmp_path / "real")
    assert len(decoded["composite"]) == len(real["composite_indexes"])
    assert set(decoded["fields"]) == {f"{e['collection']}.{e['field']}" for e in real["single_field_exemptions"]}

    # The list is empty today; one index added to the file must become one resource with its fields in order.
    grown = {
        **real,
        "composite_indexes": [
            {"collection": "skill_assessments", "query_scope": "COLLECTION",
             "fields": [{"field_path": "student_id", "order": "ASCENDING"}, {"field_path": "assessed_at", "order": "DESCENDING"}]},
            {"collection": "drift_checks",
             "fields": [{"field_path": "skills", "array_config": "CONTAINS"}, {"field_path": "sort_key", "order": "DESCENDING"}]},
        ],
    }
    decoded = _evaluate_index_locals(terraform, grown, tmp_path / "grown")
    assert sorted(decoded["composite"]) == [
        "drift_checks/COLLECTION/skills:CONTAINS,sort_key:DESCENDING",
        "skill_assessments/COLLECTION/student_id:ASCENDING,assessed_at:DESCENDING",
    ]
    assessments = decoded["composite"]["skill_assessments/COLLECTION/student_id:ASCENDING,assessed_at:DESCENDING"]
    assert assessments["collection"] == "skill_assessments"
    assert [(f["field_path"], f["order"], f["array_config"]) for f in assessments["fields"]] == [
        ("student_id", "ASCENDING", None), ("assessed_at", "DESCENDING", None),
    ]
    contains = decoded["composite"]["drift_checks/COLLECTION/skills:CONTAINS,sort_key:DESCENDING"]
    assert contains["query_scope"] == "COLLECTION" and contains["fields"][0]["array_config"] == "CONTAINS"


# -- metrics ----------------------------------------------------------------------------------------------------


def _metrics_the_code_writes() -> set[str]:
    constants = {v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and v.startswith(metrics.METRIC_PREFIX) and v != metrics.METRIC_PREFIX}
    gauges = set()
    for path in (PROJECT_ROOT / "shared").rglob("*.py"):
        gauges |= {metrics.METRIC_PREFIX + name for name in re.findall(r'\.gauge\(\s*"([a-z][a-z0-9_/]*)"', path.read_text())}
    return constants | gauges


def _alert_filters(config: dict[str, Any]) -> dict[str, list[str]]:
    """Returns {policy name: every filter of its conditions, with locals resolved}."""
    found = {}
    for name, policy in config["resource"]["google_monitoring_alert_policy"].items():
        filters = []
        for condition in policy["conditions"]:
            for kind in ("condition_threshold", "condition_absent"):
                for block in condition.get(kind, []):
                    filters += [_resolve(block[k], config["locals"]) for k in ("filter", "denominator_filter") if k in block]
        found[name] = filters
    return found


def _dashboard_filters() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filter" and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads((TF_DIR / "dashboard.json").read_text())))


def test_alerts_and_dashboard_name_only_metrics_the_code_writes(config: dict[str, Any]) -> None:
    written = _metrics_the_code_writes()
    assert {metrics.REQUEST_LATENCY, metrics.BATCH_STUDENTS, metrics.METRIC_PREFIX + "drift_psi_prediction"} <= written
    allowed = written | BUILTIN_METRICS

    alerts = _alert_filters(config)
    alert_metrics = {name: {m for f in filters for m in _METRIC_TYPE.findall(f)} for name, filters in alerts.items()}
    for name, named in alert_metrics.items():
        assert named, f"alert policy {name} names no metric type the check can read"
        assert named <= allowed, f"alert policy {name} names {sorted(named - allowed)}, which nothing writes"
    everything = set().union(*alert_metrics.values())
    for expected in ("request_latency", "request_count", "drift_psi_prediction", "drift_psi_feature_max", "drift_teacher_pearson"):
        assert metrics.METRIC_PREFIX + expected in everything, f"no alert on {expected}"
    assert "cloudtasks.googleapis.com/queue/depth" in everything

    dashboard = {m for f in _dashboard_filters() for m in _METRIC_TYPE.findall(f)}
    assert dashboard <= allowed, sorted(dashboard - allowed)
    assert written <= dashboard, f"the dashboard shows no chart of {sorted(written - dashboard)}"
    dashboard_resource = _resource(config, "google_monitoring_dashboard", "service")
    assert 'file("${path.module}/dashboard.json")' in dashboard_resource["dashboard_json"]


def test_latency_alert_takes_the_p95_across_processes(config: dict[str, Any]) -> None:
    policy = _resource(config, "google_monitoring_alert_policy", "infer_latency")
    threshold = _block(policy["conditions"][0], "condition_threshold")
    assert 'metric.labels.function = "infer"' in threshold["filter"]
    aggregation = _block(threshold, "aggregations")
    assert (aggregation["per_series_aligner"], aggregation["cross_series_reducer"]) == ("ALIGN_DELTA", "REDUCE_PERCENTILE_95")
    assert aggregation["group_by_fields"] == [], "reduced across task_id (and skills)"


# -- inputs and outputs --------------------------------------------------------------------------------------------


def test_every_variable_is_described_typed_and_in_the_example(config: dict[str, Any]) -> None:
    variables = config["variable"]
    for name, spec in variables.items():
        assert spec.get("description"), f"variable {name} has no description"
        assert spec.get("type"), f"variable {name} has no type"
    example = _parse(TF_DIR / "terraform.tfvars.example")
    assert set(example) == set(variables), f"missing: {sorted(set(variables) - set(example))}, unknown: {sorted(set(example) - set(variables))}"
    for name, spec in variables.items():
        if "default" in spec:
            assert example[name] == spec["default"], f"the example shows {name} = {example[name]!r}, the default is {spec['default']!r}"


def test_outputs_name_what_an_operator_needs(config: dict[str, Any]) -> None:
    assert {"function_urls", "models_bucket", "source_bucket", "queue_id", "service_accounts"} <= set(config["output"])
    for name, spec in config["output"].items():
        assert spec.get("description"), f"output {name} has no description"
