// Task manifests per dataset version, shared by the jobs that use the same data: a submit whose
// stage reads the same files with the same fold-relevant config reuses the manifests an earlier
// submit built (their content hashes; the manifests themselves are in the store) instead of
// reading the metadata and rebuilding the folds (docs/SERVICE.md, "Dataset versions").
//
// A version's key is the stage plus every config key the manifests depend on (the sources'
// layouts and resolved roots, data.corrupt_files, folds.*_splits, folds.cv_filter(_thr),
// sampling.*_thr, seed). Its files are checked at every lookup by their stat stamp (device,
// inode, size, mtime and ctime in ns): the metadata CSVs, the corrupt-file list, every folder
// that holds a kept recording and each such folder's parent (a recording added or removed
// changes its folder's mtime, a new label folder its parent's). A stamp, not a content hash:
// stat of a few thousand paths takes milliseconds where hashing the pool's CSVs would read tens
// of MB at every submit, and any write to a file changes its ctime, which no tool can set back.
// A changed stamp drops the version. At most `max_versions` versions are kept (least recently
// used first out).
//
// With a store, the versions also live in its dataset_versions tables (written by the submit in
// the job's own transaction: ToRow), so that they survive a restart: a lookup that misses in
// memory reads the store, and a version dropped here (changed files, Erase) is deleted there.
// Pruning that deletes a manifest deletes the versions naming it (Store::SweepManifests); a
// version still remembered in memory is caught by the submit, which checks that its manifests
// are stored. The store keeps the `max_versions` most recently built.
//
// Single flight: a submit that misses claims the versions it will build (ClaimForBuild) until it
// has recorded them or given up; a second submit of the same data at the same time waits for
// that and then finds them, instead of reading the metadata and building the same folds beside
// it (minutes of CPU and hundreds of MB for a BirdCLEF-size pool).
//
// Thread-safe.
#ifndef AVIARY_COORDINATOR_FOLD_CACHE_H_
#define AVIARY_COORDINATOR_FOLD_CACHE_H_

#include <cstdint>
#include <list>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/catalog.h"
#include "common/config.h"
#include "coordinator/store.h"

namespace aviary::coordinator {

struct FileStamp {
  std::string path;
  bool exists = false;
  uint64_t dev = 0, ino = 0;
  int64_t size = 0, mtime_ns = 0, ctime_ns = 0;
  bool operator==(const FileStamp& o) const {
    return path == o.path && exists == o.exists && dev == o.dev && ino == o.ino && size == o.size &&
           mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
  }
};
FileStamp StampFile(const std::string& path);

struct ManifestRef {
  std::string hash;   // Sha256Hex of the CSV
  int64_t size = 0;   // its bytes
};

// The version of the rules that make a stage's table and manifests from its files (common/catalog,
// common/folds, common/tensor_index): bumped by a change to them, it is part of every key.
// 2: a corrupt-list path whose folder names a source's root drops that source's row only.
inline constexpr int kFoldRulesVersion = 2;

class FoldCache {
 public:
  // `store` (may be null: memory only) must outlive the cache.
  explicit FoldCache(size_t max_versions = 8, Store* store = nullptr) : max_versions_(max_versions), store_(store) {}

  // The version key of `stage` under `config` (paths already resolved).
  static std::string Key(const common::PipelineConfig& config, const std::string& stage);
  // The metadata files `stage` reads (stamped before reading them).
  static std::vector<std::string> MetadataFiles(const common::PipelineConfig& config, const std::string& stage);
  // The folders of `table`'s recordings and of the files it dropped as missing, and their parents.
  static std::vector<std::string> AudioFolders(const common::StageTable& table);

  // The manifests of `folds` when the version is cached with every one of them and none of its
  // files changed; nullopt otherwise (a changed file drops the version).
  std::optional<std::map<int, ManifestRef>> Lookup(const std::string& key, const std::vector<int>& folds)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Records a version in memory (replacing one under the same key); the store's copy is written
  // by the caller (Store::PutDatasetVersion of ToRow, with the tasks that refer to the manifests).
  void Insert(const std::string& key, std::vector<FileStamp> stamps, std::map<int, ManifestRef> manifests)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Drops the version from memory and from the store.
  void Erase(const std::string& key) ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);
  size_t max_versions() const { return max_versions_; }

  // Keys claimed for a build, released on destruction (or Release()). Movable.
  class BuildClaim {
   public:
    BuildClaim() = default;
    BuildClaim(BuildClaim&& other) noexcept { *this = std::move(other); }
    BuildClaim& operator=(BuildClaim&& other) noexcept;
    BuildClaim(const BuildClaim&) = delete;
    BuildClaim& operator=(const BuildClaim&) = delete;
    ~BuildClaim() { Release(); }
    void Release();
    const std::vector<std::string>& keys() const { return keys_; }

   private:
    friend class FoldCache;
    FoldCache* cache_ = nullptr;
    std::vector<std::string> keys_;
  };
  // Waits until no other claim holds any of `keys`, then claims them all at once (two submits
  // that need two versions each cannot wait for each other). `*waited` (may be null) says
  // whether it had to wait. Call Lookup again after: the waited-for build may have recorded them.
  // `give_up` (may be empty) is asked about once a second while waiting: true ends the wait
  // with an empty claim (no keys) and `*gave_up` true (a client gone while another submit's
  // build of a pool-size dataset went on for minutes kept a server thread until its end).
  BuildClaim ClaimForBuild(std::vector<std::string> keys, bool* waited = nullptr,
                           const std::function<bool()>& give_up = {}, bool* gave_up = nullptr)
      ABSL_LOCKS_EXCLUDED(mu_);
  // How many ClaimForBuild calls are waiting now (tests).
  int waiting_claims() const ABSL_LOCKS_EXCLUDED(mu_);

  // The store's row of a version, and back (INVALID_ARGUMENT for stamps that do not decode).
  static DatasetVersionRow ToRow(const std::string& key, const std::vector<FileStamp>& stamps,
                                 const std::map<int, ManifestRef>& manifests, int64_t created_unix_ms);
  static std::string EncodeStamps(const std::vector<FileStamp>& stamps);
  static absl::StatusOr<std::vector<FileStamp>> DecodeStamps(absl::string_view text);

 private:
  struct Version {
    std::vector<FileStamp> stamps;
    std::map<int, ManifestRef> manifests;
  };
  // The store's copy of `key`, put in memory; null when there is none (or it cannot be read:
  // a miss, and the submit builds the version again).
  std::shared_ptr<const Version> LoadFromStore(const std::string& key) ABSL_LOCKS_EXCLUDED(mu_);

  const size_t max_versions_;
  Store* const store_;
  void ReleaseKeys(const std::vector<std::string>& keys) ABSL_LOCKS_EXCLUDED(mu_);

  mutable absl::Mutex mu_;
  std::list<std::pair<std::string, std::shared_ptr<const Version>>> versions_ ABSL_GUARDED_BY(mu_);  // MRU first
  std::set<std::string> building_ ABSL_GUARDED_BY(mu_);  // claimed keys
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;
  absl::CondVar building_done_;  // signalled when claimed keys are released
};

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_FOLD_CACHE_H_
