"""Firestore implementations of the registry, feature, assessment, run, serving profile, teacher rating and drift check stores, sharing one lazily built client.

Data layout (every document id is a hash of the record's natural key, which is also stored as fields,
so ids are never monotonic and never hit Firestore's reserved or path characters):

    model_skills/{key(skill)}                       a skill's version ids, in the order registered, and its history count
    model_versions/{key(skill, version)}            one registered model version
    registry_history/{key(skill, sequence)}         one registry change of a skill (append-only)
    student_features/{key(student_id)}              a student's features and scoring marker
    skill_assessments/{assessment_id}               one run's score of one student and skill
    latest_assessments/{key(student_id, skill)}     pointer to the newest assessment of that pair
    batch_runs/{key(run_id)}                        a run: its totals and creation state
    batch_runs/{key(run_id)}/chunks/{chunk:06d}     one task's students and, once done, its result
    serving_profiles/{key(skill, version, day, source)}   one writer's profile counts of one day
    teacher_ratings/{key(skill, student_id, rater)}  one teacher's rating of one student on one skill
    drift_checks/{key(check_id)}                     one drift check's result, as JSON text

Every query is served by Firestore's automatic single-field indexes (equality filters, or a range
and order on one field, or one equality filter paged in document id order), so no composite index
is needed; see infra/terraform/firestore-indexes.json.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import itertools
import json
import logging
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from shared.assessments import Assessment
from shared.clock import now_iso
from shared.errors import Conflict, NotFound, ServiceError, StoreUnavailable
from shared.feature_store import ScoredMarker, ScoringState, StudentFeatures, features_hash
from shared.profiles import ProfilePart
from shared.ratings import TeacherRating
from shared.registry import Decide, HistoryEvent, ModelVersion, as_decision
from shared.runs import Chunk, Run

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud.firestore_v1.base_query import FieldFilter
    from google.cloud.firestore_v1.client import Client
    from google.cloud.firestore_v1.collection import CollectionReference
    from google.cloud.firestore_v1.document import DocumentReference
    from google.cloud.firestore_v1.query import Query
    from google.cloud.firestore_v1.transaction import Transaction

log = logging.getLogger(__name__)

T = TypeVar("T")

# Firestore commits at most 500 writes (batched writes and transactions alike); every commit below
# is built to stay within it, and _check_commit_size guards that.
MAX_WRITES_PER_COMMIT = 500
# Reads are paged so that no call holds a whole collection: scans yield page by page.
PAGE_SIZE = 1000

VERSIONS = "model_versions"
SKILLS = "model_skills"
HISTORY = "registry_history"
STUDENTS = "student_features"
ASSESSMENTS = "skill_assessments"
LATEST = "latest_assessments"
RUNS = "batch_runs"
CHUNKS = "chunks"
PROFILES = "serving_profiles"
RATINGS = "teacher_ratings"
DRIFT_CHECKS = "drift_checks"

_RUN_CREATING = "creating"
_RUN_READY = "ready"


def document_key(*parts: str) -> str:
    """Returns the document id of a natural key: a hash, so ids spread over the key space (no
    hotspots from sequential ids) and any text, even '/' or '__x__', makes a valid id."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


def _check_commit_size(writes: int) -> None:
    if writes > MAX_WRITES_PER_COMMIT:
        raise AssertionError(f"{writes} writes in one commit; Firestore takes at most {MAX_WRITES_PER_COMMIT}")


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while part := list(itertools.islice(iterator, size)):
        yield part


def _field(path: str, op: str, value: Any) -> FieldFilter:
    from google.cloud.firestore_v1.base_query import FieldFilter

    return FieldFilter(path, op, value)


def _data(snapshot: Any) -> dict[str, Any]:
    """Returns a document snapshot's fields ({} for a missing document)."""
    return snapshot.to_dict() or {}


def _aggregate(result: Any) -> int:
    """Returns the value of a single-aggregation query's result."""
    return int(result[0][0].value)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- errors -----------------------------------------------------------------------------------------


def _translate(exc: BaseException, what: str) -> ServiceError | None:
    """Returns the service error a Google client failure means, or None for a failure that is a bug."""
    from google.api_core import exceptions as google_errors
    from google.auth import exceptions as auth_errors

    # Aborted is a subclass of Conflict (HTTP 409) but means contention: the operation may succeed
    # if retried, so it must become a 503 the queue retries, not a 409.
    transient = (
        google_errors.Aborted,
        google_errors.ServiceUnavailable,
        google_errors.DeadlineExceeded,
        google_errors.InternalServerError,
        google_errors.TooManyRequests,
        google_errors.GatewayTimeout,
        google_errors.RetryError,
        auth_errors.TransportError,
    )
    if isinstance(exc, transient):
        return StoreUnavailable(f"Firestore is unavailable ({what}): {exc}")
    # A transaction that kept losing to contention ends, after its attempts, in a ValueError
    # raised from the last Aborted.
    if isinstance(exc, ValueError) and isinstance(exc.__cause__, google_errors.Aborted):
        return StoreUnavailable(f"Firestore is unavailable ({what}): too much contention: {exc.__cause__}")
    if _transaction_lost(exc, google_errors.InvalidArgument):
        return StoreUnavailable(f"Firestore is unavailable ({what}): the transaction was lost: {exc}")
    # A transaction that fails is rolled back by the client, and the rollback's own failure replaces
    # the first one, which stays the context: after an unreachable Firestore, "The transaction has no
    # transaction ID, so it cannot be rolled back" (a ValueError, when the transaction could not even
    # begin); after a restarted one, "Transaction is invalid or expired" (InvalidArgument).
    if isinstance(exc, (ValueError, google_errors.GoogleAPICallError)):
        for earlier in _context_chain(exc):
            if isinstance(earlier, transient) or _transaction_lost(earlier, google_errors.InvalidArgument):
                return StoreUnavailable(f"Firestore is unavailable ({what}): {earlier}")
    if isinstance(exc, google_errors.Conflict):
        return Conflict(f"Firestore refused {what}: the document already exists ({exc.message}).")
    # A raw gRPC failure can escape a streamed read unwrapped. (grpc ships no type stubs, hence
    # import_module, which types the module as Any.)
    grpc = importlib.import_module("grpc")
    if isinstance(exc, grpc.RpcError):
        return StoreUnavailable(f"Firestore is unavailable ({what}): {exc}")
    return None


def _transaction_lost(exc: BaseException, invalid_argument: type[Exception]) -> bool:
    """Whether Firestore no longer knows the transaction: it expired, or the server restarted since it
    began (INVALID_ARGUMENT, "Transaction is invalid or expired" from the emulator, "The referenced
    transaction has expired or is no longer valid" from Firestore). The operation, retried in a new
    transaction, succeeds; other INVALID_ARGUMENTs (a transaction too big, say) are bugs."""
    message = str(exc).lower()
    return isinstance(exc, invalid_argument) and "transaction" in message and "expired" in message


def _context_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yields the exceptions `exc` was raised from or while handling, nearest first."""
    seen = {id(exc)}
    current = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """Turns Google client failures into the service's errors: unreachable, overloaded or contended
    into StoreUnavailable (503: the queue retries), an existing document into Conflict."""
    try:
        yield
    except ServiceError:
        raise
    except Exception as exc:
        translated = _translate(exc, what)
        if translated is None:
            raise
        raise translated from exc


# -- the client ---------------------------------------------------------------------------------------


class FirestoreDatabase:
    """One Firestore database of one project, reached through one client per process.

    The client is built on first use (importing google.cloud.firestore costs about a second of cold
    start), once, under a lock. The Google client itself connects to the emulator named by
    FIRESTORE_EMULATOR_HOST; `emulator_host` (the settings' copy of it) makes the choice explicit
    here: no credentials are looked up for an emulator.
    """

    def __init__(
        self,
        project: str,
        database: str = "(default)",
        *,
        emulator_host: str = "",
        deadline_seconds: float = 20.0,
    ) -> None:
        self.project = project
        self.database = database
        self.emulator_host = emulator_host
        # A worker should answer 503 (and let the queue retry) well before its own request times out,
        # rather than wait out the client's default retry deadlines of 60 to 300 s.
        self.deadline_seconds = deadline_seconds
        self._client: Client | None = None
        self._retry: Retry | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Client:
        """Returns the process's Firestore client, building it on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build()
        return self._client

    def _build(self) -> Client:
        from google.cloud import firestore

        credentials = None
        if self.emulator_host:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
        with _store_errors("connecting"):
            client = firestore.Client(project=self.project, database=self.database, credentials=credentials)
        log.info("firestore client ready", extra={"project": self.project, "database": self.database})
        return client

    @property
    def rpc(self) -> dict[str, Any]:
        """Returns the retry and timeout keywords of one call: transient failures are retried until
        the deadline, then surface (as StoreUnavailable)."""
        if self._retry is None:
            from google.api_core import exceptions as google_errors
            from google.api_core.retry import Retry, if_exception_type

            self._retry = Retry(
                predicate=if_exception_type(
                    google_errors.ServiceUnavailable,
                    google_errors.DeadlineExceeded,
                    google_errors.InternalServerError,
                    google_errors.ResourceExhausted,
                ),
                initial=0.1,
                maximum=5.0,
                multiplier=2.0,
                timeout=self.deadline_seconds,
            )
        return {"retry": self._retry, "timeout": self.deadline_seconds}

    def collection(self, name: str) -> CollectionReference:
        return self.client.collection(name)

    def run_transaction(self, work: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Runs `work` in a transaction, retried by the client when it loses to a concurrent one
        (Aborted); if `work` raises, the transaction is rolled back and nothing is written."""
        from google.cloud import firestore

        return firestore.transactional(work)(self.client.transaction(read_only=read_only))


# -- the registry ---------------------------------------------------------------------------------------


class FirestoreRegistryBackend:
    """Model versions, one document each in `model_versions`; per skill a document in `model_skills`
    listing its versions in the order they were registered and numbering its history; and the history,
    one document per event in `registry_history`.

    The skill's document lets a change read its versions by key, not by query, inside its transaction:
    a transaction locks what it reads, and point reads lock only this skill's documents (the emulator
    even locks a whole database for a query in a transaction). For the same reason the history is
    numbered by a counter in that document (`history_seq`) and each event's id is key(skill, number):
    a change reads the counter it already locks, writes event n+1 and the counter in the same commit,
    and reading the history is point reads of events 1..n, with no query and no index. A skill has
    tens of versions and events, changed by operators now and then: no size or rate limit comes near.
    """

    def __init__(self, db: FirestoreDatabase) -> None:
        self.db = db

    def _ref(self, skill: str, version: str) -> DocumentReference:
        return self.db.collection(VERSIONS).document(document_key(skill, version))

    def _skill_ref(self, skill: str) -> DocumentReference:
        return self.db.collection(SKILLS).document(document_key(skill))

    def _event_ref(self, skill: str, sequence: int) -> DocumentReference:
        return self.db.collection(HISTORY).document(document_key(skill, str(sequence)))

    def insert(self, version: ModelVersion, event: HistoryEvent | None = None) -> None:
        """Lists the version under its skill, creates its document with create(), and appends `event` to
        the skill's history, in one atomic commit; raises Conflict (writing nothing) if the version exists.

        No transaction: the commit's create()s are its preconditions. The event is created as number
        n+1 after reading the skill's counter n; if a concurrent change took n+1 first, the create fails,
        the commit writes nothing, and the insert reads the counter again. (Two publishers of one skill
        never wait on each other's locks, which the emulator resolves only after seconds.)
        """
        from google.api_core import exceptions as google_errors
        from google.cloud.firestore import ArrayUnion

        # The commit is retried after a lost answer, so the document it then finds may be its own
        # first attempt's: the token tells, where comparing records could not (two callers may
        # insert identical records, and exactly one of them may win).
        token = uuid.uuid4().hex
        ref = self._ref(version.skill, version.version)
        with _store_errors("registering a version"):
            for _ in range(_SEQUENCE_ATTEMPTS):
                batch = self.db.client.batch()
                listed: dict[str, Any] = {"skill": version.skill, "versions": ArrayUnion([version.version])}
                if event is not None:
                    sequence = _data(self._skill_ref(version.skill).get(field_paths=["history_seq"], **self.db.rpc))
                    number = int(sequence.get("history_seq", 0)) + 1
                    batch.create(self._event_ref(version.skill, number), _event_data(event, number))
                    listed["history_seq"] = number
                batch.set(self._skill_ref(version.skill), listed, merge=True)
                batch.create(ref, {**_version_data(version), "insert_token": token})
                try:
                    batch.commit(**self.db.rpc)
                    return
                except google_errors.AlreadyExists:
                    stored = ref.get(field_paths=["insert_token"], **self.db.rpc)
                    if stored.exists and stored.get("insert_token") == token:
                        return
                    if stored.exists:
                        raise Conflict(f"Skill {version.skill!r} already has version {version.version!r}.") from None
                    # Else the event's number was taken by a concurrent change of the skill: read it again.
            raise StoreUnavailable(f"Firestore is unavailable (registering a version): too much contention on {version.skill}.")

    def list(self, skill: str | None = None) -> list[ModelVersion]:
        with _store_errors("listing versions"):
            if skill is None:
                skills = [_data(s) for s in self.db.collection(SKILLS).stream(**self.db.rpc)]
            else:
                skills = [_data(self._skill_ref(skill).get(**self.db.rpc))]
            listed = [(s["skill"], v) for s in skills if s for v in s.get("versions", [])]
            refs = [self._ref(skill_name, v) for skill_name, v in listed]
            found = {s.reference.id: s for s in self.db.client.get_all(refs, **self.db.rpc) if s.exists} if refs else {}
        return _versions_in_order([found[r.id] for r in refs if r.id in found], by_skill=skill is None)

    def update(self, skill: str, decide: Decide) -> None:
        """Reads the skill's versions and writes decide's changes, and its history event if any, in one
        Firestore transaction; of two concurrent updates one is aborted and retried on a fresh read, and
        if decide raises nothing is written."""

        def apply(transaction: Transaction) -> None:
            listing = _data(self._skill_ref(skill).get(transaction=transaction, **self.db.rpc))
            refs = [self._ref(skill, v) for v in listing.get("versions", [])]
            found = {s.reference.id: s for s in transaction.get_all(refs, **self.db.rpc) if s.exists} if refs else {}
            stored = _versions_in_order([found[r.id] for r in refs if r.id in found], by_skill=False)
            decision = as_decision(decide(stored))
            _check_commit_size(len(decision.changes) + 2)
            for version, change in decision.changes.items():
                transaction.update(
                    self._ref(skill, version),
                    {
                        "stage": change.stage,
                        "traffic": float(change.traffic),
                        "promoted_at": change.promoted_at,
                        "promotion_seq": change.promotion_seq,
                    },
                )
            if decision.event is not None:
                number = int(listing.get("history_seq", 0)) + 1
                transaction.create(self._event_ref(skill, number), _event_data(decision.event, number))
                transaction.set(self._skill_ref(skill), {"skill": skill, "history_seq": number}, merge=True)

        with _store_errors(f"updating the versions of {skill}"):
            # The client opens a transaction without a deadline (an unreachable Firestore holds it for
            # about a minute, then fails with an untranslatable ValueError): one bounded read first fails
            # fast instead. A registry change is an operator's, now and then; the extra read is free.
            self._skill_ref(skill).get(field_paths=["skill"], **self.db.rpc)
            self.db.run_transaction(apply)

    def history(self, skill: str) -> builtins.list[HistoryEvent]:  # (`list` names a method in this class)
        with _store_errors(f"reading the history of {skill}"):
            count = int(_data(self._skill_ref(skill).get(field_paths=["history_seq"], **self.db.rpc)).get("history_seq", 0))
            events: builtins.list[dict[str, Any]] = []
            for part in _batched(range(1, count + 1), _HISTORY_READ_SIZE):
                refs = [self._event_ref(skill, n) for n in part]
                events.extend(_data(s) for s in self.db.client.get_all(refs, **self.db.rpc) if s.exists)
        return [HistoryEvent.from_dict(e) for e in sorted(events, key=lambda e: e["sequence"])]


# How often an insert re-reads the skill's history counter when concurrent changes keep taking its number.
_SEQUENCE_ATTEMPTS = 20
# History events read per call: a skill's whole history, a few hundred events at most, in few round trips.
_HISTORY_READ_SIZE = 300

_VERSION_FIELDS = (
    "skill", "version", "stage", "traffic", "created_at", "trained_at", "metrics", "artifact_uri", "sha256",
    "checksums", "promoted_at", "promotion_seq",
)


def _version_data(version: ModelVersion) -> dict[str, Any]:
    data = {name: getattr(version, name) for name in _VERSION_FIELDS}
    data["traffic"] = float(version.traffic)
    return data


def _event_data(event: HistoryEvent, sequence: int) -> dict[str, Any]:
    data = event.to_dict()
    data["sequence"] = sequence
    for change in data["changes"]:  # a whole number would come back as an int
        for state in (change["before"], change["after"]):
            if state is not None:
                state["traffic"] = float(state["traffic"])
    return data


def _versions_in_order(snapshots: list[Any], *, by_skill: bool) -> list[ModelVersion]:
    """Oldest first (by skill first, for all skills); versions created in the same millisecond keep
    the order they were listed in, which is the order they were registered."""
    ordered = sorted(
        enumerate(snapshots),
        key=lambda pair: ((pair[1].get("skill") if by_skill else ""), pair[1].get("created_at"), pair[0]),
    )
    versions = []
    for _, snapshot in ordered:
        data = _data(snapshot)
        values: dict[str, Any] = {name: data.get(name) for name in _VERSION_FIELDS}
        values["traffic"] = float(values["traffic"])  # a whole number may come back as an int
        versions.append(ModelVersion(**values))
    return versions


# -- the feature store ---------------------------------------------------------------------------------


_STATE_FIELDS = ["student_id", "features_hash", "scored_hash", "scored_models"]


class FirestoreFeatureStore:
    """Student features, one document per student in `student_features`, keyed by a hash of the id."""

    def __init__(self, db: FirestoreDatabase) -> None:
        self.db = db

    def _ref(self, student_id: str) -> DocumentReference:
        return self.db.collection(STUDENTS).document(document_key(student_id))

    def upsert(self, updates: Mapping[str, Mapping[str, float]]) -> int:
        """Merges the values, 500 students per transaction (each read, merged, and written only if a
        value changed); a failure leaves earlier transactions written, and repeating the call is safe."""
        changed = 0
        for part in _batched(updates.items(), MAX_WRITES_PER_COMMIT):
            with _store_errors("storing features"):
                changed += self.db.run_transaction(partial(self._upsert_part, part=part))
        return changed

    def _upsert_part(self, transaction: Transaction, *, part: list[tuple[str, Mapping[str, float]]]) -> int:
        refs = {student_id: self._ref(student_id) for student_id, _ in part}
        stored = {
            snapshot.reference.id: snapshot.get("features")
            for snapshot in transaction.get_all(list(refs.values()), **self.db.rpc)
            if snapshot.exists
        }
        now = now_iso()
        changed = 0
        for student_id, values in part:
            ref = refs[student_id]
            before = stored.get(ref.id)
            merged = {**(before or {}), **values}
            if before is not None and merged == before:
                continue
            fields = {"features": merged, "updated_at": now, "features_hash": features_hash(merged)}
            if before is None:
                transaction.set(ref, {"student_id": student_id, **fields, "scored_hash": None, "scored_models": None})
            else:
                # update() replaces `features` whole and leaves the scoring marker alone.
                transaction.update(ref, fields)
            changed += 1
        return changed

    def get_many(self, student_ids: Sequence[str]) -> dict[str, StudentFeatures]:
        result: dict[str, StudentFeatures] = {}
        for part in _batched(dict.fromkeys(student_ids), PAGE_SIZE):
            with _store_errors("reading features"):
                snapshots = list(self.db.client.get_all([self._ref(s) for s in part], **self.db.rpc))
            for snapshot in snapshots:
                if snapshot.exists:
                    student = _student(_data(snapshot))
                    result[student.student_id] = student
        return result

    def scan(self) -> Iterator[StudentFeatures]:
        for page in self._pages(None):
            yield from (_student(_data(snapshot)) for snapshot in page)

    def scoring_states(self) -> Iterator[ScoringState]:
        # The projection leaves the features (most of each document) on the server.
        for page in self._pages(_STATE_FIELDS):
            for snapshot in page:
                data = _data(snapshot)
                yield ScoringState(
                    student_id=data["student_id"],
                    features_hash=data["features_hash"],
                    scored_hash=data.get("scored_hash"),
                    scored_models=data.get("scored_models"),
                )

    def _pages(self, fields: list[str] | None) -> Iterator[list[Any]]:
        """Yields the students ordered by student_id, one page of 1,000 at a time, each page starting
        after the last id of the one before (a cursor, not an offset, so every page costs its size)."""
        query = self.db.collection(STUDENTS).order_by("student_id").limit(PAGE_SIZE)
        if fields is not None:
            query = query.select(fields)
        last: str | None = None
        while True:
            page_query = query if last is None else query.start_after({"student_id": last})
            with _store_errors("scanning students"):
                page = list(page_query.stream(**self.db.rpc))
            if page:
                yield page
            if len(page) < PAGE_SIZE:
                return
            last = page[-1].get("student_id")

    def mark_scored(self, markers: Sequence[ScoredMarker]) -> None:
        """Writes each stored student's marker, 500 per batch; markers of students not stored are
        dropped (students are never deleted, so one found here is still there when the batch commits)."""
        latest = {m.student_id: m for m in markers}  # the last marker of a student wins, as in SQLite
        for part in _batched(latest.values(), MAX_WRITES_PER_COMMIT):
            refs = [self._ref(m.student_id) for m in part]
            with _store_errors("marking students scored"):
                found = {
                    s.reference.id
                    for s in self.db.client.get_all(refs, field_paths=["student_id"], **self.db.rpc)
                    if s.exists
                }
                batch = self.db.client.batch()
                for ref, marker in zip(refs, part):
                    if ref.id in found:
                        batch.update(ref, {"scored_hash": marker.features_hash, "scored_models": marker.models_signature})
                if found:
                    batch.commit(**self.db.rpc)

    def count(self) -> int:
        """Counts with an aggregation query: one billed read per 1,000 students, no documents sent."""
        with _store_errors("counting students"):
            return _aggregate(self.db.collection(STUDENTS).count().get(**self.db.rpc))


def _student(data: dict[str, Any]) -> StudentFeatures:
    return StudentFeatures(
        student_id=data["student_id"],
        features=data.get("features") or {},
        updated_at=data.get("updated_at", ""),
        features_hash=data["features_hash"],
        scored_hash=data.get("scored_hash"),
        scored_models=data.get("scored_models"),
    )


# -- assessments ----------------------------------------------------------------------------------------


_ASSESSMENT_FIELDS = (
    "run_id", "student_id", "skill", "score", "confidence", "model_version", "features_hash", "assessed_at",
    "contributions",
)
# Each assessment costs up to two writes (itself and its latest pointer).
_ASSESSMENTS_PER_COMMIT = MAX_WRITES_PER_COMMIT // 2


class FirestoreAssessmentStore:
    """Assessments in `skill_assessments` (id = assessment_id) and the latest per student and skill in
    `latest_assessments`, a pointer document per pair."""

    def __init__(self, db: FirestoreDatabase) -> None:
        self.db = db

    def _ref(self, id: str) -> DocumentReference:
        return self.db.collection(ASSESSMENTS).document(id)

    def _latest_ref(self, student_id: str, skill: str) -> DocumentReference:
        return self.db.collection(LATEST).document(document_key(student_id, skill))

    def write(self, assessments: Sequence[Assessment]) -> None:
        """Writes the assessments in transactions of at most 250 (500 writes with the latest pointers).

        Each transaction is atomic: it reads the latest pointers of its pairs and moves one only to an
        assessment at least as new (assessed_at), so the view never goes back, whatever order writes
        land in. A call larger than one transaction is not atomic as a whole; that is safe because ids
        are deterministic: a retried call overwrites what an earlier attempt wrote, never duplicates it.
        """
        unique = list({a.id: a for a in assessments}.values())  # a repeated id: the last one wins
        for part in _batched(unique, _ASSESSMENTS_PER_COMMIT):
            with _store_errors("writing assessments"):
                self.db.run_transaction(partial(self._write_part, part=part))

    def _write_part(self, transaction: Transaction, *, part: list[Assessment]) -> None:
        keys = list(dict.fromkeys((a.student_id, a.skill) for a in part))
        refs = {key: self._latest_ref(*key) for key in keys}
        current = {
            snapshot.reference.id: _data(snapshot)
            for snapshot in transaction.get_all(list(refs.values()), **self.db.rpc)
            if snapshot.exists
        }
        moved: dict[tuple[str, str], Assessment] = {}
        for a in part:
            key = (a.student_id, a.skill)
            newest = moved.get(key)
            newest_at = newest.assessed_at if newest else (current.get(refs[key].id) or {}).get("assessed_at")
            if newest_at is None or a.assessed_at >= newest_at:
                moved[key] = a
        _check_commit_size(len(part) + len(moved))
        for a in part:
            transaction.set(self._ref(a.id), {name: getattr(a, name) for name in _ASSESSMENT_FIELDS})
        for (student_id, skill), a in moved.items():
            transaction.set(
                refs[(student_id, skill)],
                {"student_id": student_id, "skill": skill, "run_id": a.run_id, "assessed_at": a.assessed_at,
                 "assessment_id": a.id},
            )

    def latest(self, student_id: str) -> list[Assessment]:
        with _store_errors("reading the latest assessments"):
            pointers = list(
                self.db.collection(LATEST).where(filter=_field("student_id", "==", student_id)).stream(**self.db.rpc)
            )
            refs = [self._ref(p.get("assessment_id")) for p in pointers]
            snapshots = list(self.db.client.get_all(refs, **self.db.rpc)) if refs else []
        found = [_assessment(_data(s)) for s in snapshots if s.exists]
        return sorted(found, key=lambda a: a.skill)

    def history(self, student_id: str, skill: str) -> list[Assessment]:
        """Two equality filters: Firestore merges the single-field indexes, no composite index needed;
        a pair has one assessment per run, so sorting them here is cheap."""
        query = (
            self.db.collection(ASSESSMENTS)
            .where(filter=_field("student_id", "==", student_id))
            .where(filter=_field("skill", "==", skill))
        )
        with _store_errors("reading assessment history"):
            snapshots = list(query.stream(**self.db.rpc))
        found = [(s.id, _assessment(_data(s))) for s in snapshots]
        return [a for _, a in sorted(found, key=lambda pair: (pair[1].assessed_at, pair[0]))]

    def count(self, run_id: str | None = None) -> int:
        query: Query | CollectionReference = self.db.collection(ASSESSMENTS)
        if run_id is not None:
            query = query.where(filter=_field("run_id", "==", run_id))
        with _store_errors("counting assessments"):
            return _aggregate(query.count().get(**self.db.rpc))


def _assessment(data: dict[str, Any]) -> Assessment:
    values: dict[str, Any] = {name: data.get(name) for name in _ASSESSMENT_FIELDS}
    return Assessment(**values)


# -- runs -------------------------------------------------------------------------------------------------


# The run document takes one write of each creation commit, its chunks the rest.
_CHUNKS_PER_COMMIT = MAX_WRITES_PER_COMMIT - 1


class FirestoreRunStore:
    """Runs in `batch_runs`; each chunk, and later its result, is a document of the run's `chunks`
    subcollection, so workers finishing at once write different documents (Firestore sustains about
    one write per second per document), and the run's totals are aggregated when read.

    Chunk ids are the zero-padded chunk numbers: sequential ids concentrate writes on one key range,
    but a run has at most a few thousand chunks, each written once at creation and once per attempt,
    far below the rates where that matters, and the ids sort in chunk order for reading.
    """

    def __init__(self, db: FirestoreDatabase, *, lease_seconds: float = 60.0) -> None:
        self.db = db
        # How long a creator may go silent before another caller takes the creation over.
        self.lease_seconds = lease_seconds

    def _ref(self, run_id: str) -> DocumentReference:
        return self.db.collection(RUNS).document(document_key(run_id))

    def _chunks(self, run_id: str) -> CollectionReference:
        return self._ref(run_id).collection(CHUNKS)

    def create(self, run: Run, chunks: Sequence[Chunk]) -> bool:
        """Stores a new run and its chunks; returns False, changing nothing, if the run exists.

        A run of up to 499 chunks is one transaction. A larger one cannot be one commit, so its
        document is first created in state `creating` with a lease held by this call; the chunks
        follow in transactions of 499 that each check the lease is still this call's and extend it,
        and the last one sets the state `ready`. Until then the run reads as absent. Another caller
        finding a live lease gets StoreUnavailable (retry later); one finding an expired lease (its
        creator died) takes the creation over. Chunks an earlier creator left beyond this run's
        tasks_total are never read.
        """
        owner = uuid.uuid4().hex
        total = len(chunks)
        parts = _batched(chunks, _CHUNKS_PER_COMMIT)
        first = next(parts, [])
        written = len(first)
        with _store_errors(f"creating run {run.run_id}"):
            outcome = self.db.run_transaction(
                partial(self._claim, run=run, first=first, owner=owner, ready=written >= total)
            )
        if outcome == "exists":
            return False
        if outcome == "busy":
            raise StoreUnavailable(f"Run {run.run_id!r} is being created by another caller; retry later.")
        for part in parts:
            written += len(part)
            with _store_errors(f"creating run {run.run_id}"):
                self.db.run_transaction(
                    partial(self._continue, run_id=run.run_id, part=part, owner=owner, ready=written >= total)
                )
        return True

    def _lease(self) -> datetime:
        return _utcnow() + timedelta(seconds=self.lease_seconds)

    def _claim(self, transaction: Transaction, *, run: Run, first: list[Chunk], owner: str, ready: bool) -> str:
        ref = self._ref(run.run_id)
        snapshot = ref.get(transaction=transaction, **self.db.rpc)
        if snapshot.exists:
            if snapshot.get("state") == _RUN_READY:
                return "exists"
            expires = snapshot.get("lease_expires_at")
            if expires is not None and expires > _utcnow():
                return "busy"
            log.warning("taking over the creation of a run whose creator went silent", extra={"run_id": run.run_id})
        _check_commit_size(1 + len(first))
        transaction.set(
            ref,
            {
                "run_id": run.run_id,
                "full": run.full,
                "models": run.models,
                "started_at": run.started_at,
                "students_total": run.students_total,
                "tasks_total": run.tasks_total,
                "finished_at": run.finished_at,
                "state": _RUN_READY if ready else _RUN_CREATING,
                "lease_owner": None if ready else owner,
                "lease_expires_at": None if ready else self._lease(),
            },
        )
        for chunk in first:
            transaction.set(self._chunks(run.run_id).document(f"{chunk.chunk:06d}"), _chunk_data(chunk))
        return "claimed"

    def _continue(self, transaction: Transaction, *, run_id: str, part: list[Chunk], owner: str, ready: bool) -> None:
        ref = self._ref(run_id)
        snapshot = ref.get(transaction=transaction, **self.db.rpc)
        if not snapshot.exists or snapshot.get("lease_owner") != owner:
            raise StoreUnavailable(f"Run {run_id!r} was taken over while being created; retry later.")
        _check_commit_size(1 + len(part))
        for chunk in part:
            transaction.set(self._chunks(run_id).document(f"{chunk.chunk:06d}"), _chunk_data(chunk))
        if ready:
            transaction.update(ref, {"state": _RUN_READY, "lease_owner": None, "lease_expires_at": None})
        else:
            transaction.update(ref, {"lease_expires_at": self._lease()})

    def get(self, run_id: str) -> Run | None:
        """Returns the run with its totals aggregated over its chunk documents, all read in one
        read-only transaction so the totals are consistent; None if absent or still being created."""
        with _store_errors(f"reading run {run_id}"):
            return self.db.run_transaction(partial(self._read, run_id=run_id), read_only=True)

    def _read(self, transaction: Transaction, *, run_id: str) -> Run | None:
        snapshot = self._ref(run_id).get(transaction=transaction, **self.db.rpc)
        if not snapshot.exists or snapshot.get("state") != _RUN_READY:
            return None
        data = _data(snapshot)
        chunks = self._chunks(run_id)
        # Three aggregations of one field each: each is served by that field's single-field index,
        # and costs one read per 1,000 chunks. Chunks not done hold zeros, so the sums need no filter.
        done = chunks.where(filter=_field("done", "==", True)).count().get(transaction=transaction, **self.db.rpc)
        scored = chunks.sum("scored").get(transaction=transaction, **self.db.rpc)
        failed = chunks.sum("failed_count").get(transaction=transaction, **self.db.rpc)
        tasks_done = _aggregate(done)
        finished_at = data.get("finished_at")
        if finished_at is None and data["tasks_total"] == 0:
            finished_at = data["started_at"]
        elif finished_at is None and tasks_done >= data["tasks_total"]:
            # The run finished when its last chunk first reported: the latest first-finish time.
            last = list(
                chunks.order_by("finished_at", direction="DESCENDING")
                .limit(1)
                .select(["finished_at"])
                .stream(transaction=transaction, **self.db.rpc)
            )
            finished_at = last[0].get("finished_at") if last else None
        return Run(
            run_id=data["run_id"],
            full=bool(data["full"]),
            models=data["models"],
            started_at=data["started_at"],
            students_total=int(data["students_total"]),
            tasks_total=int(data["tasks_total"]),
            tasks_done=tasks_done,
            students_scored=_aggregate(scored),
            students_failed=_aggregate(failed),
            finished_at=finished_at,
        )

    def chunks(self, run_id: str) -> list[Chunk]:
        """Returns the run's chunks in order (none while it is being created), read 1,000 per page."""
        with _store_errors(f"reading the chunks of run {run_id}"):
            snapshot = self._ref(run_id).get(field_paths=["state", "tasks_total"], **self.db.rpc)
            if not snapshot.exists or snapshot.get("state") != _RUN_READY:
                return []
            query = (
                self._chunks(run_id)
                .where(filter=_field("chunk", "<", snapshot.get("tasks_total")))
                .order_by("chunk")
                .limit(PAGE_SIZE)
            )
            result: list[Chunk] = []
            while True:
                page_query = query.start_after({"chunk": result[-1].chunk}) if result else query
                page = [_chunk(run_id, _data(s)) for s in page_query.stream(**self.db.rpc)]
                result.extend(page)
                if len(page) < PAGE_SIZE:
                    return result

    def chunk(self, run_id: str, chunk: int) -> Chunk | None:
        """Returns one chunk of the run by a point read of its document; None if the run has no such chunk."""
        with _store_errors(f"reading chunk {chunk} of run {run_id}"):
            snapshot = self._chunks(run_id).document(f"{chunk:06d}").get(**self.db.rpc)
            return _chunk(run_id, _data(snapshot)) if snapshot.exists else None

    def record_chunk(self, run_id: str, chunk: int, scored: int, failed: Sequence[dict[str, Any]]) -> Run:
        """Sets the chunk's result in its own document (replacing an earlier attempt's, keeping the
        time it first finished) and returns the run's totals; raises NotFound for an unknown run."""
        ref = self._chunks(run_id).document(f"{chunk:06d}")

        def record(transaction: Transaction) -> None:
            snapshot = ref.get(transaction=transaction, **self.db.rpc)
            if not snapshot.exists:
                return
            transaction.update(
                ref,
                {
                    "done": True,
                    "scored": scored,
                    "failed": list(failed),
                    "failed_count": len(failed),
                    "finished_at": snapshot.get("finished_at") or now_iso(),
                },
            )

        with _store_errors(f"recording chunk {chunk} of run {run_id}"):
            run = self._ref(run_id).get(field_paths=["state", "tasks_total"], **self.db.rpc)
            if not run.exists or run.get("state") != _RUN_READY:
                raise NotFound(f"No batch run {run_id!r}.")
            # Only this run's chunks: a number beyond tasks_total may be an earlier creator's leftover.
            if 0 <= chunk < run.get("tasks_total"):
                self.db.run_transaction(record)
        totals = self.get(run_id)
        if totals is None:
            raise NotFound(f"No batch run {run_id!r}.")
        return totals


def _chunk_data(chunk: Chunk) -> dict[str, Any]:
    """A new chunk: its students, not done yet (zeros, so the run's sums need no filter)."""
    return {
        "chunk": chunk.chunk,
        "student_ids": list(chunk.student_ids),
        "done": False,
        "scored": 0,
        "failed": [],
        "failed_count": 0,
        "finished_at": None,
    }


def _chunk(run_id: str, data: dict[str, Any]) -> Chunk:
    return Chunk(
        run_id=run_id,
        chunk=int(data["chunk"]),
        student_ids=list(data.get("student_ids") or []),
        done=bool(data.get("done")),
        scored=int(data.get("scored") or 0),
        failed=list(data.get("failed") or []),
    )


# -- paging in document id order -----------------------------------------------------------------------


def _pages_by_id(db: FirestoreDatabase, query: Query, what: str, page_size: int = PAGE_SIZE) -> Iterator[list[Any]]:
    """Yields a query's documents in document id order, one page at a time, each page starting after
    the last document of the one before (a cursor, not an offset, so every page costs its size).

    Ordering by id adds no index: a single-field index holds its entries in (value, document id)
    order, so one equality filter plus this order is served by that field's automatic index, where an
    order on another field would need a composite one.
    """
    ordered = query.order_by("__name__").limit(page_size)
    last: Any = None
    while True:
        page_query = ordered if last is None else ordered.start_after(last)
        with _store_errors(what):
            page = list(page_query.stream(**db.rpc))
        if page:
            yield page
        if len(page) < page_size:
            return
        last = page[-1]


def _write_all(db: FirestoreDatabase, documents: Mapping[str, tuple[DocumentReference, dict[str, Any]]], what: str) -> None:
    """Sets each document (replacing what it held), in batched commits of at most 500 writes.

    No read is needed, so a batch rather than a transaction. A call larger than one commit is not
    atomic as a whole; every caller writes documents whose ids derive from their natural keys, so a
    retried call rewrites the same documents and ends in the same state.
    """
    for part in _batched(documents.values(), MAX_WRITES_PER_COMMIT):
        _check_commit_size(len(part))
        with _store_errors(what):
            batch = db.client.batch()
            for ref, data in part:
                batch.set(ref, data)
            batch.commit(**db.rpc)


# -- serving profiles ---------------------------------------------------------------------------------------


# A part holds ~30 variables of ~100 counts as JSON text, 10 to 20 KB: pages of 200 keep one answer
# to a few MB, well inside one call's deadline, where 1,000 could reach 20 MB.
_PROFILE_PAGE_SIZE = 200


class FirestoreProfileStore:
    """Serving profile parts in `serving_profiles`, one document per (skill, version, day, source).

    Each document has one writer: a serving process, at most every PROFILE_FLUSH_SECONDS (at least
    1 s), or one nightly chunk and its retries; so none comes near Firestore's sustained rate of about
    one write per second per document, however many processes serve.

    A part also carries `profile_day_key`, a hash of (skill, version, day): a window is read with one
    equality query per day on that field, served by its automatic index. Filtering on skill, version
    and `day in [...]` would need a composite index.

    The counts are stored as JSON text: Firestore refuses map keys of the form `__x__`, and the
    prediction's counts sit under `__prediction__`; nor can an array hold the arrays of counts.
    """

    def __init__(self, db: FirestoreDatabase) -> None:
        self.db = db

    def _ref(self, part: ProfilePart) -> DocumentReference:
        return self.db.collection(PROFILES).document(document_key(part.skill, part.model_version, part.day, part.source))

    def put(self, parts: Sequence[ProfilePart]) -> None:
        """Stores each part, replacing its source's earlier part of the same skill, version and day.

        A flush or a chunk writes at most a few tens of parts: one commit, atomic in practice.
        """
        documents: dict[str, tuple[DocumentReference, dict[str, Any]]] = {}
        for part in parts:
            ref = self._ref(part)
            documents[ref.id] = (ref, _profile_data(part))  # a part repeated in one call: the last wins
        _write_all(self.db, documents, "writing serving profiles")

    def parts(self, skill: str, model_version: str, days: Sequence[str]) -> list[ProfilePart]:
        """Returns every part of the version on those days, ordered by day and source."""
        found: list[ProfilePart] = []
        for day in dict.fromkeys(days):
            query = self.db.collection(PROFILES).where(
                filter=_field("profile_day_key", "==", document_key(skill, model_version, day))
            )
            for page in _pages_by_id(self.db, query, "reading serving profiles", _PROFILE_PAGE_SIZE):
                found.extend(_profile_part(_data(snapshot)) for snapshot in page)
        return sorted(found, key=lambda p: (p.day, p.source))


def _profile_data(part: ProfilePart) -> dict[str, Any]:
    return {
        "skill": part.skill,
        "model_version": part.model_version,
        "day": part.day,
        "source": part.source,
        "profile_day_key": document_key(part.skill, part.model_version, part.day),
        "students": part.students,
        "counts": json.dumps(part.counts, separators=(",", ":")),
        "updated_at": part.updated_at,
    }


def _profile_part(data: dict[str, Any]) -> ProfilePart:
    return ProfilePart(
        skill=data["skill"],
        model_version=data["model_version"],
        day=data["day"],
        source=data["source"],
        students=int(data["students"]),
        counts=json.loads(data["counts"]),
        updated_at=data.get("updated_at", ""),
    )


# -- teacher ratings ------------------------------------------------------------------------------------------


_RATING_FIELDS = ["student_id", "rating"]


class FirestoreTeacherRatingStore:
    """Teacher ratings in `teacher_ratings`, one document per (skill, student, rater), keyed by a hash
    of the three: a later rating by the same rater overwrites the earlier one.

    Ratings arrive in bulk loads, each document written once per load, and the hashed ids spread a
    load's writes over the whole key range instead of appending to one end of it.
    """

    def __init__(self, db: FirestoreDatabase) -> None:
        self.db = db

    def _ref(self, rating: TeacherRating) -> DocumentReference:
        return self.db.collection(RATINGS).document(document_key(rating.skill, rating.student_id, rating.rater))

    def put_many(self, ratings: Sequence[TeacherRating]) -> int:
        """Stores the ratings, 500 per commit; returns how many were given (a rating repeated in one
        call counts each time and the last one stays, as in SQLite)."""
        documents: dict[str, tuple[DocumentReference, dict[str, Any]]] = {}
        for rating in ratings:
            ref = self._ref(rating)
            documents[ref.id] = (
                ref,
                {
                    "student_id": rating.student_id,
                    "skill": rating.skill,
                    "rater": rating.rater,
                    "rating": float(rating.rating),
                    "rated_at": rating.rated_at,
                },
            )
        _write_all(self.db, documents, "writing teacher ratings")
        return len(ratings)

    def for_skill(self, skill: str) -> dict[str, float]:
        """Returns each rated student's mean rating on the skill, averaged here over one paged query:
        Firestore has no grouped aggregation, and one query per student would cost a round trip each.
        The projection sends only the student and the rating."""
        query = self.db.collection(RATINGS).where(filter=_field("skill", "==", skill)).select(_RATING_FIELDS)
        totals: dict[str, tuple[float, int]] = {}
        for page in _pages_by_id(self.db, query, f"reading the teacher ratings of {skill}"):
            for snapshot in page:
                data = _data(snapshot)
                total, n = totals.get(data["student_id"], (0.0, 0))
                totals[data["student_id"]] = (total + float(data["rating"]), n + 1)
        return {student_id: total / n for student_id, (total, n) in totals.items()}


# -- drift checks ---------------------------------------------------------------------------------------------


class FirestoreDriftCheckStore:
    """Drift checks in `drift_checks`, one document per check_id, its result as JSON text in `body`.

    A result nests lists and maps of numbers, text and nulls whose keys are the service's own (a
    feature name may not suit a Firestore map key) and is read whole, never queried: text keeps it
    exact. At 7 skills x 2 versions x 30 features it is some 50 KB, far inside a document's 1 MiB.
    `sort_key` (created_at, then check_id) orders checks as SQLite's (created_at DESC, check_id DESC)
    does with one field's automatic index; two orders would need a composite index. A check is
    written once a night, so that indexed timestamp is no hotspot.
    """

    def __init__(self, db: FirestoreDatabase) -> None:
        self.db = db

    def _ref(self, check_id: str) -> DocumentReference:
        return self.db.collection(DRIFT_CHECKS).document(document_key(check_id))

    def save(self, check: dict[str, Any]) -> None:
        """Stores the check, replacing an earlier one of the same check_id."""
        check_id, created_at = str(check["check_id"]), str(check["created_at"])
        data = {
            "check_id": check_id,
            "created_at": created_at,
            # \x1f sorts before every character of a timestamp, so this orders as the pair does.
            "sort_key": f"{created_at}\x1f{check_id}",
            "body": json.dumps(check),
        }
        with _store_errors(f"saving drift check {check_id}"):
            self._ref(check_id).set(data, **self.db.rpc)

    def get(self, check_id: str) -> dict[str, Any] | None:
        """Returns the stored check, or None."""
        with _store_errors(f"reading drift check {check_id}"):
            snapshot = self._ref(check_id).get(field_paths=["body"], **self.db.rpc)
        return _check_body(snapshot) if snapshot.exists else None

    def latest(self) -> dict[str, Any] | None:
        """Returns the most recent check (by created_at, then check_id), or None before the first."""
        with _store_errors("reading the latest drift check"):
            query = self.db.collection(DRIFT_CHECKS).order_by("sort_key", direction="DESCENDING").limit(1)
            newest = list(query.select(["body"]).stream(**self.db.rpc))
        return _check_body(newest[0]) if newest else None


def _check_body(snapshot: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(snapshot.get("body"))
    return body
