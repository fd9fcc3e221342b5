"""Artifacts on Cloud Storage, against the real storage emulator: the store contract, the upload precondition,
two-step publishing, serving through the instance cache, and a corrupted or contested version."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from shared.artifacts import (
    ARTIFACT_FILES,
    METADATA_FILE,
    ONNX_FILE,
    ArtifactCache,
    ArtifactStore,
    CachedArtifactStore,
    LocalArtifactStore,
    open_artifact_store,
    publish_files,
    read_verified,
    sha256_hex,
    version_key,
)
from shared.catalog import SkillCatalog
from shared.engine import InferenceEngine, InferenceRequest
from shared.errors import ArtifactIntegrityError, ConfigError, Conflict, NotFound, StoreUnavailable
from shared.gcp.storage import GcsArtifactStore, storage_client
from shared.local_stack import ensure_demo_models, free_port
from shared.publishing import publish_version
from shared.registry import RESERVED, ModelRegistry, RegistryBackend, SqliteRegistryBackend, listing
from shared.services import Services
from shared.settings import Settings
from shared.skill_model import SkillModel
from shared.sqlite import open_database
from shared.synthetic import generate_cohort
from shared.training import TrainingConfig, train_catalog, write_trained
from shared.gcp.firestore import FirestoreRegistryBackend
from tests.emulators.firestore import firestore_database, firestore_emulator, firestore_session_database  # noqa: F401
from tests.emulators.storage import GcsLocation, StorageEmulator, gcs_location, storage_emulator  # noqa: F401

SKILL = "leadership"


# -- fixtures ------------------------------------------------------------------------------------

# Each registry backend the publishing race runs on; a backend is one more line here.
REGISTRY_BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], RegistryBackend]] = {
    "sqlite": lambda request, tmp_path: SqliteRegistryBackend(open_database(tmp_path / "db.sqlite3")),
    "firestore": lambda request, tmp_path: FirestoreRegistryBackend(request.getfixturevalue("firestore_database")),
}


@pytest.fixture(params=sorted(REGISTRY_BACKENDS))
def registry_backend(request: pytest.FixtureRequest, tmp_path: Path) -> RegistryBackend:
    return REGISTRY_BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def registry(registry_backend: RegistryBackend) -> ModelRegistry:
    return ModelRegistry(registry_backend)


@pytest.fixture
def gcs_store(gcs_location: GcsLocation, storage_emulator: StorageEmulator) -> GcsArtifactStore:
    return GcsArtifactStore(gcs_location.bucket, gcs_location.prefix, emulator_host=storage_emulator.url)


@pytest.fixture(scope="session")
def rival_folders(tmp_path_factory: pytest.TempPathFactory, catalog: SkillCatalog) -> tuple[Path, Path]:
    """The same skill trained twice, small and with different seeds, so every file of the two differs."""
    folders = []
    for seed in (101, 202):
        out = tmp_path_factory.mktemp(f"rival-{seed}")
        config = TrainingConfig(n_students=600, seed=seed, n_estimators=8, max_depth=3)
        folders.append(write_trained(train_catalog(catalog, config, [SKILL])[SKILL], out))
    first, second = folders
    assert all((first / n).read_bytes() != (second / n).read_bytes() for n in ARTIFACT_FILES)
    return first, second


@pytest.fixture
def gcs_env(env: dict[str, str], tmp_path: Path, gcs_location: GcsLocation, storage_emulator: StorageEmulator) -> dict[str, str]:
    """An embedded stack's environment with its artifacts on the emulator (its own database and cache)."""
    return {
        **env,
        "ARTIFACT_STORE": gcs_location.uri,
        "DATABASE_URL": str(tmp_path / "gcs.sqlite3"),
        "STORAGE_EMULATOR_HOST": storage_emulator.url,
        "ARTIFACT_CACHE_DIR": str(tmp_path / "artifact-cache"),
    }


@pytest.fixture
def gcs_services(gcs_env: dict[str, str]) -> Services:
    return Services(Settings.from_env(gcs_env))


def _engine(services: Services, store: ArtifactStore | None = None) -> InferenceEngine:
    """A fresh engine, as a new process (or one whose models were evicted) builds it."""
    return InferenceEngine(services.catalog, services.registry, store or services.artifacts, refresh_seconds=3600)


def _cache(services: Services) -> ArtifactCache:
    store = services.artifacts
    assert isinstance(store, CachedArtifactStore)
    return store.cache


def _downloads(emulator: StorageEmulator, mark: int) -> list[str]:
    return [r.url for r in emulator.since(mark) if r.is_download]


def _uploads(emulator: StorageEmulator, mark: int) -> list[str]:
    return [r.url for r in emulator.since(mark) if r.is_upload]


# -- the ArtifactStore contract, on every store -----------------------------------------------------


class StoreCase:
    """A store under test and URIs that lie outside it."""

    def __init__(self, store: ArtifactStore, outside: list[str]) -> None:
        self.store = store
        self.outside = outside


@pytest.fixture(params=["local", "gcs"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> StoreCase:
    if request.param == "local":
        local = LocalArtifactStore(tmp_path / "store")
        (tmp_path / "secret.txt").write_text("not an artifact")
        return StoreCase(
            local,
            [
                (tmp_path / "secret.txt").as_uri(),
                local.uri_for("") + "/../secret.txt",
                "https://example.invalid/model.onnx",
                "gs://skills-models/model.onnx",
            ],
        )
    location: GcsLocation = request.getfixturevalue("gcs_location")
    gcs = request.getfixturevalue("gcs_store")
    root = f"gs://{location.bucket}/{location.prefix}"
    # The other prefix exists, so refusing it is the store's doing, not a 404.
    GcsArtifactStore(location.bucket, location.prefix + "-other", emulator_host=gcs.emulator_host).put("x/model.onnx", b"x")
    return StoreCase(
        gcs,
        [
            f"gs://{location.bucket}/{location.prefix}-other/x/model.onnx",
            f"gs://other-bucket/{location.prefix}/x/model.onnx",
            f"{root}/../{location.prefix}-other/x/model.onnx",
            f"{root}/x/./model.onnx",
            f"{root}/",
            "https://example.invalid/model.onnx",
            (tmp_path / "model.onnx").as_uri(),
        ],
    )


def test_contract_put_get_round_trip(case: StoreCase) -> None:
    store = case.store
    uri = store.put("communication/1.0.0/model.onnx", b"\x00\x01bytes")
    assert uri == store.uri_for("communication/1.0.0/model.onnx")
    assert store.get(uri) == b"\x00\x01bytes"
    assert store.get(store.put("odd skill/1.0.0/scaler.json", b"{}")) == b"{}"


def test_contract_a_file_uri_is_its_folder_uri_plus_its_name(case: StoreCase) -> None:
    folder = case.store.uri_for(version_key("communication", "1.0.0"))
    assert folder.endswith("/communication/1.0.0/")
    assert folder + "model.onnx" == case.store.uri_for("communication/1.0.0/model.onnx")


def test_contract_a_missing_artifact_is_not_found(case: StoreCase) -> None:
    with pytest.raises(NotFound):
        case.store.get(case.store.uri_for("communication/9.9.9/model.onnx"))


def test_contract_uris_outside_the_store_are_refused(case: StoreCase) -> None:
    for uri in case.outside:
        with pytest.raises(ArtifactIntegrityError):
            case.store.get(uri)


@pytest.mark.parametrize("key", ["../escaped.bin", "a/../../escaped.bin"])
def test_contract_keys_outside_the_store_are_refused(case: StoreCase, key: str) -> None:
    with pytest.raises(ArtifactIntegrityError):
        case.store.put(key, b"x")


def test_contract_read_verified_checks_the_sha256(case: StoreCase) -> None:
    files = {name: f"content of {name}".encode() for name in ARTIFACT_FILES}
    uri, checksums = publish_files(case.store, "communication", "1.0.0", files)
    for name in ARTIFACT_FILES:
        assert read_verified(case.store, uri, checksums, name) == files[name]
    with pytest.raises(ArtifactIntegrityError, match=ONNX_FILE):
        read_verified(case.store, uri, {**checksums, ONNX_FILE: "0" * 64}, ONNX_FILE)


# -- the Cloud Storage store ---------------------------------------------------------------------


def test_every_upload_carries_the_generation_precondition(
    gcs_store: GcsArtifactStore, storage_emulator: StorageEmulator, registry: ModelRegistry, trained_dir: Path
) -> None:
    """On real Cloud Storage `ifGenerationMatch=0` makes an upload fail if the object exists; the
    emulator ignores it, so what is checked is that every upload request sends it."""
    mark = storage_emulator.mark()
    gcs_store.put("loose/model.onnx", b"x")
    record = publish_version(registry, gcs_store, trained_dir / SKILL)
    uploads = _uploads(storage_emulator, mark)
    assert len(uploads) == 1 + len(ARTIFACT_FILES), uploads
    for url in uploads:
        assert "ifGenerationMatch=0" in url.split("?", 1)[1].split("&"), url
    assert record.artifact_uri == gcs_store.uri_for(version_key(SKILL, record.version))
    assert record.artifact_uri.startswith("gs://")


def test_an_unreachable_store_is_unavailable(gcs_location: GcsLocation) -> None:
    # A real closed port: the client's retries end within the store's timeout.
    dead = GcsArtifactStore(gcs_location.bucket, gcs_location.prefix, emulator_host=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(StoreUnavailable, match="could not download"):
        dead.get(dead.uri_for("communication/1.0.0/model.onnx"))
    with pytest.raises(StoreUnavailable, match="could not upload"):
        dead.put("communication/1.0.0/model.onnx", b"x")


def test_a_missing_bucket_is_not_found(storage_emulator: StorageEmulator) -> None:
    store = GcsArtifactStore("no-such-bucket", "models", emulator_host=storage_emulator.url)
    with pytest.raises(NotFound, match="no-such-bucket"):
        store.put("communication/1.0.0/model.onnx", b"x")
    with pytest.raises(NotFound):
        store.get(store.uri_for("communication/1.0.0/model.onnx"))


def test_one_client_per_process_and_endpoint(storage_emulator: StorageEmulator) -> None:
    clients: list[object] = []
    threads = [threading.Thread(target=lambda: clients.append(storage_client(storage_emulator.url))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in clients}) == 1


def test_open_artifact_store_resolves_each_scheme(tmp_path: Path) -> None:
    cached = open_artifact_store("gs://skills-models/models/v1", tmp_path / "cache")
    assert isinstance(cached, CachedArtifactStore) and isinstance(cached.remote, GcsArtifactStore)
    assert (cached.remote.bucket, cached.remote.prefix) == ("skills-models", "models/v1")
    assert cached.cache.folder == tmp_path / "cache"
    assert cached.uri_for("communication/1.0.0/model.onnx") == "gs://skills-models/models/v1/communication/1.0.0/model.onnx"
    bare = open_artifact_store("gs://skills-models")
    assert isinstance(bare, GcsArtifactStore) and bare.uri_for("a/b") == "gs://skills-models/a/b"
    # The local store reads files in place: no cache in front of it.
    assert isinstance(open_artifact_store(str(tmp_path / "a"), tmp_path / "cache"), LocalArtifactStore)
    with pytest.raises(ConfigError, match="bucket"):
        open_artifact_store("gs:///models", tmp_path / "cache")
    with pytest.raises(ConfigError, match="gs://"):
        open_artifact_store("s3://bucket/models", tmp_path / "cache")


# -- two-step publishing -------------------------------------------------------------------------


def _reserve(registry: ModelRegistry, version: str) -> None:
    registry.reserve(
        SKILL, version, trained_at="t", metrics={}, artifact_uri=f"gs://b/p/{SKILL}/{version}/", sha256="0" * 64, checksums={}
    )


def test_a_reserved_version_is_listed_but_never_promoted_or_served(registry: ModelRegistry) -> None:
    _reserve(registry, "1.0.0")
    versions = listing(registry, [SKILL])[0]["versions"]
    assert [(v["version"], v["stage"]) for v in versions] == [("1.0.0", RESERVED)]
    for stage, traffic in (("production", None), ("staging", None)):
        with pytest.raises(Conflict, match="still being published"):
            registry.promote(SKILL, "1.0.0", stage, traffic)
    assert registry.serving() == {}
    assert registry.next_version(SKILL) == "1.1.0"  # the number is taken from the moment it is reserved


def test_a_reservation_archived_by_an_operator_cannot_complete(registry: ModelRegistry) -> None:
    """A publisher that died leaves its version reserved; archiving it is allowed, and a publisher that
    was only slow then learns its publish was abandoned."""
    _reserve(registry, "1.0.0")
    assert registry.promote(SKILL, "1.0.0", "archived").stage == "archived"
    with pytest.raises(Conflict, match="no longer reserved"):
        registry.complete(SKILL, "1.0.0")


def test_a_failed_upload_archives_the_reservation(
    registry: ModelRegistry, gcs_location: GcsLocation, gcs_store: GcsArtifactStore, trained_dir: Path
) -> None:
    dead = GcsArtifactStore(gcs_location.bucket, gcs_location.prefix, emulator_host=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(StoreUnavailable):
        publish_version(registry, dead, trained_dir / SKILL)
    assert [(v.version, v.stage) for v in registry.versions(SKILL)] == [("1.0.0", "archived")]
    # The number is spent: the next publish, on a store that works, takes the next one.
    assert publish_version(registry, gcs_store, trained_dir / SKILL).version == "1.1.0"


def test_concurrent_publishes_of_one_version_have_one_winner_whose_files_are_whole(
    registry: ModelRegistry, gcs_store: GcsArtifactStore, storage_emulator: StorageEmulator, rival_folders: tuple[Path, Path]
) -> None:
    barrier = threading.Barrier(len(rival_folders))
    outcomes: dict[Path, object] = {}

    def publish(folder: Path) -> None:
        barrier.wait()
        try:
            outcomes[folder] = publish_version(registry, gcs_store, folder, version="2.0.0")
        except Exception as exc:  # the test thread judges it
            outcomes[folder] = exc

    mark = storage_emulator.mark()
    threads = [threading.Thread(target=publish, args=(folder,)) for folder in rival_folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    winners = [folder for folder, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    losers = [folder for folder, outcome in outcomes.items() if isinstance(outcome, Conflict)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    # The loser was refused by the registry before it uploaded: the emulator saw the winner's uploads only.
    assert len(_uploads(storage_emulator, mark)) == len(ARTIFACT_FILES)

    record = registry.get(SKILL, "2.0.0")
    assert record.stage == "staging"
    for name in ARTIFACT_FILES:
        stored = gcs_store.get(record.artifact_uri + name)
        assert sha256_hex(stored) == record.checksums[name], name
        if name != METADATA_FILE:  # metadata.json is stamped with the version on the way
            assert stored == (winners[0] / name).read_bytes(), name


# -- serving from Cloud Storage ------------------------------------------------------------------


def _scores(engine: InferenceEngine, catalog: SkillCatalog, skill: str) -> list[float]:
    spec = catalog.skill(skill)
    cohort = generate_cohort(catalog, 20, seed=5, id_prefix=f"gcs-{skill}")
    X = cohort.matrix(spec)
    requests = [
        InferenceRequest(sid, skill, {name: float(X[i, j]) for j, name in enumerate(spec.feature_names)})
        for i, sid in enumerate(cohort.student_ids)
    ]
    return [r["score"] for r in engine.infer_many(requests)]  # type: ignore[index]


def test_models_published_to_cloud_storage_score_as_the_local_ones(
    services: Services, gcs_services: Services, trained_dir: Path, catalog: SkillCatalog
) -> None:
    ensure_demo_models(gcs_services, trained_dir)
    record = gcs_services.registry.get(SKILL, "1.0.0")
    assert record.artifact_uri.startswith("gs://")
    model = SkillModel.load(gcs_services.artifacts, record, catalog.skill(SKILL))
    assert model.version == "1.0.0"

    local, remote = _engine(services), _engine(gcs_services)
    assert remote.status() == ({skill: "1.0.0" for skill in catalog.names}, {})
    for skill in catalog.names:
        assert np.array_equal(_scores(remote, catalog, skill), _scores(local, catalog, skill)), skill


def test_a_warm_instance_never_downloads_an_artifact_twice(
    gcs_services: Services, gcs_env: dict[str, str], trained_dir: Path, storage_emulator: StorageEmulator, catalog: SkillCatalog
) -> None:
    ensure_demo_models(gcs_services, trained_dir)
    mark = storage_emulator.mark()
    first = _engine(gcs_services)
    first.refresh(force=True)
    assert len(_downloads(storage_emulator, mark)) == len(catalog.names) * len(ARTIFACT_FILES)
    cache = _cache(gcs_services)
    record = gcs_services.registry.get(SKILL, "1.0.0")
    assert {p.name for p in cache.folder.iterdir()} >= set(record.checksums.values())

    mark = storage_emulator.mark()
    again = _engine(gcs_services)  # the models evicted from memory: loaded again, from the cache
    assert again.status()[0] == first.status()[0]
    # Another process of the instance: its own store object and client state, the same cache folder.
    other_process = _engine(gcs_services, open_artifact_store(gcs_env["ARTIFACT_STORE"], cache.folder))
    assert other_process.status()[0] == first.status()[0]
    assert _downloads(storage_emulator, mark) == []
    assert _scores(again, catalog, SKILL) == _scores(first, catalog, SKILL)


def test_a_corrupted_cache_entry_is_dropped_and_downloaded_again(
    gcs_services: Services, trained_dir: Path, storage_emulator: StorageEmulator, catalog: SkillCatalog
) -> None:
    ensure_demo_models(gcs_services, trained_dir)
    _engine(gcs_services).refresh(force=True)
    record = gcs_services.registry.get(SKILL, "1.0.0")
    entry = _cache(gcs_services).path_for(record.checksums[ONNX_FILE])
    good = entry.read_bytes()
    entry.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit

    mark = storage_emulator.mark()
    engine = _engine(gcs_services)
    assert engine.status() == ({skill: "1.0.0" for skill in catalog.names}, {})
    downloads = _downloads(storage_emulator, mark)
    assert len(downloads) == 1 and f"{SKILL}%2F1.0.0%2F{ONNX_FILE}" in downloads[0], downloads
    assert entry.read_bytes() == good


def test_a_corrupted_artifact_in_the_bucket_is_refused_and_the_previous_version_keeps_serving(
    gcs_services: Services, trained_dir: Path, rival_folders: tuple[Path, Path], storage_emulator: StorageEmulator
) -> None:
    registry = gcs_services.registry
    v1 = publish_version(registry, gcs_services.artifacts, trained_dir / SKILL)
    registry.promote(SKILL, v1.version)
    engine = _engine(gcs_services)
    assert engine.status()[0][SKILL] == v1.version

    # v2's files all differ from v1's, so none of them can be answered from the cache by sha256.
    v2 = publish_version(registry, gcs_services.artifacts, rival_folders[0])
    onnx_uri = v2.artifact_uri + ONNX_FILE
    bucket_name, object_name = onnx_uri.removeprefix("gs://").split("/", 1)
    # Out of band: an upload without the precondition, which the emulator lets replace the object.
    storage_client(storage_emulator.url).bucket(bucket_name).blob(object_name).upload_from_string(b"not the published model")
    registry.promote(SKILL, v2.version)

    engine.refresh(force=True)
    versions, errors = engine.status()
    assert versions[SKILL] == v1.version
    assert engine.deployment(SKILL).production.version == v1.version
    assert v2.version in errors[SKILL] and "sha256" in errors[SKILL] and ONNX_FILE in errors[SKILL]
    # Nothing unverified was cached.
    cache = _cache(gcs_services)
    assert not cache.path_for(v2.checksums[ONNX_FILE]).exists()
    assert not cache.path_for(sha256_hex(b"not the published model")).exists()


# -- the cache alone -----------------------------------------------------------------------------


def test_the_cache_keeps_only_bytes_that_match_their_name(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    data = b"model bytes"
    digest = sha256_hex(data)
    assert cache.read(digest) is None
    cache.write(digest, data)
    assert cache.read(digest) == data
    assert [p.name for p in cache.folder.iterdir()] == [digest]  # no temporary file left behind
    cache.path_for(digest).write_bytes(b"model bytez")
    assert cache.read(digest) is None
    assert not cache.path_for(digest).exists()
    # A name that is not a sha256 never becomes a path.
    cache.write("../escaped", data)
    assert cache.read("../escaped") is None
    assert not (tmp_path / "escaped").exists()
