#include "coordinator/store.h"

#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "common/status.h"
#include "coordinator/content_hash.h"

namespace aviary::coordinator {

namespace fs = std::filesystem;

namespace {

// A manifest is stored deflated: "AVZ1", the inflated size (8 bytes, little-endian), then zlib's
// stream. A pool manifest of 133,000 paths is ~13 MB of CSV and a tenth of that deflated. Rows
// written before compression hold the CSV itself and are read as they are. Since schema 2 each
// content is stored once, in the manifests table under its SHA-256, and tasks refer to it.
constexpr char kManifestMagic[] = "AVZ1";
constexpr size_t kManifestHeader = 4 + 8;

}  // namespace

std::string DeflateManifest(const std::string& csv) {
  if (csv.empty()) return csv;
  uLongf bound = compressBound(static_cast<uLong>(csv.size()));
  std::string out(kManifestHeader + bound, '\0');
  std::memcpy(&out[0], kManifestMagic, 4);
  const uint64_t size = csv.size();
  for (int i = 0; i < 8; ++i) out[4 + i] = static_cast<char>((size >> (8 * i)) & 0xff);
  const int rc = compress2(reinterpret_cast<Bytef*>(&out[kManifestHeader]), &bound,
                           reinterpret_cast<const Bytef*>(csv.data()), static_cast<uLong>(csv.size()), Z_BEST_SPEED);
  if (rc != Z_OK) return csv;  // only Z_MEM_ERROR is possible: store it as it is
  out.resize(kManifestHeader + bound);
  return out;
}

namespace {

absl::StatusOr<std::string> DecompressManifest(const std::string& stored, const std::string& where) {
  if (stored.size() < kManifestHeader || stored.compare(0, 4, kManifestMagic) != 0) return stored;
  uint64_t size = 0;
  for (int i = 0; i < 8; ++i) size |= static_cast<uint64_t>(static_cast<unsigned char>(stored[4 + i])) << (8 * i);
  // zlib inflates at most ~1032 times its input: a larger size is a damaged header, which would
  // otherwise ask for up to 64 GiB here (and end the coordinator with bad_alloc).
  const uint64_t deflated = stored.size() - kManifestHeader;
  if (size > (uint64_t{1} << 36) || size > deflated * 1032 + 1024) {
    return absl::DataLossError(
        absl::StrCat(where, ": manifest claims ", size, " bytes from ", deflated, " deflated (a damaged header)"));
  }
  std::string csv(size, '\0');
  uLongf got = static_cast<uLongf>(size);
  const int rc = uncompress(reinterpret_cast<Bytef*>(csv.data()), &got,
                            reinterpret_cast<const Bytef*>(stored.data() + kManifestHeader),
                            static_cast<uLong>(stored.size() - kManifestHeader));
  if (rc != Z_OK || got != size) {
    return absl::DataLossError(absl::StrCat(where, ": the stored manifest does not inflate (zlib ", rc, ", ", got,
                                            " of ", size, " bytes)"));
  }
  return csv;
}

constexpr int kBusyTimeoutMs = 10000;

constexpr const char* kSchema[] = {
    "CREATE TABLE jobs ("
    "  job_id TEXT PRIMARY KEY,"
    "  seq INTEGER NOT NULL,"
    "  state INTEGER NOT NULL,"
    "  info BLOB NOT NULL)",
    "CREATE TABLE tasks ("
    "  task_id TEXT PRIMARY KEY,"
    "  job_id TEXT NOT NULL,"
    "  seq INTEGER NOT NULL,"
    "  state INTEGER NOT NULL,"
    "  group_id TEXT NOT NULL,"
    "  depends_on TEXT NOT NULL,"
    "  init_checkpoint TEXT NOT NULL,"
    "  resume_checkpoint TEXT NOT NULL,"
    "  info BLOB NOT NULL,"
    "  manifest_csv BLOB NOT NULL,"
    "  pipeline_yaml TEXT NOT NULL)",
    "CREATE INDEX tasks_by_job ON tasks(job_id, seq)",
    "CREATE TABLE groups ("
    "  group_id TEXT PRIMARY KEY,"
    "  task_id TEXT NOT NULL,"
    "  registered_unix_ms INTEGER NOT NULL,"
    "  info BLOB NOT NULL)",
    "CREATE TABLE metric_points ("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  job_id TEXT NOT NULL,"
    "  task_id TEXT NOT NULL,"
    "  attempt INTEGER NOT NULL,"
    "  time_unix_ms INTEGER NOT NULL,"
    "  epoch INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  epoch_end INTEGER NOT NULL,"
    "  metrics BLOB NOT NULL)",
    "CREATE INDEX metric_points_by_job ON metric_points(job_id, epoch_end, id)",
    "CREATE INDEX metric_points_by_task ON metric_points(task_id, epoch_end, id)",
    "CREATE TABLE checkpoints ("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  task_id TEXT NOT NULL,"
    "  attempt INTEGER NOT NULL,"
    "  path TEXT NOT NULL,"
    "  epoch INTEGER NOT NULL,"
    "  best INTEGER NOT NULL,"
    "  time_unix_ms INTEGER NOT NULL)",
    "CREATE INDEX checkpoints_by_task ON checkpoints(task_id, id)",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
};

// Schema 2: manifests stored once per content (hash -> deflated CSV, `size` = inflated bytes),
// tasks refer to theirs by hash. A new database runs kSchema and then these, so that its schema
// is, as text, the one a migrated version-1 database has.
constexpr const char* kSchemaV2[] = {
    "CREATE TABLE manifests ("
    "  hash TEXT PRIMARY KEY,"
    "  size INTEGER NOT NULL,"
    "  data BLOB NOT NULL)",
    "ALTER TABLE tasks ADD COLUMN manifest_hash TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX tasks_by_manifest ON tasks(manifest_hash)",
};

// Schema 3: the fold cache's dataset versions (coordinator/fold_cache.h), so that a restarted
// coordinator reuses the manifests of an unchanged dataset. `stamps` is the fold cache's
// encoding of its files' stat stamps.
constexpr const char* kSchemaV3[] = {
    "CREATE TABLE dataset_versions ("
    "  key TEXT PRIMARY KEY,"
    "  created_unix_ms INTEGER NOT NULL,"
    "  stamps BLOB NOT NULL)",
    "CREATE TABLE dataset_version_manifests ("
    "  key TEXT NOT NULL,"
    "  fold INTEGER NOT NULL,"
    "  hash TEXT NOT NULL,"
    "  size INTEGER NOT NULL,"
    "  PRIMARY KEY (key, fold))",
    "CREATE INDEX dataset_version_manifests_by_hash ON dataset_version_manifests(hash)",
};

// The schema objects of `db` (tables and indices, SQLite's own excluded): "table jobs" -> its
// CREATE statement as stored.
absl::StatusOr<std::map<std::string, std::string>> SchemaObjects(sqlite3* db, const std::string& what) {
  sqlite3_stmt* stmt = nullptr;
  const char* sql =
      "SELECT type, name, sql FROM sqlite_master WHERE substr(name, 1, 7) <> 'sqlite_' ORDER BY type, name";
  int rc = sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr);
  if (rc != SQLITE_OK) {
    return absl::InternalError(absl::StrCat(what, ": ", sql, ": ", sqlite3_errmsg(db)));
  }
  std::map<std::string, std::string> objects;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    auto text = [stmt](int column) {
      const unsigned char* t = sqlite3_column_text(stmt, column);
      return t == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(t));
    };
    objects[absl::StrCat(text(0), " ", text(1))] = text(2);
  }
  const std::string error = rc == SQLITE_DONE ? "" : sqlite3_errmsg(db);
  sqlite3_finalize(stmt);
  if (rc != SQLITE_DONE) return absl::InternalError(absl::StrCat(what, ": ", sql, ": ", error));
  return objects;
}

// The objects schema version `version` (1 to kStoreSchemaVersion) creates, read back from an
// in-memory database.
absl::StatusOr<std::map<std::string, std::string>> ExpectedSchema(int64_t version = kStoreSchemaVersion) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open(":memory:", &db);
  if (rc != SQLITE_OK) {
    sqlite3_close(db);
    return absl::InternalError(absl::StrCat("sqlite3_open(:memory:): ", sqlite3_errstr(rc)));
  }
  std::vector<const char*> statements(std::begin(kSchema), std::end(kSchema));
  if (version >= 2) statements.insert(statements.end(), std::begin(kSchemaV2), std::end(kSchemaV2));
  if (version >= 3) statements.insert(statements.end(), std::begin(kSchemaV3), std::end(kSchemaV3));
  for (const char* sql : statements) {
    char* error = nullptr;
    rc = sqlite3_exec(db, sql, nullptr, nullptr, &error);
    if (rc != SQLITE_OK) {
      std::string message = error != nullptr ? error : sqlite3_errstr(rc);
      sqlite3_free(error);
      sqlite3_close(db);
      return absl::InternalError(absl::StrCat("the schema in memory: ", sql, ": ", message));
    }
  }
  auto objects = SchemaObjects(db, "the schema in memory");
  sqlite3_close(db);
  return objects;
}

std::string Serialize(const google::protobuf::MessageLite& message) {
  std::string out;
  message.SerializeToString(&out);
  return out;
}

}  // namespace

// A prepared statement; finalized on destruction. Binds are 1-based as in sqlite.
class Store::Statement {
 public:
  Statement(Store* store, const char* sql) : store_(store), sql_(sql) {
    rc_ = sqlite3_prepare_v2(store->db_, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  absl::Status status() const {
    return rc_ == SQLITE_OK ? absl::OkStatus() : store_->SqlError(rc_, sql_);
  }
  void Bind(int index, int64_t value) {
    Keep(sqlite3_bind_int64(stmt_, index, value));
  }
  void Bind(int index, const std::string& text) {
    // 64-bit lengths: an int cast of a value past 2 GiB went negative (read to a NUL) or wrapped
    // (4 GiB + 100 bytes stored as 100); SQLite refuses what passes its own limit (SQLITE_TOOBIG).
    Keep(sqlite3_bind_text64(stmt_, index, text.data(), static_cast<sqlite3_uint64>(text.size()), SQLITE_TRANSIENT,
                             SQLITE_UTF8));
  }
  void BindBlob(int index, const std::string& bytes) {
    Keep(sqlite3_bind_blob64(stmt_, index, bytes.data(), static_cast<sqlite3_uint64>(bytes.size()),
                             SQLITE_TRANSIENT));
  }
  // Steps once: true with a row, false when done; errors go to *status.
  bool Step(absl::Status* status) {
    if (rc_ != SQLITE_OK) {
      *status = this->status();
      return false;
    }
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc != SQLITE_DONE) *status = store_->SqlError(rc, sql_);
    return false;
  }
  // Runs a statement that returns no rows.
  absl::Status Run() {
    absl::Status status;
    while (Step(&status)) {
    }
    return status;
  }
  int64_t Int(int column) const { return sqlite3_column_int64(stmt_, column); }
  std::string Text(int column) const {
    const void* data = sqlite3_column_blob(stmt_, column);
    const int size = sqlite3_column_bytes(stmt_, column);
    return data == nullptr ? std::string() : std::string(static_cast<const char*>(data), size);
  }
  // `row` names the row in the error ("task j.../finetune-f0").
  template <typename M>
  absl::Status Parse(int column, M* message, const std::string& row) const {
    if (!message->ParseFromString(Text(column))) {
      return absl::DataLossError(absl::StrCat(
          "database ", store_->path_, ": ", row, ": its column ",
          sqlite3_column_name(stmt_, column), " does not parse as ", message->GetTypeName(),
          " (statement '", sql_, "'); the file is damaged",
          store_->upgraded_from_ == 0
              ? std::string(": nothing was changed")
              : absl::StrCat(" (its schema was upgraded from version ", store_->upgraded_from_,
                             " at this start; the file from before is ", store_->upgrade_backup_, ")"),
          "; restore it from a backup (docs/DEPLOY.md, \"Failures\")"));
    }
    return absl::OkStatus();
  }

 private:
  void Keep(int rc) {
    if (rc_ == SQLITE_OK && rc != SQLITE_OK) rc_ = rc;
  }
  Store* store_;
  const char* sql_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_ = SQLITE_OK;
};

absl::Status Store::SqlError(int rc, const std::string& statement) const {
  const char* detail = db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
  const std::string text = absl::StrCat("database ", path_, ": statement '", statement, "' failed: ",
                                        sqlite3_errstr(rc), " (", rc, "): ", detail);
  switch (rc & 0xff) {
    case SQLITE_NOTADB:
      // Another program's file (a config, a log): the user's to fix, which a restart does not
      // (exit 2, as for a SQLite file that is not aviary's).
      return absl::FailedPreconditionError(absl::StrCat(
          text, ": not an SQLite file (another program's file, or an aviary database whose header is damaged: "
                "restore that from a backup); it was not changed"));
    case SQLITE_CORRUPT:
      // A damaged page: reading it again gets the same answer. DATA_LOSS is permanent to the
      // scheduler (a lease whose manifest cannot be read fails its task, not retried for ever).
      return absl::DataLossError(
          absl::StrCat(text, ": the file is damaged; restore it from a backup (docs/DEPLOY.md, \"Failures\")"));
    case SQLITE_BUSY:
      // Another program (an sqlite3 shell, a backup tool) holds the database's lock past the busy
      // timeout: transient, as UNAVAILABLE says to a client that retries (INTERNAL did not).
      return absl::UnavailableError(absl::StrCat(
          text, ": another program holds the database's lock (an sqlite3 shell or a backup); try again"));
    case SQLITE_FULL:
      return absl::ResourceExhaustedError(absl::StrCat(text, ": the disk is full"));
    default:
      return absl::InternalError(text);
  }
}

bool Store::SkipDamaged(const absl::Status& parsed, const std::string& row) {
  if (parsed.ok()) return false;
  // Counted once, however many readers meet the row (Restore reads the points twice).
  if (!damaged_seen_.insert(row).second) return true;
  ++damaged_rows_skipped_;
  if (damaged_rows_.size() < kMaxDamagedRowsKept) damaged_rows_.emplace_back(parsed.message());
  return true;
}

std::string Store::PointLabel(int64_t id, const std::string& task_id) {
  return absl::StrCat("metric point ", id, " (task ", task_id, ")");
}

int64_t Store::TakeDamagedRows(std::vector<std::string>* described) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  const int64_t count = damaged_rows_skipped_;
  if (described != nullptr) *described = std::move(damaged_rows_);
  damaged_rows_.clear();
  damaged_rows_skipped_ = 0;
  return count;
}

absl::Status Store::CheckOpen() const {
  if (db_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("database ", path_, " is closed"));
  }
  return broken_;
}

absl::Status Store::Exec(const char* sql) {
  char* error = nullptr;
  const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &error);
  sqlite3_free(error);  // the same text as sqlite3_errmsg, which SqlError reads
  // Coded as a statement's error is (a BEGIN IMMEDIATE that met another program's lock was
  // INTERNAL, a COMMIT on a full disk too).
  return rc == SQLITE_OK ? absl::OkStatus() : SqlError(rc, sql);
}

absl::StatusOr<std::unique_ptr<Store>> Store::Open(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("database path is empty");
  // A folder named as the database: sqlite's "unable to open database file", twice, named no cause.
  if (struct stat st = {}; ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("database ", path, ": a folder, not a database file (name a file in it, e.g. ", path,
                     "/aviary.db)"));
  }
  // The lock sits next to the file the path resolves to, so that two coordinators that name one
  // database by different paths (a symlink, "..") still exclude each other.
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec || resolved.empty()) resolved = path;
  const std::string lock_path = resolved.string() + ".lock";
  const int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd < 0) {
    const int error = errno;
    const std::string what =
        absl::StrCat("database ", path, ": cannot open lock file ", lock_path, ": ", std::strerror(error));
    // The folder's or the file's permissions, a read-only filesystem: the user's to fix (exit 2).
    if (error == EACCES || error == EPERM || error == EROFS) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " (the coordinator's user must be able to create and write files in the database's folder)"));
    }
    // A folder that is not there (a typo, a share not mounted): the user's to fix too, as a port
    // file's missing folder is (exit 2: a restart every few seconds would not make it).
    if (error == ENOENT || error == ENOTDIR) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, " (its folder ", resolved.parent_path().string(), " is not there or is not a folder)"));
    }
    return absl::InternalError(what);
  }
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    ::close(lock_fd);
    if (error == EWOULDBLOCK) {
      // UNAVAILABLE: it may end (an old coordinator still stopping), and a restart waits for it.
      return absl::UnavailableError(absl::StrCat(
          "database ", path, " is in use by another coordinator (", lock_path, " is locked)"));
    }
    return absl::InternalError(absl::StrCat("database ", path, ": flock ", lock_path, ": ",
                                            std::strerror(error)));
  }
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &db,
                                 SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                                 nullptr);
  if (rc != SQLITE_OK) {
    std::string detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    ::close(lock_fd);
    return absl::InternalError(
        absl::StrCat("database ", path, ": cannot open: ", sqlite3_errstr(rc), ": ", detail));
  }
  std::unique_ptr<Store> store(new Store(path, db, lock_fd));
  const int busy_rc = sqlite3_busy_timeout(db, kBusyTimeoutMs);
  if (busy_rc != SQLITE_OK) return store->SqlError(busy_rc, "sqlite3_busy_timeout");
  // SQLITE_OPEN_READWRITE falls back to read-only when the file is not writable (a backup
  // restored by root into the folder of a service that runs as another user): the coordinator
  // started, said it listened, and failed every write after it.
  if (sqlite3_db_readonly(db, "main") == 1) {
    struct stat st = {};
    std::string owner = "unknown owner";
    if (::stat(path.c_str(), &st) == 0) {
      owner = absl::StrCat("owner uid ", st.st_uid, ", mode ", absl::StrFormat("%04o", st.st_mode & 07777));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "database ", path, " is read-only for this coordinator (uid ", ::geteuid(), "; the file: ", owner,
        "): it must be able to write the file and create ", path, "-wal and -shm next to it"));
  }
  // A writable file in a folder this user cannot write: SQLite opened it, then the first write
  // failed with "attempt to write a readonly database" (it cannot create or remove the -wal).
  const std::string folder = resolved.has_parent_path() ? resolved.parent_path().string() : std::string(".");
  if (::access(folder.c_str(), W_OK | X_OK) != 0) {
    const int error = errno;
    return absl::FailedPreconditionError(absl::StrCat(
        "database ", path, ": its folder ", folder, " is not writable for this coordinator (uid ", ::geteuid(),
        "; ", std::strerror(error), "): SQLite creates and removes ", path, "-wal and -shm there"));
  }
  // A file that is not ours, or that a newer coordinator wrote, is refused before anything is
  // written to it (the journal mode is).
  AVIARY_RETURN_IF_ERROR(store->CheckIsOursOrEmpty());
  // journal_mode returns a row with the mode in effect; check that WAL was accepted.
  {
    Statement wal(store.get(), "PRAGMA journal_mode=WAL");
    absl::Status status;
    if (!wal.Step(&status)) {
      if (!status.ok()) return status;
      return absl::InternalError(absl::StrCat("database ", path, ": PRAGMA journal_mode=WAL returned no row"));
    }
    if (wal.Text(0) != "wal") {
      return absl::FailedPreconditionError(absl::StrCat(
          "database ", path, ": cannot use the WAL journal (got '", wal.Text(0), "')"));
    }
  }
  AVIARY_RETURN_IF_ERROR(store->Exec("PRAGMA synchronous=FULL"));
  // The -wal file is truncated back to 64 MB at checkpoints: one large transaction (a migration,
  // a sweep's submit, a prune) kept it at its peak size until shutdown.
  AVIARY_RETURN_IF_ERROR(store->Exec("PRAGMA journal_size_limit=67108864"));
  AVIARY_RETURN_IF_ERROR(store->Exec("PRAGMA foreign_keys=ON"));
  AVIARY_RETURN_IF_ERROR(store->InitSchema());
  return store;
}

absl::Status Store::ReadSchemaVersion(int64_t* version, int64_t* tables) {
  *version = 0;
  *tables = 0;
  {
    Statement st(this, "PRAGMA user_version");
    absl::Status status;
    if (st.Step(&status)) *version = st.Int(0);
    AVIARY_RETURN_IF_ERROR(status);
  }
  // Every schema object, not only tables: a file holding only a view or a trigger is not empty.
  Statement st(this, "SELECT count(*) FROM sqlite_master WHERE substr(name, 1, 7) <> 'sqlite_'");
  absl::Status status;
  if (st.Step(&status)) *tables = st.Int(0);
  return status;
}

absl::Status Store::CheckIsOursOrEmpty() {
  int64_t version = 0;
  int64_t tables = 0;
  AVIARY_RETURN_IF_ERROR(ReadSchemaVersion(&version, &tables));
  if (version == 0) {
    if (tables == 0) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "database ", path_, " holds ", tables,
        " schema objects (tables, views, indices, triggers) but no aviary schema version (PRAGMA user_version = 0): not an aviary database"));
  }
  if (version < 0 || version > kStoreSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "database ", path_, " has schema version ", version, " (PRAGMA user_version); this coordinator reads "
        "versions 1 to ", kStoreSchemaVersion, ": a newer coordinator's file (run that coordinator, or use a "
        "new database file) or not an aviary database; it was not changed"));
  }
  // Versions 1 to 3: another program's file can carry a small user_version too. Every table of
  // that version must be there (by name: the migration checks the rest); version 3 is checked
  // whole, as after a migration.
  if (version == kStoreSchemaVersion) return VerifySchema();
  AVIARY_ASSIGN_OR_RETURN(auto expected, ExpectedSchema(version));
  AVIARY_ASSIGN_OR_RETURN(auto actual, SchemaObjects(db_, absl::StrCat("database ", path_)));
  for (const auto& [name, sql] : expected) {
    if (name.compare(0, 6, "table ") == 0 && !actual.count(name)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "database ", path_, " has schema version ", version, " but no ", name,
          " of that version: not an aviary database, or a damaged one; it was not changed"));
    }
  }
  return absl::OkStatus();
}

absl::Status Store::InitSchema() {
  int64_t version = 0;
  int64_t tables = 0;
  AVIARY_RETURN_IF_ERROR(ReadSchemaVersion(&version, &tables));
  if (version == kStoreSchemaVersion) return VerifySchema();
  if (version == 1 || version == 2) {
    // The upgrade is one way (the coordinator that wrote the file refuses version 3): the file as
    // it was is copied first, for a rollback to that release.
    std::string backup = absl::StrCat(path_, ".v", version, ".bak");
    for (int n = 2; fs::exists(backup); ++n) backup = absl::StrCat(path_, ".v", version, ".", n, ".bak");
    {
      // Copied under a name of its own and renamed once whole: a coordinator killed during the
      // copy (SIGKILL after systemd's stop timeout, a power cut) left a truncated file under the
      // name DEPLOY.md tells operators to roll back onto. A killed copy's leftover goes first.
      const std::string partial = backup + ".partial";
      ::unlink(partial.c_str());
      Statement vacuum(this, "VACUUM INTO ?1");
      vacuum.Bind(1, partial);
      absl::Status copied = vacuum.Run();
      // VACUUM INTO does not fsync its file: made durable before the upgrade commits (a power
      // loss kept the upgraded database and a truncated copy).
      if (copied.ok()) {
        const int fd = ::open(partial.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0 || ::fsync(fd) != 0) {
          copied = absl::InternalError(absl::StrCat("fsync ", partial, ": ", std::strerror(errno)));
        }
        if (fd >= 0) ::close(fd);
      }
      if (copied.ok() && ::rename(partial.c_str(), backup.c_str()) != 0) {
        copied = absl::InternalError(absl::StrCat("rename ", partial, " to ", backup, ": ", std::strerror(errno)));
      }
      if (copied.ok()) copied = common::SyncFolder(fs::path(backup).parent_path().string());
      if (!copied.ok()) {
        ::unlink(partial.c_str());  // a partial copy (a full disk) is no backup
        ::unlink(backup.c_str());
        return absl::Status(copied.code(), absl::StrCat("schema upgrade from version ", version, ": the copy of the "
                                                        "file before it, ", backup, ", could not be written: ",
                                                        copied.message(), "; nothing was changed"));
      }
    }
    // A failed upgrade leaves the file as it was, and no copy: a coordinator restarted on it
    // again and again (systemd) made a full copy each time.
    bool body_done = false;  // the failure, if any, is the COMMIT's
    absl::Status upgraded = Transaction([&]() -> absl::Status {
      if (version == 1) AVIARY_RETURN_IF_ERROR(MigrateFromVersion1());
      AVIARY_RETURN_IF_ERROR(MigrateFromVersion2());
      // Verified before the version is written: a file that does not end up as version 3 (an
      // object added by hand) stays the version it was, for the coordinator that wrote it.
      AVIARY_RETURN_IF_ERROR(VerifySchema());
      const std::string pragma = absl::StrCat("PRAGMA user_version=", kStoreSchemaVersion);
      AVIARY_RETURN_IF_ERROR(Exec(pragma.c_str()));
      body_done = true;
      return absl::OkStatus();
    });
    if (!upgraded.ok()) {
      // A COMMIT that failed in I/O (the WAL's fsync: SQLITE_IOERR_*, whose text SqlError puts
      // in the message) may still be replayed at the next open, the upgrade then done after all:
      // the copy from before is kept, and said so. Any other failure (a full disk, a busy
      // database) left the file as it was: the copy goes, as after a failed body.
      if (body_done && absl::StrContains(upgraded.message(), sqlite3_errstr(SQLITE_IOERR))) {
        return absl::Status(upgraded.code(), absl::StrCat(upgraded.message(), " (schema upgrade from version ", version,
                                                          ": the copy of the file before it is kept: ", backup, ")"));
      }
      ::unlink(backup.c_str());
      return upgraded;
    }
    upgraded_from_ = version;
    upgrade_backup_ = backup;
    return absl::OkStatus();
  }
  AVIARY_RETURN_IF_ERROR(CheckIsOursOrEmpty());  // (checked in Open already; cheap)
  if (version != 0) return absl::InternalError(absl::StrCat("database ", path_, ": schema version ", version));
  return Transaction([&]() -> absl::Status {
    for (const char* sql : kSchema) AVIARY_RETURN_IF_ERROR(Exec(sql));
    for (const char* sql : kSchemaV2) AVIARY_RETURN_IF_ERROR(Exec(sql));
    for (const char* sql : kSchemaV3) AVIARY_RETURN_IF_ERROR(Exec(sql));
    const std::string pragma = absl::StrCat("PRAGMA user_version=", kStoreSchemaVersion);
    return Exec(pragma.c_str());
  });
}

absl::Status Store::MigrateFromVersion1() {
  for (const char* sql : kSchemaV2) AVIARY_RETURN_IF_ERROR(Exec(sql));
  std::vector<std::string> task_ids;
  {
    Statement st(this, "SELECT task_id FROM tasks WHERE length(manifest_csv) > 0 ORDER BY rowid");
    absl::Status status;
    while (st.Step(&status)) task_ids.push_back(st.Text(0));
    AVIARY_RETURN_IF_ERROR(status);
  }
  for (const std::string& task_id : task_ids) {
    std::string stored;
    {
      Statement st(this, "SELECT manifest_csv FROM tasks WHERE task_id=?1");
      st.Bind(1, task_id);
      absl::Status status;
      if (st.Step(&status)) stored = st.Text(0);
      AVIARY_RETURN_IF_ERROR(status);
    }
    absl::StatusOr<std::string> csv = DecompressManifest(stored, absl::StrCat("database ", path_, ": task ", task_id));
    if (!csv.ok()) continue;  // stays in the row: leasing it reports the DATA_LOSS
    const std::string hash = Sha256Hex(*csv);
    AVIARY_RETURN_IF_ERROR(PutManifest(hash, *csv));
    Statement st(this, "UPDATE tasks SET manifest_hash=?2, manifest_csv=x'' WHERE task_id=?1");
    st.Bind(1, task_id);
    st.Bind(2, hash);
    AVIARY_RETURN_IF_ERROR(st.Run());
  }
  return absl::OkStatus();
}

absl::Status Store::MigrateFromVersion2() {
  for (const char* sql : kSchemaV3) AVIARY_RETURN_IF_ERROR(Exec(sql));
  return absl::OkStatus();
}

absl::Status Store::VerifySchema() {
  AVIARY_ASSIGN_OR_RETURN(auto expected, ExpectedSchema(kStoreSchemaVersion));
  AVIARY_ASSIGN_OR_RETURN(auto actual, SchemaObjects(db_, absl::StrCat("database ", path_)));
  const std::string hint = " (a damaged database, or one changed by hand: restore a backup or use a new file)";
  // Tables first: a dropped table takes its indices with it.
  for (const char* kind : {"table ", "index "}) {
    for (const auto& [name, sql] : expected) {
      if (name.compare(0, std::strlen(kind), kind) != 0) continue;
      auto it = actual.find(name);
      if (it == actual.end()) {
        return absl::FailedPreconditionError(absl::StrCat("database ", path_, ": ", name, " is missing", hint));
      }
      if (it->second != sql) {
        return absl::FailedPreconditionError(absl::StrCat("database ", path_, ": ", name, " is `", it->second,
                                                          "`, expected `", sql, "`", hint));
      }
    }
  }
  for (const auto& [name, sql] : actual) {
    if (!expected.count(name)) {
      return absl::FailedPreconditionError(
          absl::StrCat("database ", path_, ": unexpected ", name, " (not in schema version ",
                       kStoreSchemaVersion, ")", hint));
    }
  }
  return absl::OkStatus();
}

Store::~Store() { (void)Close(); }

absl::Status Store::Close() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (db_ == nullptr) return absl::OkStatus();
  const int rc = sqlite3_close(db_);
  if (rc != SQLITE_OK) {
    absl::Status status = SqlError(rc, "sqlite3_close");
    return status;
  }
  db_ = nullptr;
  if (lock_fd_ >= 0) {
    ::close(lock_fd_);  // releases the flock
    lock_fd_ = -1;
  }
  return absl::OkStatus();
}

absl::Status Store::RequireTransaction(const char* mutator) {
  // Blocks while another thread's transaction runs (the connection is theirs), then finds none.
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (in_transaction_) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(
      "database ", path_, ": Store::", mutator,
      " called outside Transaction() (a bug: the change would commit on its own, beside another thread's)"));
}

absl::Status Store::Transaction(const std::function<absl::Status()>& body) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  if (in_transaction_) return body();  // nested: part of the enclosing transaction
  AVIARY_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  in_transaction_ = true;
  absl::Status status;
  try {
    status = body();
  } catch (...) {
    // An exception (std::bad_alloc in a large submit) that gRPC turns into UNKNOWN and the server
    // outlives: left open, every later Transaction took the nested branch and nothing was ever
    // committed again.
    in_transaction_ = false;
    (void)RollBack(absl::UnknownError("an exception"));
    if (!broken_.ok()) Broke();
    throw;
  }
  bool commit_failed = false;
  if (status.ok()) {
    status = Exec("COMMIT");
    commit_failed = !status.ok();
  }
  in_transaction_ = false;
  if (commit_failed && (sqlite3_extended_errcode(db_) & 0xff) == SQLITE_IOERR) {
    // A COMMIT that failed in its I/O (the WAL's fsync: EIO) may still be on disk: its frames
    // can stay in the -wal file and be replayed at the next open. Taken for rolled back, the
    // caller left memory without the change and its client retried: a second copy of a job
    // after a restart. What the file holds is known again only by reading it back.
    (void)RollBack(status);
    const std::string then = broken_.ok() ? "" : absl::StrCat("; then ", broken_.message());
    broken_ = absl::InternalError(absl::StrCat(
        "database ", path_, ": a COMMIT failed with an I/O error (", status.message(),
        "); whether it reached the disk is unknown: the coordinator must be restarted (it reads the file back), "
        "and the disk checked", then));
    Broke();
    return broken_;
  }
  if (!status.ok()) {
    absl::Status rolled = RollBack(status);
    if (!broken_.ok()) Broke();
    return rolled;
  }
  return absl::OkStatus();
}

void Store::SetOnBroken(std::function<void(const absl::Status&)> on_broken) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  on_broken_ = std::move(on_broken);
  if (!broken_.ok()) Broke();
}

void Store::Broke() {
  if (on_broken_ && !broken_said_) {
    broken_said_ = true;
    on_broken_(broken_);
  }
}

absl::Status Store::RollBack(const absl::Status& cause) {
  if (sqlite3_get_autocommit(db_)) return cause;  // SQLite rolled back itself (FULL, IOERR, BUSY)
  absl::Status rollback = Exec("ROLLBACK");
  if (!rollback.ok() && !sqlite3_get_autocommit(db_)) rollback = Exec("ROLLBACK");  // once more
  if (!sqlite3_get_autocommit(db_)) {
    // Still inside the transaction: every later BEGIN would fail, and reads would see the failed
    // body's rows. Later calls get this error; a restart rolls the file back.
    broken_ = absl::InternalError(absl::StrCat("database ", path_, ": a transaction could not be rolled back (",
                                               rollback.message(), "): the coordinator must be restarted"));
    return absl::InternalError(absl::StrCat(cause.message(), "; then ", broken_.message()));
  }
  if (!rollback.ok()) return absl::InternalError(absl::StrCat(cause.message(), "; then ", rollback.message()));
  return cause;
}

absl::Status Store::PutJob(const JobRow& job) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("PutJob"));
  Statement st(this,
               "INSERT INTO jobs(job_id, seq, state, info) VALUES(?1, ?2, ?3, ?4) "
               "ON CONFLICT(job_id) DO UPDATE SET state=excluded.state, info=excluded.info");
  st.Bind(1, job.info.job_id());
  st.Bind(2, job.seq);
  st.Bind(3, static_cast<int64_t>(job.info.state()));
  aviary::v1::JobInfo info = job.info;
  info.clear_tasks();
  st.BindBlob(4, Serialize(info));
  return st.Run();
}

absl::Status Store::InsertTask(const TaskRow& task, const TaskPayload& payload, const std::string& manifest_deflated) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("InsertTask"));
  Statement st(this,
               "INSERT INTO tasks(task_id, job_id, seq, state, group_id, depends_on, "
               "init_checkpoint, resume_checkpoint, info, manifest_csv, pipeline_yaml, manifest_hash) "
               "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, x'', ?10, ?11)");
  st.Bind(1, task.info.task_id());
  st.Bind(2, task.info.job_id());
  st.Bind(3, task.seq);
  st.Bind(4, static_cast<int64_t>(task.info.state()));
  st.Bind(5, task.info.group_id());
  st.Bind(6, task.depends_on);
  st.Bind(7, task.init_checkpoint);
  st.Bind(8, task.resume_checkpoint);
  st.BindBlob(9, Serialize(task.info));
  std::string hash = payload.manifest_hash;
  if (hash.empty() && !payload.manifest_csv.empty()) hash = Sha256Hex(payload.manifest_csv);
  st.Bind(10, payload.pipeline_yaml);
  st.Bind(11, hash);
  if (!hash.empty() && !IsSha256Hex(hash)) {
    return absl::InvalidArgumentError(absl::StrCat("database ", path_, ": task ", task.info.task_id(),
                                                   ": manifest hash '", hash, "' is not a SHA-256"));
  }
  if (!payload.manifest_csv.empty()) {
    AVIARY_RETURN_IF_ERROR(PutManifest(hash, payload.manifest_csv, manifest_deflated));
  } else if (!hash.empty()) {
    AVIARY_ASSIGN_OR_RETURN(bool stored, HasManifest(hash));
    if (!stored) {
      return absl::FailedPreconditionError(absl::StrCat("database ", path_, ": task ", task.info.task_id(),
                                                        " refers to manifest ", hash,
                                                        ", which is not stored"));
    }
  }
  return st.Run();
}

absl::Status Store::PutManifest(const std::string& hash, const std::string& csv, const std::string& deflated) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("PutManifest"));
  if (!IsSha256Hex(hash)) {
    return absl::InvalidArgumentError(absl::StrCat("database ", path_, ": manifest hash '", hash, "' is not a SHA-256"));
  }
  AVIARY_ASSIGN_OR_RETURN(bool stored, HasManifest(hash));
  if (stored) return absl::OkStatus();
  // New content is stored under its own address only (LoadManifest checks it again: a wrong
  // one was found out at a lease, as a FAILED task).
  if (const std::string got = Sha256Hex(csv); got != hash) {
    return absl::InvalidArgumentError(absl::StrCat("database ", path_, ": manifest hash ", hash, " is not the SHA-256 of its ",
                                                   csv.size(), " bytes (", got, ")"));
  }
  Statement st(this, "INSERT INTO manifests(hash, size, data) VALUES(?1, ?2, ?3)");
  st.Bind(1, hash);
  st.Bind(2, static_cast<int64_t>(csv.size()));
  st.BindBlob(3, deflated.empty() ? DeflateManifest(csv) : deflated);
  return st.Run();
}

absl::Status Store::SweepManifests(int64_t* manifests_deleted, int64_t* bytes_deleted) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("SweepManifests"));
  const char* unreferenced = "NOT EXISTS (SELECT 1 FROM tasks t WHERE t.manifest_hash = manifests.hash)";
  {
    const std::string sql = absl::StrCat("SELECT count(*), coalesce(sum(length(data)), 0) FROM manifests WHERE ",
                                         unreferenced);
    Statement st(this, sql.c_str());
    absl::Status status;
    if (st.Step(&status)) *bytes_deleted += st.Int(1);
    AVIARY_RETURN_IF_ERROR(status);
  }
  // The dataset versions that name a manifest about to go, first (inside the caller's
  // transaction when there is one: both or neither).
  std::vector<std::string> versions;
  {
    const std::string select = absl::StrCat(
        "SELECT DISTINCT key FROM dataset_version_manifests WHERE hash IN (SELECT hash FROM manifests WHERE ",
        unreferenced, ")");
    Statement st(this, select.c_str());
    absl::Status status;
    while (st.Step(&status)) versions.push_back(st.Text(0));
    AVIARY_RETURN_IF_ERROR(status);
  }
  for (const std::string& key : versions) AVIARY_RETURN_IF_ERROR(DeleteDatasetVersion(key));
  const std::string sql = absl::StrCat("DELETE FROM manifests WHERE ", unreferenced);
  Statement st(this, sql.c_str());
  AVIARY_RETURN_IF_ERROR(st.Run());
  *manifests_deleted += sqlite3_changes(db_);
  return absl::OkStatus();
}

absl::Status Store::PutDatasetVersion(const DatasetVersionRow& version, size_t max_versions) {
  return Transaction([&]() -> absl::Status {
    AVIARY_RETURN_IF_ERROR(DeleteDatasetVersion(version.key));
    {
      Statement st(this, "INSERT INTO dataset_versions(key, created_unix_ms, stamps) VALUES(?1, ?2, ?3)");
      st.Bind(1, version.key);
      st.Bind(2, version.created_unix_ms);
      st.BindBlob(3, version.stamps);
      AVIARY_RETURN_IF_ERROR(st.Run());
    }
    for (const DatasetVersionRow::Manifest& manifest : version.manifests) {
      AVIARY_ASSIGN_OR_RETURN(bool stored, HasManifest(manifest.hash));
      if (!stored) {
        return absl::FailedPreconditionError(absl::StrCat("database ", path_, ": a dataset version refers to manifest ",
                                                          manifest.hash, ", which is not stored"));
      }
      Statement st(this, "INSERT INTO dataset_version_manifests(key, fold, hash, size) VALUES(?1, ?2, ?3, ?4)");
      st.Bind(1, version.key);
      st.Bind(2, static_cast<int64_t>(manifest.fold));
      st.Bind(3, manifest.hash);
      st.Bind(4, manifest.size);
      AVIARY_RETURN_IF_ERROR(st.Run());
    }
    // The first recorded beyond max_versions: by rowid (this row, inserted last, has the largest),
    // not created_unix_ms (a wall clock that stepped back would make the new version the oldest).
    std::vector<std::string> old;
    {
      Statement st(this, "SELECT key FROM dataset_versions ORDER BY rowid DESC LIMIT -1 OFFSET ?1");
      // At least this one kept (OFFSET 0 chose every row, the new one too); a count past int64's
      // keeps all.
      st.Bind(1, static_cast<int64_t>(std::clamp<size_t>(max_versions, 1, std::numeric_limits<int64_t>::max())));
      absl::Status status;
      while (st.Step(&status)) old.push_back(st.Text(0));
      AVIARY_RETURN_IF_ERROR(status);
    }
    for (const std::string& key : old) AVIARY_RETURN_IF_ERROR(DeleteDatasetVersion(key));
    return absl::OkStatus();
  });
}

absl::Status Store::DeleteDatasetVersion(const std::string& key) {
  // One commit (nested in the caller's when it has one): a crash between the two deletes left a
  // version without its manifests.
  return Transaction([&]() -> absl::Status {
    for (const char* sql : {"DELETE FROM dataset_version_manifests WHERE key=?1", "DELETE FROM dataset_versions WHERE key=?1"}) {
      Statement st(this, sql);
      st.Bind(1, key);
      AVIARY_RETURN_IF_ERROR(st.Run());
    }
    return absl::OkStatus();
  });
}

absl::Status Store::DeleteDatasetVersionIfStamps(const std::string& key, const std::string& stamps) {
  return Transaction([&]() -> absl::Status {
    Statement st(this, "SELECT stamps FROM dataset_versions WHERE key=?1");
    st.Bind(1, key);
    absl::Status status;
    const bool found = st.Step(&status);
    AVIARY_RETURN_IF_ERROR(status);
    if (!found || st.Text(0) != stamps) return absl::OkStatus();  // gone, or another version now
    return DeleteDatasetVersion(key);
  });
}

absl::StatusOr<std::optional<DatasetVersionRow>> Store::LoadDatasetVersion(const std::string& key) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  DatasetVersionRow row;
  {
    Statement st(this, "SELECT created_unix_ms, stamps FROM dataset_versions WHERE key=?1");
    st.Bind(1, key);
    absl::Status status;
    const bool found = st.Step(&status);
    AVIARY_RETURN_IF_ERROR(status);
    if (!found) return std::nullopt;
    row.key = key;
    row.created_unix_ms = st.Int(0);
    row.stamps = st.Text(1);
  }
  Statement st(this, "SELECT fold, hash, size FROM dataset_version_manifests WHERE key=?1 ORDER BY fold");
  st.Bind(1, key);
  absl::Status status;
  while (st.Step(&status)) {
    row.manifests.push_back({static_cast<int>(st.Int(0)), st.Text(1), st.Int(2)});
  }
  AVIARY_RETURN_IF_ERROR(status);
  return row;
}

absl::Status Store::UpdateTask(const TaskRow& task) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("UpdateTask"));
  Statement st(this,
               "UPDATE tasks SET state=?2, group_id=?3, init_checkpoint=?4, "
               "resume_checkpoint=?5, info=?6 WHERE task_id=?1");
  st.Bind(1, task.info.task_id());
  st.Bind(2, static_cast<int64_t>(task.info.state()));
  st.Bind(3, task.info.group_id());
  st.Bind(4, task.init_checkpoint);
  st.Bind(5, task.resume_checkpoint);
  st.BindBlob(6, Serialize(task.info));
  AVIARY_RETURN_IF_ERROR(st.Run());
  if (sqlite3_changes(db_) != 1) {
    return absl::InternalError(absl::StrCat("database ", path_, ": UPDATE tasks: no row for task ",
                                            task.info.task_id()));
  }
  return absl::OkStatus();
}

absl::Status Store::PruneJob(const std::string& job_id, int64_t* points_deleted, int64_t* manifests_cleared) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("PruneJob"));
  {
    Statement st(this, "DELETE FROM metric_points WHERE job_id=?1 AND epoch_end=0");
    st.Bind(1, job_id);
    AVIARY_RETURN_IF_ERROR(st.Run());
    *points_deleted += sqlite3_changes(db_);
  }
  Statement st(this,
               "UPDATE tasks SET manifest_csv=x'', manifest_hash='' "
               "WHERE job_id=?1 AND (length(manifest_csv) > 0 OR manifest_hash != '')");
  st.Bind(1, job_id);
  AVIARY_RETURN_IF_ERROR(st.Run());
  *manifests_cleared += sqlite3_changes(db_);
  return absl::OkStatus();
}

absl::Status Store::DeleteJob(const std::string& job_id) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("DeleteJob"));
  // Checkpoints first: they name tasks, not jobs.
  constexpr const char* kStatements[] = {
      "DELETE FROM checkpoints WHERE task_id IN (SELECT task_id FROM tasks WHERE job_id=?1)",
      "DELETE FROM metric_points WHERE job_id=?1",
      "DELETE FROM tasks WHERE job_id=?1",
      "DELETE FROM jobs WHERE job_id=?1",
  };
  for (const char* sql : kStatements) {
    Statement st(this, sql);
    st.Bind(1, job_id);
    AVIARY_RETURN_IF_ERROR(st.Run());
  }
  return absl::OkStatus();
}

absl::Status Store::PutGroup(const GroupRow& group) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("PutGroup"));
  Statement st(this,
               "INSERT INTO groups(group_id, task_id, registered_unix_ms, info) "
               "VALUES(?1, ?2, ?3, ?4) ON CONFLICT(group_id) DO UPDATE SET "
               "task_id=excluded.task_id");
  st.Bind(1, group.group_id);
  st.Bind(2, group.task_id);
  st.Bind(3, group.registered_unix_ms);
  st.BindBlob(4, Serialize(group.info));
  return st.Run();
}

absl::Status Store::DeleteGroup(const std::string& group_id) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("DeleteGroup"));
  Statement st(this, "DELETE FROM groups WHERE group_id=?1");
  st.Bind(1, group_id);
  return st.Run();
}

absl::Status Store::AddPoints(const std::string& job_id, const std::string& task_id, int attempt,
                              int64_t time_unix_ms,
                              const std::vector<aviary::v1::Metrics>& points) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("AddPoints"));
  // Step points: only the newest of a task's attempt is kept (a restarted coordinator shows it;
  // nothing reads older ones). Every one was kept until retention: some 40,000 rows a day per
  // running task, the table's full scans at each start growing with them.
  int last_step = -1;
  for (size_t i = 0; i < points.size(); ++i) {
    if (!points[i].epoch_end()) last_step = static_cast<int>(i);
  }
  for (size_t i = 0; i < points.size(); ++i) {
    const aviary::v1::Metrics& point = points[i];
    if (!point.epoch_end() && static_cast<int>(i) != last_step) continue;
    if (!point.epoch_end()) {
      Statement del(this, "DELETE FROM metric_points WHERE task_id=?1 AND epoch_end=0 AND attempt=?2");
      del.Bind(1, task_id);
      del.Bind(2, attempt);
      AVIARY_RETURN_IF_ERROR(del.Run());
    }
    if (point.epoch_end()) {
      // An epoch end sent again within one attempt (a run resumed from its checkpoint re-sends
      // the epochs it restored) replaces the earlier one.
      Statement del(this,
                    "DELETE FROM metric_points WHERE task_id=?1 AND epoch_end=1 AND attempt=?2 AND epoch=?3");
      del.Bind(1, task_id);
      del.Bind(2, attempt);
      del.Bind(3, point.epoch());
      AVIARY_RETURN_IF_ERROR(del.Run());
    }
    Statement st(this,
                 "INSERT INTO metric_points(job_id, task_id, attempt, time_unix_ms, epoch, step, "
                 "epoch_end, metrics) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
    st.Bind(1, job_id);
    st.Bind(2, task_id);
    st.Bind(3, attempt);
    st.Bind(4, time_unix_ms);
    st.Bind(5, point.epoch());
    st.Bind(6, point.step());
    st.Bind(7, point.epoch_end() ? 1 : 0);
    st.BindBlob(8, Serialize(point));
    AVIARY_RETURN_IF_ERROR(st.Run());
  }
  return absl::OkStatus();
}

absl::Status Store::AddCheckpoint(const std::string& task_id, int attempt, const std::string& path,
                                  int epoch, bool best, int64_t time_unix_ms) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("AddCheckpoint"));
  // A report sent again after its answer was lost adds no second row.
  Statement st(this,
               "INSERT INTO checkpoints(task_id, attempt, path, epoch, best, time_unix_ms) "
               "SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS (SELECT 1 FROM checkpoints "
               "WHERE task_id=?1 AND attempt=?2 AND path=?3 AND epoch=?4 AND best=?5)");
  st.Bind(1, task_id);
  st.Bind(2, attempt);
  st.Bind(3, path);
  st.Bind(4, epoch);
  st.Bind(5, best ? 1 : 0);
  st.Bind(6, time_unix_ms);
  return st.Run();
}

absl::Status Store::SetCounter(const std::string& name, int64_t value) {
  AVIARY_RETURN_IF_ERROR(RequireTransaction("SetCounter"));
  Statement st(this,
               "INSERT INTO counters(name, value) VALUES(?1, ?2) "
               "ON CONFLICT(name) DO UPDATE SET value=excluded.value");
  st.Bind(1, name);
  st.Bind(2, value);
  return st.Run();
}

absl::StatusOr<std::vector<JobRow>> Store::LoadJobs() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT seq, info, job_id FROM jobs ORDER BY seq");
  std::vector<JobRow> rows;
  absl::Status status;
  while (st.Step(&status)) {
    JobRow row;
    row.seq = st.Int(0);
    const std::string id = st.Text(2);
    AVIARY_RETURN_IF_ERROR(st.Parse(1, &row.info, absl::StrCat("job ", id)));
    // A damaged blob may still parse: one naming another job would be written back as a second row.
    if (row.info.job_id() != id) {
      return absl::DataLossError(absl::StrCat("database ", path_, ": job ", id, ": its stored info names job '",
                                              absl::CHexEscape(row.info.job_id().substr(0, 64)),
                                              "' (a damaged row; restore a backup)"));
    }
    rows.push_back(std::move(row));
  }
  AVIARY_RETURN_IF_ERROR(status);
  return rows;
}

absl::StatusOr<std::vector<TaskRow>> Store::LoadTasks() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this,
               "SELECT t.seq, t.depends_on, t.init_checkpoint, t.resume_checkpoint, t.info, t.manifest_hash, "
               "t.task_id, t.job_id "
               "FROM tasks t LEFT JOIN jobs j ON j.job_id = t.job_id ORDER BY j.seq, t.seq");
  std::vector<TaskRow> rows;
  absl::Status status;
  while (st.Step(&status)) {
    TaskRow row;
    row.seq = st.Int(0);
    row.depends_on = st.Text(1);
    row.init_checkpoint = st.Text(2);
    row.resume_checkpoint = st.Text(3);
    const std::string id = st.Text(6);
    AVIARY_RETURN_IF_ERROR(st.Parse(4, &row.info, absl::StrCat("task ", id)));
    // A damaged blob that still parses with another id: every write of the task would miss its
    // row ("no row"), and the lease batches that staged it failed for every group.
    if (row.info.task_id() != id || row.info.job_id() != st.Text(7)) {
      return absl::DataLossError(absl::StrCat("database ", path_, ": task ", id, ": its stored info names task '",
                                              absl::CHexEscape(row.info.task_id().substr(0, 80)), "' of job '",
                                              absl::CHexEscape(row.info.job_id().substr(0, 64)),
                                              "' (a damaged row; restore a backup)"));
    }
    row.manifest_hash = st.Text(5);
    rows.push_back(std::move(row));
  }
  AVIARY_RETURN_IF_ERROR(status);
  return rows;
}

absl::StatusOr<std::vector<GroupRow>> Store::LoadGroups() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this,
               "SELECT group_id, task_id, registered_unix_ms, info FROM groups "
               "ORDER BY registered_unix_ms, group_id");
  std::vector<GroupRow> rows;
  absl::Status status;
  while (st.Step(&status)) {
    GroupRow row;
    row.group_id = st.Text(0);
    row.task_id = st.Text(1);
    row.registered_unix_ms = st.Int(2);
    const std::string label = absl::StrCat("group ", row.group_id);
    if (!SkipDamaged(st.Parse(3, &row.info, label), label)) {
      rows.push_back(std::move(row));
    }
  }
  AVIARY_RETURN_IF_ERROR(status);
  return rows;
}

absl::StatusOr<TaskPayload> Store::LoadTaskPayload(const std::string& task_id) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT manifest_csv, pipeline_yaml, manifest_hash FROM tasks WHERE task_id=?1");
  st.Bind(1, task_id);
  absl::Status status;
  if (!st.Step(&status)) {
    AVIARY_RETURN_IF_ERROR(status);
    return absl::NotFoundError(absl::StrCat("database ", path_, ": no task ", task_id));
  }
  TaskPayload payload;
  AVIARY_ASSIGN_OR_RETURN(payload.manifest_csv,
                          DecompressManifest(st.Text(0), absl::StrCat("database ", path_, ": task ", task_id)));
  payload.pipeline_yaml = st.Text(1);
  payload.manifest_hash = st.Text(2);
  return payload;
}

absl::StatusOr<bool> Store::HasManifest(const std::string& hash) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT 1 FROM manifests WHERE hash=?1");
  st.Bind(1, hash);
  absl::Status status;
  const bool found = st.Step(&status);
  AVIARY_RETURN_IF_ERROR(status);
  return found;
}

absl::StatusOr<std::string> Store::LoadManifest(const std::string& hash) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT size, data FROM manifests WHERE hash=?1");
  st.Bind(1, hash);
  absl::Status status;
  if (!st.Step(&status)) {
    AVIARY_RETURN_IF_ERROR(status);
    return absl::NotFoundError(absl::StrCat("database ", path_, ": no manifest ", hash));
  }
  const std::string where = absl::StrCat("database ", path_, ": manifest ", hash);
  AVIARY_ASSIGN_OR_RETURN(std::string csv, DecompressManifest(st.Text(1), where));
  if (static_cast<int64_t>(csv.size()) != st.Int(0)) {
    return absl::DataLossError(absl::StrCat(where, ": ", csv.size(), " bytes stored, ", st.Int(0), " recorded"));
  }
  // Its content address (other bytes of the same size passed, and the group that fetched them
  // refused them at every lease: the task was never failed).
  if (const std::string got = Sha256Hex(csv); got != hash) {
    return absl::DataLossError(absl::StrCat(where, ": the ", csv.size(), " bytes stored have SHA-256 ", got));
  }
  return csv;
}

absl::StatusOr<int64_t> Store::ManifestSize(const std::string& hash) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT size FROM manifests WHERE hash=?1");
  st.Bind(1, hash);
  absl::Status status;
  if (st.Step(&status)) return st.Int(0);
  AVIARY_RETURN_IF_ERROR(status);
  return absl::NotFoundError(absl::StrCat("database ", path_, ": no manifest ", hash));
}

absl::StatusOr<Store::ManifestStats> Store::GetManifestStats() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT count(*), coalesce(sum(length(data)), 0) FROM manifests");
  absl::Status status;
  ManifestStats stats;
  if (st.Step(&status)) {
    stats.count = st.Int(0);
    stats.stored_bytes = st.Int(1);
  }
  AVIARY_RETURN_IF_ERROR(status);
  return stats;
}

absl::StatusOr<int64_t> Store::GetCounter(const std::string& name) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this, "SELECT value FROM counters WHERE name=?1");
  st.Bind(1, name);
  absl::Status status;
  if (st.Step(&status)) return st.Int(0);
  AVIARY_RETURN_IF_ERROR(status);
  return 0;
}

absl::StatusOr<std::vector<PointRow>> Store::LoadEpochEnds(const std::string& job_id, int64_t* damaged) {
  return LoadEpochEndsWhere("job_id", job_id, damaged);
}

absl::StatusOr<std::vector<PointRow>> Store::LoadTaskEpochEnds(const std::string& task_id, int64_t* damaged) {
  return LoadEpochEndsWhere("task_id", task_id, damaged);
}

absl::StatusOr<std::vector<PointRow>> Store::LoadEpochEndsWhere(const char* column, const std::string& value,
                                                                int64_t* damaged) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  // `column` is one of the two above (an index each: metric_points_by_job, metric_points_by_task).
  const std::string sql = absl::StrCat("SELECT task_id, attempt, time_unix_ms, metrics, id FROM metric_points WHERE ",
                                       column, "=?1 AND epoch_end=1 ORDER BY id");
  Statement st(this, sql.c_str());
  st.Bind(1, value);
  std::vector<PointRow> rows;
  absl::Status status;
  while (st.Step(&status)) {
    PointRow row;
    row.task_id = st.Text(0);
    row.attempt = static_cast<int>(st.Int(1));
    row.time_unix_ms = st.Int(2);
    const std::string label = PointLabel(st.Int(4), row.task_id);
    if (!SkipDamaged(st.Parse(3, &row.metrics, label), label)) {
      rows.push_back(std::move(row));
    } else if (damaged != nullptr) {
      ++*damaged;
    }
  }
  AVIARY_RETURN_IF_ERROR(status);
  return rows;
}

absl::StatusOr<std::map<std::string, PointRow>> Store::LoadLatestEpochEnds() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this,
               "SELECT task_id, metrics, id, attempt, time_unix_ms FROM metric_points WHERE id IN "
               "(SELECT max(id) FROM metric_points WHERE epoch_end=1 GROUP BY task_id)");
  std::map<std::string, PointRow> out;
  absl::Status status;
  while (st.Step(&status)) {
    PointRow row;
    row.task_id = st.Text(0);
    row.attempt = static_cast<int>(st.Int(3));
    row.time_unix_ms = st.Int(4);
    const std::string label = PointLabel(st.Int(2), row.task_id);
    if (!SkipDamaged(st.Parse(1, &row.metrics, label), label)) {
      out[row.task_id] = std::move(row);
    }
  }
  AVIARY_RETURN_IF_ERROR(status);
  return out;
}

absl::StatusOr<std::vector<PointRow>> Store::LoadLastPoints() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this,
               "SELECT task_id, attempt, metrics, id, time_unix_ms FROM metric_points WHERE id IN "
               "(SELECT max(id) FROM metric_points GROUP BY task_id, attempt)");
  std::vector<PointRow> out;
  absl::Status status;
  while (st.Step(&status)) {
    PointRow row;
    row.task_id = st.Text(0);
    row.attempt = static_cast<int>(st.Int(1));
    row.time_unix_ms = st.Int(4);
    const std::string label = PointLabel(st.Int(3), row.task_id);
    if (!SkipDamaged(st.Parse(2, &row.metrics, label), label)) {
      out.push_back(std::move(row));
    }
  }
  AVIARY_RETURN_IF_ERROR(status);
  return out;
}

Store::CheckpointRow Store::CheckpointAt(Statement& st, int first) {
  CheckpointRow row;
  row.path = st.Text(first);
  row.epoch = static_cast<int>(st.Int(first + 1));
  row.best = st.Int(first + 2) != 0;
  row.attempt = static_cast<int>(st.Int(first + 3));
  return row;
}

absl::StatusOr<std::vector<Store::CheckpointRow>> Store::LoadCheckpoints(const std::string& task_id) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  Statement st(this,
               "SELECT path, epoch, best, attempt FROM checkpoints WHERE task_id=?1 ORDER BY id");
  st.Bind(1, task_id);
  std::vector<CheckpointRow> rows;
  absl::Status status;
  while (st.Step(&status)) rows.push_back(CheckpointAt(st, 0));
  AVIARY_RETURN_IF_ERROR(status);
  return rows;
}

absl::StatusOr<std::map<std::string, std::vector<Store::CheckpointRow>>> Store::LoadJobCheckpoints(
    const std::string& job_id) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  AVIARY_RETURN_IF_ERROR(CheckOpen());
  // "<job_id>/" <= task_id < "<job_id>0" ('0' follows '/'): a range of the (task_id, id) index.
  Statement st(this,
               "SELECT task_id, path, epoch, best, attempt FROM checkpoints WHERE task_id >= ?1 AND task_id < ?2 "
               "ORDER BY task_id, id");
  st.Bind(1, absl::StrCat(job_id, "/"));
  st.Bind(2, absl::StrCat(job_id, "0"));
  std::map<std::string, std::vector<CheckpointRow>> rows;
  absl::Status status;
  while (st.Step(&status)) rows[st.Text(0)].push_back(CheckpointAt(st, 1));
  AVIARY_RETURN_IF_ERROR(status);
  return rows;
}

}  // namespace aviary::coordinator
