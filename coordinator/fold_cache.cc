#include "coordinator/fold_cache.h"

#include <sys/stat.h>

#include <filesystem>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
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
  // checked paths; a newline would only make a key of its own).
  std::string key = absl::StrCat("stage=", stage, "\ntarget=", config.data.target.layout, ":", config.data.target.root);
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
  std::set<std::string> folders;
  std::string last;
  for (const common::Sample& sample : table.samples) {
    const size_t slash = sample.filepath.rfind('/');
    if (slash == std::string::npos) continue;
    if (sample.filepath.compare(0, slash, last) == 0 && last.size() == slash) continue;  // same as the row before
    last = sample.filepath.substr(0, slash);
    folders.insert(last);
  }
  std::set<std::string> parents;
  for (const std::string& folder : folders) {
    const size_t slash = folder.rfind('/');
    if (slash != std::string::npos && slash > 0) parents.insert(folder.substr(0, slash));
  }
  folders.insert(parents.begin(), parents.end());
  return std::vector<std::string>(folders.begin(), folders.end());
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
  if (version == nullptr) return std::nullopt;
  std::map<int, ManifestRef> out;
  for (int fold : folds) {
    auto it = version->manifests.find(fold);
    if (it == version->manifests.end()) return std::nullopt;  // built for other folds: rebuild
    out[fold] = it->second;
  }
  for (const FileStamp& stamp : version->stamps) {  // outside the lock: a few thousand stat calls
    if (!(StampFile(stamp.path) == stamp)) {
      absl::MutexLock lock(&mu_);
      versions_.remove_if([&](const auto& entry) { return entry.second == version; });
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
  absl::MutexLock lock(&mu_);
  versions_.remove_if([&](const auto& entry) { return entry.first == key; });
}

size_t FoldCache::size() const {
  absl::MutexLock lock(&mu_);
  return versions_.size();
}

}  // namespace aviary::coordinator
