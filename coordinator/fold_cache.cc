#include "coordinator/fold_cache.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/layouts.h"

namespace aviary::coordinator {

namespace fs = std::filesystem;

FileStamp StampFile(const std::string& path) {
  FileStamp stamp;
  stamp.path = path;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return stamp;  // absent (or unreadable): a stamp of its own
  stamp.exists = true;
  stamp.dev = static_cast<uint64_t>(st.st_dev);
  stamp.ino = static_cast<uint64_t>(st.st_ino);
  stamp.size = static_cast<int64_t>(st.st_size);
  stamp.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  stamp.ctime_ns = static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
  return stamp;
}

std::string FoldCache::Key(const common::PipelineConfig& config, const std::string& stage) {
  // Fields joined by '\n' (paths hold no newline that could make two keys alike: roots are
  // checked paths; a newline would only make a key of its own). First the rules' version: the
  // versions outlive the coordinator (in its database), and a release that changes how a table or
  // a manifest is made from the same files (the filter, dedup, the folds) must not reuse them.
  std::string key = absl::StrCat("rules=", kFoldRulesVersion, "\nstage=", stage, "\ntarget=", config.data.target.layout, ":", config.data.target.root);
  if (stage == "pretrain") {
    for (const common::SourceConfig& source : config.data.pretrain_sources) {
      absl::StrAppend(&key, "\nsource=", source.layout, ":", source.root);
    }
    absl::StrAppend(&key, "\ncorrupt_files=", config.data.corrupt_files, "\nsplits=", config.folds.pretrain_splits,
                    "\ndownsample_thr=", config.sampling.downsample_thr);
  } else {
    absl::StrAppend(&key, "\nsplits=", config.folds.finetune_splits);
  }
  absl::StrAppend(&key, "\ncv_filter=", config.folds.cv_filter ? 1 : 0, "\ncv_filter_thr=", config.folds.cv_filter_thr,
                  "\nupsample_thr=", config.sampling.upsample_thr, "\nseed=", config.seed);
  return key;
}

std::vector<std::string> FoldCache::MetadataFiles(const common::PipelineConfig& config, const std::string& stage) {
  std::vector<std::string> files;
  auto add = [&](const common::SourceConfig& source) {
    absl::StatusOr<common::Layout> layout = common::ParseLayout(source.layout);
    if (layout.ok()) files.push_back((fs::path(source.root) / common::GetLayoutSpec(*layout).metadata_file).string());
  };
  add(config.data.target);
  if (stage == "pretrain") {
    for (const common::SourceConfig& source : config.data.pretrain_sources) add(source);
    if (!config.data.corrupt_files.empty()) files.push_back(config.data.corrupt_files);
  }
  return files;
}

std::vector<std::string> FoldCache::AudioFolders(const common::StageTable& table) {
  absl::flat_hash_set<absl::string_view> seen;  // views into the samples' paths
  std::vector<std::string> folders;
  absl::string_view last;
  for (const common::Sample& sample : table.samples) {
    const absl::string_view path = sample.filepath;
    const size_t slash = path.rfind('/');
    if (slash == absl::string_view::npos) continue;
    const absl::string_view folder = path.substr(0, slash);
    if (folder == last) continue;  // same as the row before
    last = folder;
    if (seen.insert(folder).second) folders.emplace_back(folder);
  }
  // The folders of rows dropped because their file was missing: the file appearing there (or
  // the whole folder, or its parent tree, restored) changes the rows.
  for (const common::SourceReport& source : table.sources) {
    for (const std::string& folder : source.missing_folders) folders.push_back(folder);
  }
  const size_t num_folders = folders.size();
  for (size_t i = 0; i < num_folders; ++i) {
    const size_t slash = folders[i].rfind('/');
    if (slash != std::string::npos && slash > 0) folders.push_back(folders[i].substr(0, slash));
  }
  std::sort(folders.begin(), folders.end());
  folders.erase(std::unique(folders.begin(), folders.end()), folders.end());
  return folders;
}

std::optional<std::map<int, ManifestRef>> FoldCache::Lookup(const std::string& key, const std::vector<int>& folds) {
  std::shared_ptr<const Version> version;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = versions_.begin(); it != versions_.end(); ++it) {
      if (it->first != key) continue;
      version = it->second;
      versions_.splice(versions_.begin(), versions_, it);  // most recently used
      break;
    }
  }
  if (version == nullptr) version = LoadFromStore(key);
  if (version == nullptr) return std::nullopt;
  std::map<int, ManifestRef> out;
  for (int fold : folds) {
    auto it = version->manifests.find(fold);
    if (it == version->manifests.end()) return std::nullopt;  // built for other folds: rebuild
    out[fold] = it->second;
  }
  for (const FileStamp& stamp : version->stamps) {  // outside the lock: a few thousand stat calls
    if (!(StampFile(stamp.path) == stamp)) {
      {
        absl::MutexLock lock(&mu_);
        versions_.remove_if([&](const auto& entry) { return entry.second == version; });
      }
      // Only this stale copy: a submit may have just recorded a rebuilt version under the key.
      // A failure leaves it to be rebuilt and replaced.
      if (store_ != nullptr) (void)store_->DeleteDatasetVersionIfStamps(key, EncodeStamps(version->stamps));
      return std::nullopt;
    }
  }
  return out;
}

void FoldCache::Insert(const std::string& key, std::vector<FileStamp> stamps, std::map<int, ManifestRef> manifests) {
  auto version = std::make_shared<Version>();
  version->stamps = std::move(stamps);
  version->manifests = std::move(manifests);
  absl::MutexLock lock(&mu_);
  versions_.remove_if([&](const auto& entry) { return entry.first == key; });
  versions_.emplace_front(key, std::move(version));
  while (versions_.size() > max_versions_) versions_.pop_back();
}

void FoldCache::Erase(const std::string& key) {
  {
    absl::MutexLock lock(&mu_);
    versions_.remove_if([&](const auto& entry) { return entry.first == key; });
  }
  if (store_ != nullptr) (void)store_->DeleteDatasetVersion(key);  // a failure: rebuilt and replaced
}

std::shared_ptr<const FoldCache::Version> FoldCache::LoadFromStore(const std::string& key) {
  if (store_ == nullptr) return nullptr;
  absl::StatusOr<std::optional<DatasetVersionRow>> row = store_->LoadDatasetVersion(key);
  if (!row.ok() || !row->has_value()) return nullptr;
  absl::StatusOr<std::vector<FileStamp>> stamps = DecodeStamps((*row)->stamps);
  if (!stamps.ok()) {
    (void)store_->DeleteDatasetVersionIfStamps(key, (*row)->stamps);  // unreadable: built again and replaced
    return nullptr;
  }
  auto version = std::make_shared<Version>();
  version->stamps = *std::move(stamps);
  for (const DatasetVersionRow::Manifest& manifest : (*row)->manifests) {
    version->manifests[manifest.fold] = ManifestRef{manifest.hash, manifest.size};
  }
  absl::MutexLock lock(&mu_);
  versions_.remove_if([&](const auto& entry) { return entry.first == key; });
  versions_.emplace_front(key, version);
  while (versions_.size() > max_versions_) versions_.pop_back();
  return version;
}

DatasetVersionRow FoldCache::ToRow(const std::string& key, const std::vector<FileStamp>& stamps,
                                   const std::map<int, ManifestRef>& manifests, int64_t created_unix_ms) {
  DatasetVersionRow row;
  row.key = key;
  row.created_unix_ms = created_unix_ms;
  row.stamps = EncodeStamps(stamps);
  for (const auto& [fold, ref] : manifests) row.manifests.push_back({fold, ref.hash, ref.size});
  return row;
}

// One line per stamp: "present dev ino size mtime_ns ctime_ns path" with the path C-escaped
// (a path may hold any byte but NUL, a newline included).
std::string FoldCache::EncodeStamps(const std::vector<FileStamp>& stamps) {
  std::string out;
  for (const FileStamp& s : stamps) {
    absl::StrAppend(&out, s.exists ? 1 : 0, " ", s.dev, " ", s.ino, " ", s.size, " ", s.mtime_ns, " ", s.ctime_ns, " ",
                    absl::CEscape(s.path), "\n");
  }
  return out;
}

absl::StatusOr<std::vector<FileStamp>> FoldCache::DecodeStamps(absl::string_view text) {
  std::vector<FileStamp> stamps;
  size_t line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    ++line_no;
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::MaxSplits(' ', 6));
    FileStamp s;
    int present = 0;
    std::string error;
    if (fields.size() != 7 || !absl::SimpleAtoi(fields[0], &present) || !absl::SimpleAtoi(fields[1], &s.dev) ||
        !absl::SimpleAtoi(fields[2], &s.ino) || !absl::SimpleAtoi(fields[3], &s.size) ||
        !absl::SimpleAtoi(fields[4], &s.mtime_ns) || !absl::SimpleAtoi(fields[5], &s.ctime_ns) ||
        !absl::CUnescape(fields[6], &s.path, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("dataset version stamps: line ", line_no, " is not a stamp: '",
                                                     absl::CHexEscape(line.substr(0, 200)), "'"));
    }
    s.exists = present != 0;
    stamps.push_back(std::move(s));
  }
  return stamps;
}

FoldCache::BuildClaim FoldCache::ClaimForBuild(std::vector<std::string> keys, bool* waited,
                                               const std::function<bool()>& give_up, bool* gave_up) {
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  if (waited != nullptr) *waited = false;
  if (gave_up != nullptr) *gave_up = false;
  absl::MutexLock lock(&mu_);
  while (true) {
    bool taken = false;
    for (const std::string& key : keys) taken = taken || building_.count(key) > 0;
    if (!taken) break;
    if (waited != nullptr) *waited = true;
    ++waiting_;
    if (give_up) {
      building_done_.WaitWithTimeout(&mu_, absl::Seconds(1));
    } else {
      building_done_.Wait(&mu_);
    }
    --waiting_;
    if (give_up && give_up()) {
      if (gave_up != nullptr) *gave_up = true;
      return BuildClaim();
    }
  }
  building_.insert(keys.begin(), keys.end());
  BuildClaim claim;
  claim.cache_ = this;
  claim.keys_ = std::move(keys);
  return claim;
}

int FoldCache::waiting_claims() const {
  absl::MutexLock lock(&mu_);
  return waiting_;
}

void FoldCache::ReleaseKeys(const std::vector<std::string>& keys) {
  absl::MutexLock lock(&mu_);
  for (const std::string& key : keys) building_.erase(key);
  building_done_.SignalAll();
}

FoldCache::BuildClaim& FoldCache::BuildClaim::operator=(BuildClaim&& other) noexcept {
  if (this != &other) {
    Release();
    cache_ = std::exchange(other.cache_, nullptr);
    keys_ = std::move(other.keys_);
    other.keys_.clear();
  }
  return *this;
}

void FoldCache::BuildClaim::Release() {
  if (cache_ != nullptr && !keys_.empty()) cache_->ReleaseKeys(keys_);
  cache_ = nullptr;
  keys_.clear();
}

size_t FoldCache::size() const {
  absl::MutexLock lock(&mu_);
  return versions_.size();
}

}  // namespace aviary::coordinator
