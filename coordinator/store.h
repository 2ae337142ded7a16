// The coordinator's durable log: jobs, tasks (with their resolved pipeline YAML and a reference to
// their manifest, stored once per content in the manifests table),
// worker groups and their leases, metric points and checkpoints, in one SQLite file.
//
// The database runs in WAL mode with synchronous=FULL, so a committed transaction survives
// `kill -9` and power loss. The schema is versioned with `PRAGMA user_version`; a file of an
// older version (1, 2) is copied aside and upgraded at Open, one of a newer version or another
// program's is refused. Every sqlite return code is
// checked and turned into a Status naming the statement and the database path.
//
// Mutations are only allowed inside Transaction() (a mutator called outside one returns INTERNAL;
// DeleteDatasetVersion* make their own): the scheduler runs one transaction per RPC and
// commits before it replies. The in-memory view lives in the scheduler; the store is read at
// start (Load*), for lease payloads and for history.
//
// One coordinator per database: Open() takes an exclusive flock on "<path>.lock" (released when
// the store closes or the process dies, `kill -9` included) and refuses a file another process
// or store holds.
//
// Thread-safe: one connection behind a recursive mutex (Transaction holds it across its body).
#ifndef AVIARY_COORDINATOR_STORE_H_
#define AVIARY_COORDINATOR_STORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/aviary.pb.h"

struct sqlite3;

namespace aviary::coordinator {

// The schema version this build reads and writes. A version-1 file is migrated at Open: the
// manifests table and tasks.manifest_hash are added and every task's own manifest moves into the
// table under its content hash (rows that do not inflate stay where they are and are reported
// as DATA_LOSS when leased, as before). Version 3 adds the dataset versions of the fold cache
// (dataset_versions, dataset_version_manifests); a version-1 or -2 file gains them at Open.
inline constexpr int kStoreSchemaVersion = 3;

// A job; `info.tasks` is always empty here (tasks are rows of their own).
struct JobRow {
  aviary::v1::JobInfo info;
  int64_t seq = 0;  // submission order
};

// A task's scheduling state. The manifest and pipeline YAML live in TaskPayload (large, written
// once at submit).
struct TaskRow {
  aviary::v1::TaskInfo info;
  int64_t seq = 0;                // DAG order within the job
  std::string depends_on;         // task id this one waits for ("" = none)
  std::string init_checkpoint;    // set when the dependency succeeds
  std::string resume_checkpoint;  // the latest checkpoint reported by any attempt
  std::string manifest_hash;      // content address of its manifest ("" once pruned)
};

// InsertTask: with manifest_csv, the manifest is stored under its content hash (manifest_hash
// when set, Sha256Hex(manifest_csv) otherwise) unless that content is stored already; without,
// manifest_hash must name a stored manifest. LoadTaskPayload: manifest_hash, and manifest_csv
// only for a row of schema 1 that could not be migrated (its own bytes, read as they are).
struct TaskPayload {
  std::string manifest_csv;
  std::string pipeline_yaml;
  std::string manifest_hash;
};

// A manifest as the store keeps it (deflated, with a header); a pure function, safe on any thread.
std::string DeflateManifest(const std::string& csv);

// A dataset version of the fold cache (coordinator/fold_cache.h): its key, the stat stamps of
// its files (encoded by the fold cache) and its folds' manifests, each stored in `manifests`.
struct DatasetVersionRow {
  std::string key;
  int64_t created_unix_ms = 0;
  std::string stamps;
  struct Manifest {
    int fold = 0;
    std::string hash;
    int64_t size = 0;
  };
  std::vector<Manifest> manifests;
};

struct GroupRow {
  std::string group_id;
  std::string task_id;  // the leased task, "" when idle
  int64_t registered_unix_ms = 0;
  aviary::v1::RegisterGroupRequest info;
};

// One stored metric point.
struct PointRow {
  std::string task_id;
  int attempt = 0;
  int64_t time_unix_ms = 0;
  aviary::v1::Metrics metrics;
};

class Store {
 public:
  // Opens (creating when missing) the database at `path`. FAILED_PRECONDITION when the file
  // holds another schema version or foreign tables; INTERNAL for sqlite errors.
  static absl::StatusOr<std::unique_ptr<Store>> Open(const std::string& path);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Closes the connection (checkpointing the WAL). Idempotent; later calls fail.
  absl::Status Close();

  const std::string& path() const { return path_; }
  // When this Open upgraded the file's schema: the version it had (else 0), and the copy of the
  // file from before the upgrade (VACUUM INTO; the coordinator that wrote it reads that one).
  int64_t upgraded_from() const { return upgraded_from_; }
  const std::string& upgrade_backup() const { return upgrade_backup_; }

  // Runs `body` inside BEGIN IMMEDIATE ... COMMIT; rolls back when `body` or COMMIT fails and
  // returns that error. The mutators below must be called from such a body.
  absl::Status Transaction(const std::function<absl::Status()>& body);
  // Called once, with the error every later call gets, when the store can write no more (a
  // COMMIT failed in its I/O, a ROLLBACK failed): only a restart, which reads the file back,
  // mends it. At once when it is so already. Runs under the store's lock: it must not call the
  // store (the coordinator's asks the process to exit 1, which systemd restarts).
  void SetOnBroken(std::function<void(const absl::Status&)> on_broken);

  absl::Status PutJob(const JobRow& job);
  // `manifest_deflated`, when not empty, is DeflateManifest(payload.manifest_csv), made before the
  // transaction (the submit deflates a pool manifest on its own thread, not inside the lock).
  absl::Status InsertTask(const TaskRow& task, const TaskPayload& payload, const std::string& manifest_deflated = "");
  absl::Status UpdateTask(const TaskRow& task);  // INTERNAL when the row is missing
  absl::Status PutGroup(const GroupRow& group);
  absl::Status DeleteGroup(const std::string& group_id);
  // Stores the points: an epoch end replaces the one of the same task, attempt and epoch; of the
  // step points only the newest (the last in `points`) is kept per task and attempt, in place
  // of the one before.
  absl::Status AddPoints(const std::string& job_id, const std::string& task_id, int attempt,
                         int64_t time_unix_ms, const std::vector<aviary::v1::Metrics>& points);
  absl::Status AddCheckpoint(const std::string& task_id, int attempt, const std::string& path,
                             int epoch, bool best, int64_t time_unix_ms);
  absl::Status SetCounter(const std::string& name, int64_t value);
  // Retention of a finished job: deletes its step points (epoch ends stay: history and status
  // keep working) and drops its tasks' manifest references. Adds what it removed to the counts.
  // The manifests themselves go with SweepManifests once no task refers to them.
  absl::Status PruneJob(const std::string& job_id, int64_t* points_deleted, int64_t* manifests_cleared);
  // Deletes the stored manifests no task refers to; adds their number and stored bytes. The
  // dataset versions that refer to one of them go too (a version never names a missing manifest).
  absl::Status SweepManifests(int64_t* manifests_deleted, int64_t* bytes_deleted);
  // Records a dataset version (replacing one under the same key; every manifest it names must be
  // stored) and keeps only the `max_versions` most recently recorded (at least this one).
  absl::Status PutDatasetVersion(const DatasetVersionRow& version, size_t max_versions);
  absl::Status DeleteDatasetVersion(const std::string& key);
  // Deletes the version under `key` only while its stamps are still `stamps` (EncodeStamps): a
  // lookup that found its copy stale must not delete the version a build has just put in its place.
  absl::Status DeleteDatasetVersionIfStamps(const std::string& key, const std::string& stamps);
  // Stores `csv` under `hash` (its Sha256Hex) unless that content is stored already.
  // `deflated`, when not empty, is DeflateManifest(csv).
  absl::Status PutManifest(const std::string& hash, const std::string& csv, const std::string& deflated = "");

  // Removes a job with its tasks, metric points and checkpoints (the manifests no task refers to
  // any more stay until SweepManifests).
  absl::Status DeleteJob(const std::string& job_id);

  // Readers (each takes the lock itself).
  absl::StatusOr<std::vector<JobRow>> LoadJobs();     // submission order
  absl::StatusOr<std::vector<TaskRow>> LoadTasks();   // job order, then DAG order
  absl::StatusOr<std::vector<GroupRow>> LoadGroups();
  absl::StatusOr<TaskPayload> LoadTaskPayload(const std::string& task_id);
  // The dataset version recorded under `key`, if any.
  absl::StatusOr<std::optional<DatasetVersionRow>> LoadDatasetVersion(const std::string& key);
  // Whether a manifest is stored under `hash`.
  absl::StatusOr<bool> HasManifest(const std::string& hash);
  // The manifest stored under `hash`, inflated; NOT_FOUND when there is none, DATA_LOSS when the
  // stored bytes do not inflate to their recorded size.
  absl::StatusOr<std::string> LoadManifest(const std::string& hash);
  // The inflated size of the manifest stored under `hash`; NOT_FOUND when there is none.
  absl::StatusOr<int64_t> ManifestSize(const std::string& hash);
  // How many manifests are stored and their stored (deflated) bytes.
  struct ManifestStats {
    int64_t count = 0;
    int64_t stored_bytes = 0;
  };
  absl::StatusOr<ManifestStats> GetManifestStats();
  absl::StatusOr<int64_t> GetCounter(const std::string& name);  // 0 when never set
  // The epoch-end points of a job's tasks, in insertion order. Damaged points are left out (and
  // counted for TakeDamagedRows); `damaged`, when given, gets how many this call left out.
  absl::StatusOr<std::vector<PointRow>> LoadEpochEnds(const std::string& job_id, int64_t* damaged = nullptr);
  // One task's epoch-end points, in insertion order (`damaged` as above).
  absl::StatusOr<std::vector<PointRow>> LoadTaskEpochEnds(const std::string& task_id, int64_t* damaged = nullptr);
  // Per task, its latest epoch-end point (for restoring gauges).
  absl::StatusOr<std::map<std::string, PointRow>> LoadLatestEpochEnds();
  // The last stored point of each (task, attempt).
  absl::StatusOr<std::vector<PointRow>> LoadLastPoints();
  // Checkpoints of a task, oldest first (path, epoch, best).
  struct CheckpointRow {
    std::string path;
    int epoch = 0;
    bool best = false;
    int attempt = 0;
  };
  absl::StatusOr<std::vector<CheckpointRow>> LoadCheckpoints(const std::string& task_id);
  // The checkpoints of every task of a job (task ids "<job_id>/..."), by task, each oldest
  // first: one query (the console's job page asked once per task, 1,024 for a big sweep).
  absl::StatusOr<std::map<std::string, std::vector<CheckpointRow>>> LoadJobCheckpoints(const std::string& job_id);

  // A damaged job or task row (its info does not parse) fails its reader with DATA_LOSS naming
  // the row: the scheduler cannot go on without it. A damaged group row or metric point is
  // history or a registration the group renews, so the readers skip it and count it here, each
  // row once: TakeDamagedRows returns how many were found since the last call and describes the
  // first few. (They stay in the file, for whoever restores it. A start reads the groups and each
  // task's newest points, and names the damaged ones; an older epoch end is met, and named, by
  // the first history read of its job after a start.)
  int64_t TakeDamagedRows(std::vector<std::string>* described);

 private:
  Store(std::string path, sqlite3* db, int lock_fd)
      : path_(std::move(path)), db_(db), lock_fd_(lock_fd) {}
  absl::Status Exec(const char* sql);
  absl::Status InitSchema();
  // PRAGMA user_version and the number of tables.
  absl::Status ReadSchemaVersion(int64_t* version, int64_t* tables);
  // FAILED_PRECONDITION, before anything is written to the file, for a database of tables
  // without aviary's schema version, of a version this coordinator does not read (newer), or of
  // versions 1 to 3 without that version's tables.
  absl::Status CheckIsOursOrEmpty();
  // Schema 1 -> 2 (see kStoreSchemaVersion), inside InitSchema's transaction.
  absl::Status MigrateFromVersion1();
  // Schema 2 -> 3, likewise.
  absl::Status MigrateFromVersion2();
  // Every table and index of the schema is there as created, and nothing else: a damaged
  // database is refused at start, naming what differs, not at the first write to it.
  absl::Status VerifySchema();
  absl::Status SqlError(int rc, const std::string& statement) const;
  absl::Status CheckOpen() const;
  // Rolls back the open transaction after `cause` (the failed body or COMMIT); returns `cause`, or
  // more when the ROLLBACK itself failed (then the store refuses every later call).
  absl::Status RollBack(const absl::Status& cause);
  void Broke();  // under mu_: broken_ was just set (Transaction calls it; RollBack only sets broken_)
  // True (and counted) when `parsed` failed; called with mu_ held.
  bool SkipDamaged(const absl::Status& parsed, const std::string& row);
  static std::string PointLabel(int64_t id, const std::string& task_id);
  // The epoch-end points whose `column` ("job_id" or "task_id") is `value`, in insertion order.
  absl::StatusOr<std::vector<PointRow>> LoadEpochEndsWhere(const char* column, const std::string& value,
                                                           int64_t* damaged);

  class Statement;
  // The checkpoint in `st`'s current row, its path in column `first` (then epoch, best, attempt).
  static CheckpointRow CheckpointAt(Statement& st, int first);
  static constexpr size_t kMaxDamagedRowsKept = 8;

  const std::string path_;
  sqlite3* db_ = nullptr;
  int lock_fd_ = -1;
  int64_t upgraded_from_ = 0;
  std::string upgrade_backup_;
  bool in_transaction_ = false;
  // INTERNAL unless a Transaction() runs on this thread (every mutator's first check).
  absl::Status RequireTransaction(const char* mutator);
  absl::Status broken_;  // guarded by mu_: set when a ROLLBACK failed (RollBack); CheckOpen says it
  std::function<void(const absl::Status&)> on_broken_;  // guarded by mu_
  bool broken_said_ = false;                            // guarded by mu_: on_broken_ was called
  std::recursive_mutex mu_;
  int64_t damaged_rows_skipped_ = 0;        // guarded by mu_
  std::vector<std::string> damaged_rows_;  // guarded by mu_
  std::set<std::string> damaged_seen_;     // guarded by mu_: the rows counted
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_STORE_H_
