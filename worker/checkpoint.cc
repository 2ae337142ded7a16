#include "worker/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <new>
#include <sstream>
#include <tuple>

#include <type_traits>
#include <utility>
#include <vector>

#include <zlib.h>

#include <torch/optim/adam.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

namespace aviary::worker {
namespace {

// The payload of a checkpoint format this aviary does not read (IsOtherCheckpointFormat).
constexpr absl::string_view kOtherFormatUrl = "type.aviary/checkpoint-other-format";

std::function<int(const std::string&)>& ReadFault() {
  static auto* fault = new std::function<int(const std::string&)>();
  return *fault;
}

std::string MetaToYaml(const CheckpointMeta& m) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "format" << YAML::Value << m.format;
  out << YAML::Key << "stage" << YAML::Value << m.stage;
  out << YAML::Key << "fold" << YAML::Value << m.fold;
  out << YAML::Key << "epoch" << YAML::Value << m.epoch;
  out << YAML::Key << "step" << YAML::Value << m.step;
  out << YAML::Key << "monitor" << YAML::Value << m.monitor;
  out << YAML::Key << "best_value" << YAML::Value << YAML::Precision(17) << m.best_value;
  out << YAML::Key << "best_epoch" << YAML::Value << m.best_epoch;
  out << YAML::Key << "model_name" << YAML::Value << m.model_name;
  out << YAML::Key << "num_classes" << YAML::Value << m.num_classes;
  out << YAML::Key << "in_channels" << YAML::Value << m.in_channels;
  out << YAML::Key << "class_names" << YAML::Value << YAML::Flow << m.class_names;
  out << YAML::Key << "config_yaml" << YAML::Value << YAML::Literal << m.config_yaml;
  out << YAML::Key << "history_csv" << YAML::Value << YAML::Literal << m.history_csv;
  out << YAML::Key << "skipped_steps" << YAML::Value << m.skipped_steps;
  if (m.skipped_in_a_row > 0) out << YAML::Key << "skipped_in_a_row" << YAML::Value << m.skipped_in_a_row;
  out << YAML::Key << "task_id" << YAML::Value << m.task_id;
  out << YAML::Key << "attempt" << YAML::Value << m.attempt;
  if (m.world_size > 0) out << YAML::Key << "world_size" << YAML::Value << m.world_size;
  if (!m.device_type.empty()) out << YAML::Key << "device_type" << YAML::Value << m.device_type;
  if (m.autocast >= 0) out << YAML::Key << "autocast" << YAML::Value << m.autocast;
  if (m.cached_files >= 0) {
    out << YAML::Key << "cached_files" << YAML::Value << m.cached_files;
    out << YAML::Key << "data_files" << YAML::Value << m.data_files;
  }
  if (m.train_items >= 0) {
    out << YAML::Key << "train_items" << YAML::Value << m.train_items;
    out << YAML::Key << "train_items_digest" << YAML::Value << m.train_items_digest;
    out << YAML::Key << "valid_items" << YAML::Value << m.valid_items;
    out << YAML::Key << "valid_items_digest" << YAML::Value << m.valid_items_digest;
  }
  if (m.in_epoch >= 0) {
    out << YAML::Key << "in_epoch" << YAML::Value << m.in_epoch;
    out << YAML::Key << "batches_done" << YAML::Value << m.batches_done;
    out << YAML::Key << "epoch_loss_sum" << YAML::Value << YAML::Precision(17) << m.epoch_loss_sum;
    out << YAML::Key << "epoch_seen" << YAML::Value << m.epoch_seen;
    out << YAML::Key << "epoch_correct" << YAML::Value << m.epoch_correct;
  }
  if (m.early_stop_epoch >= 0 || m.stopped_early) {
    out << YAML::Key << "early_stop_value" << YAML::Value << YAML::Precision(17) << m.early_stop_value;
    out << YAML::Key << "early_stop_epoch" << YAML::Value << m.early_stop_epoch;
    out << YAML::Key << "stopped_early" << YAML::Value << m.stopped_early;
  }
  out << YAML::EndMap;
  return out.c_str();
}

// More classes than any species list (BirdCLEF 2024: 182; Xeno-Canto's birds: ~11,000).
constexpr int kMaxCheckpointClasses = 1 << 20;
// More ranks and loader batches per epoch than any run has; their product fits an int64_t.
constexpr int kMaxCheckpointRanks = 1 << 20;
constexpr int64_t kMaxCheckpointBatches = int64_t{1} << 40;

absl::StatusOr<CheckpointMeta> MetaFromYaml(const std::string& text, const std::string& path) {
  CheckpointMeta m;
  try {
    YAML::Node n = YAML::Load(text);
    m.format = n["format"].as<int>();
    // First: another version's file may name its fields otherwise, and was called unreadable
    // ("bad conversion"), set aside and resumed past.
    if (m.format != 1) {
      absl::Status other = absl::FailedPreconditionError(absl::StrCat(
          path, ": checkpoint format ", m.format, " is not supported (this aviary reads format 1): written by "
          "another version of aviary; run that version, or start over with --no-resume"));
      other.SetPayload(kOtherFormatUrl, absl::Cord("1"));
      return other;
    }
    m.stage = n["stage"].as<std::string>();
    m.fold = n["fold"].as<int>();
    m.epoch = n["epoch"].as<int>();
    m.step = n["step"].as<int64_t>();
    m.monitor = n["monitor"].as<std::string>();
    m.best_value = n["best_value"].as<double>();
    m.best_epoch = n["best_epoch"].as<int>();
    m.model_name = n["model_name"].as<std::string>();
    m.num_classes = n["num_classes"].as<int>();
    m.in_channels = n["in_channels"].as<int>();
    m.class_names = n["class_names"].as<std::vector<std::string>>();
    m.config_yaml = n["config_yaml"].as<std::string>();
    m.history_csv = n["history_csv"].as<std::string>();
    if (n["skipped_steps"]) m.skipped_steps = n["skipped_steps"].as<int64_t>();
    if (n["skipped_in_a_row"]) m.skipped_in_a_row = n["skipped_in_a_row"].as<int64_t>();
    if (n["task_id"]) m.task_id = n["task_id"].as<std::string>();
    if (n["attempt"]) m.attempt = n["attempt"].as<int>();
    if (n["world_size"]) m.world_size = n["world_size"].as<int>();
    if (n["device_type"]) m.device_type = n["device_type"].as<std::string>();
    if (n["autocast"]) m.autocast = n["autocast"].as<int>();
    if (n["cached_files"]) {
      m.cached_files = n["cached_files"].as<int64_t>();
      m.data_files = n["data_files"].as<int64_t>();
    }
    if (n["train_items"]) {
      m.train_items = n["train_items"].as<int64_t>();
      m.train_items_digest = n["train_items_digest"].as<int64_t>();
      m.valid_items = n["valid_items"].as<int64_t>();
      m.valid_items_digest = n["valid_items_digest"].as<int64_t>();
    }
    if (n["in_epoch"]) {
      m.in_epoch = n["in_epoch"].as<int>();
      m.batches_done = n["batches_done"].as<int64_t>();
      m.epoch_loss_sum = n["epoch_loss_sum"].as<double>();
      m.epoch_seen = n["epoch_seen"].as<int64_t>();
      m.epoch_correct = n["epoch_correct"].as<int64_t>();
    }
    if (n["early_stop_epoch"]) {
      m.early_stop_value = n["early_stop_value"].as<double>();
      m.early_stop_epoch = n["early_stop_epoch"].as<int>();
      m.stopped_early = n["stopped_early"].as<bool>();
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": checkpoint metadata is unreadable: ", e.what()));
  }
  // What a model is built from, before anything is allocated for it: a damaged or edited value
  // (in_channels 10^8: a first convolution of 100 GB) is an error naming the file.
  if (m.in_channels != 1 && m.in_channels != 3) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": checkpoint metadata has in_channels ", m.in_channels,
                                                   " (expected 1 or 3, as frontend.in_channels)"));
  }
  if (m.num_classes < 1 || m.num_classes > kMaxCheckpointClasses) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": checkpoint metadata has num_classes ", m.num_classes,
                                                   " (expected 1 to ", kMaxCheckpointClasses, ")"));
  }
  // Positions a resume computes with (batches_done x world_size must not overflow): a damaged or
  // edited value is an error naming the file, not an epoch or batch to skip to.
  if (m.world_size < 0 || m.world_size > kMaxCheckpointRanks || m.batches_done < 0 ||
      m.batches_done > kMaxCheckpointBatches) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": checkpoint metadata has world_size ", m.world_size,
                                                   " and batches_done ", m.batches_done, " (expected 0 to ",
                                                   kMaxCheckpointRanks, " and 0 to ", kMaxCheckpointBatches, ")"));
  }
  if (m.epoch < -1 || m.best_epoch < -1 || m.step < 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": checkpoint metadata has epoch ", m.epoch, ", best_epoch ",
                                                   m.best_epoch, " and step ", m.step,
                                                   " (expected epochs >= -1 and step >= 0)"));
  }
  if (m.in_epoch != -1 && m.in_epoch != m.epoch + 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": checkpoint metadata has in_epoch ", m.in_epoch,
                                                   " after epoch ", m.epoch, " (expected ", m.epoch + 1, ")"));
  }
  return m;
}

// Out of memory (std::bad_alloc, or c10's allocator refusing) says nothing about the file:
// RESOURCE_EXHAUSTED, which a resume does not pass over as it does a damaged checkpoint.
bool IsOutOfMemory(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) return true;
  const std::string what = e.what();
  return what.find("can't allocate memory") != std::string::npos ||
         what.find("CUDA out of memory") != std::string::npos;
}

template <typename Fn>
absl::Status Guard(const std::string& what, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (IsOutOfMemory(e)) {
      return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory: ", msg.substr(0, msg.find('\n'))));
    }
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", msg.substr(0, msg.find('\n'))));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SaveCheckpoint(const std::string& path, ClassifierImpl& model,
                            const AdamOptimizer* optimizer, const CheckpointMeta& meta,
                            const common::AtomicWriteOptions& write, const CheckpointGroups& groups) {
  // Serialized in memory first: torch's file writer throws from its destructor when the disk
  // fills up (c10::Error "unexpected pos"), which ends the process; a string cannot fail so.
  std::ostringstream bytes;
  absl::Status st = Guard(absl::StrCat("serializing checkpoint ", path), [&] {
    torch::serialize::OutputArchive archive;
    torch::serialize::OutputArchive weights;
    for (const auto& p : model.named_parameters()) weights.write(p.key(), p.value().detach());
    for (const auto& b : model.named_buffers()) weights.write(b.key(), b.value(), /*is_buffer=*/true);
    archive.write("model", weights);
    if (optimizer != nullptr) {
      torch::serialize::OutputArchive optim;
      for (const auto& [name, t] : optimizer->ExportState()) optim.write(name, t, /*is_buffer=*/true);
      archive.write("optimizer_state", optim);
    }
    for (const auto& [group, tensors] : groups) {
      torch::serialize::OutputArchive g;
      for (const auto& [name, t] : tensors) g.write(name, t, /*is_buffer=*/true);
      archive.write(group, g);
    }
    archive.write("meta", c10::IValue(MetaToYaml(meta)));
    archive.save_to(bytes);
  });
  if (!st.ok()) return absl::InternalError(st.message());
  return common::WriteFileAtomically(path, bytes.str(), write);
}

std::string NumericsChange(const CheckpointMeta& meta, const std::string& device_type, bool autocast) {
  if (meta.autocast < 0 || meta.device_type.empty()) return "";
  if (meta.device_type == device_type && (meta.autocast == 1) == autocast) return "";
  const auto says = [](const std::string& device, bool bf16) {
    return absl::StrCat(device, bf16 ? " with bf16 autocast" : " in fp32");
  };
  return absl::StrCat("was written by a run on ", says(meta.device_type, meta.autocast == 1), "; this one trains on ",
                      says(device_type, autocast),
                      ": the run goes on in other arithmetic, so it is not bit-exact against an uninterrupted one "
                      "(the device and train.precision decide it)");
}

ResumeChoice PickResumeCheckpoint(const std::vector<ResumeCandidate>& candidates, const std::string& stage,
                                  int fold, const std::string& task_id) {
  ResumeChoice choice;
  choice.skipped.resize(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) {
    const ResumeCandidate& c = candidates[i];
    if (!c.meta.ok()) {
      choice.skipped[i] = std::string(c.meta.status().message());
      continue;
    }
    const CheckpointMeta& m = *c.meta;
    if (m.stage != stage || m.fold != fold) {
      choice.skipped[i] = absl::StrCat(c.path, " belongs to stage ", m.stage, " fold ", m.fold, ", not stage ",
                                       stage, " fold ", fold);
      continue;
    }
    if (!m.task_id.empty() && !task_id.empty() && m.task_id != task_id) {
      choice.skipped[i] = absl::StrCat(c.path, " belongs to task ", m.task_id, ", not ", task_id);
      continue;
    }
    if (choice.index >= 0) {
      const CheckpointMeta& best = *candidates[choice.index].meta;
      // A mid-epoch position in rows of the epoch's order (per-rank batches): a loader batch is
      // world_size of them, and runs on other numbers of ranks write the same files.
      auto rows = [](const CheckpointMeta& c) {
        return c.in_epoch >= 0 ? c.batches_done * std::max(c.world_size, 1) : int64_t{-1};
      };
      // The attempt decides before the position only between attempts of one task (a later
      // attempt's file beats a late write of an earlier one). `train` writes attempt 0 and no
      // task: its mid-epoch stop in a folder a task's attempt 2 wrote lost to that attempt's
      // older end of epoch, and was set aside as unreadable.
      const bool one_task = !m.task_id.empty() && m.task_id == best.task_id;
      const auto key = [&](const CheckpointMeta& c) {
        return std::make_tuple(c.epoch, one_task ? c.attempt : 0, rows(c), c.step, c.attempt);
      };
      if (key(m) <= key(best)) {
        choice.skipped[i] = absl::StrCat(c.path, " holds epoch ", m.epoch, " (attempt ", m.attempt, "), not newer than ",
                                         candidates[choice.index].path);
        continue;
      }
      choice.skipped[choice.index] = absl::StrCat(candidates[choice.index].path, " holds epoch ", best.epoch,
                                                  " (attempt ", best.attempt, "), older than ", c.path);
    }
    choice.index = static_cast<int>(i);
    choice.skipped[i].clear();
  }
  // Candidates come newest first (the rotation's order): one that cannot be read now and is
  // listed before the choice (or with no choice) may hold a newer epoch than the choice.
  const size_t before = choice.index < 0 ? candidates.size() : static_cast<size_t>(choice.index);
  for (size_t i = 0; i < before; ++i) {
    const absl::StatusCode code = candidates[i].meta.status().code();
    if (BlocksResume(candidates[i].meta.status())) {
      choice.index = -1;
      choice.blocked = absl::Status(
          code, absl::StrCat(candidates[i].meta.status().message(), ": it may hold the newest epoch, so the run "
                                                                     "does not go on from an older one; make it "
                                                                     "readable, or start over with --no-resume (the "
                                                                     "files are then moved aside)"));
      break;
    }
  }
  return choice;
}

bool IsOtherCheckpointFormat(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kOtherFormatUrl).has_value();
}

bool BlocksResume(const absl::Status& status) {
  const absl::StatusCode code = status.code();
  return code == absl::StatusCode::kPermissionDenied || code == absl::StatusCode::kUnavailable ||
         code == absl::StatusCode::kResourceExhausted || IsOtherCheckpointFormat(status);
}

void SetCheckpointReadFaultForTest(std::function<int(const std::string& path)> fault) {
  ReadFault() = std::move(fault);
}

absl::Status UnreadableCheckpoint(const std::string& path, int error, const char* doing) {
  const std::string what = absl::StrCat(path, ": ", doing, ": ", std::strerror(error));
  return error == EACCES || error == EPERM ? absl::PermissionDeniedError(what) : absl::UnavailableError(what);
}

namespace {

// Little-endian fields of the zip format.
uint64_t LoadLe(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A record of tensor bytes ("<archive>/data/<n>", "<archive>/constants/<n>"), which torch copies
// and does not parse: the rest (the pickles, code/, version) it parses.
bool IsTensorRecord(absl::string_view name) {
  const size_t slash = name.find('/');
  if (slash == absl::string_view::npos) return false;
  const absl::string_view rest = name.substr(slash + 1);
  return absl::StartsWith(rest, "data/") || absl::StartsWith(rest, "constants/");
}

// Every stored record of the zip archive in `fd` (`size` bytes) against the CRC-32 its central
// directory holds. torch writes one (PyTorchStreamWriter) but its reader never checks it (miniz
// is built without the reader's CRC checks): a checkpoint whose tensor bytes rotted on disk or
// were damaged in a copy, the file's size unchanged, loaded as if whole, and a run resumed from
// damaged weights and Adam moments beside a good last.prev.pt. DATA_LOSS naming the record;
// UNAVAILABLE for a read error (as OpenArchive's). `*not_zip`: the file holds no zip directory.
// `parsed_only`: only the records torch parses, not the tensors' bytes (IsTensorRecord).
absl::Status VerifyRecordChecksums(int fd, uint64_t size, const std::string& path, bool parsed_only, bool* not_zip) {
  *not_zip = false;
  auto read_at = [&](uint64_t pos, size_t n, std::string* out) -> absl::Status {
    out->resize(n);
    size_t done = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd, out->data() + done, n - done, static_cast<off_t>(pos + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return UnreadableCheckpoint(path, errno, "reading the checkpoint");
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    if (done != n) return absl::DataLossError(absl::StrCat(path, ": damaged: the zip directory points past the end"));
    return absl::OkStatus();
  };
  auto damaged = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat(path, ": damaged (", why, ")"));
  };
  auto u = [](const std::string& b, size_t at, int bytes) {
    return LoadLe(reinterpret_cast<const unsigned char*>(b.data()) + at, bytes);
  };
  // The end-of-central-directory record: within the last 22 + 65535 bytes (its comment).
  const uint64_t tail_size = std::min<uint64_t>(size, 22 + 65535);
  std::string tail;
  AVIARY_RETURN_IF_ERROR(read_at(size - tail_size, static_cast<size_t>(tail_size), &tail));
  size_t eocd = std::string::npos;
  for (size_t i = tail.size() >= 22 ? tail.size() - 22 + 1 : 0; i-- > 0;) {
    if (u(tail, i, 4) == 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd == std::string::npos) {
    *not_zip = true;  // no zip at all (cut short, another format): the archive reader says what
    return damaged("no zip directory at its end");
  }
  uint64_t entries = u(tail, eocd + 10, 2);
  uint64_t dir_size = u(tail, eocd + 12, 4);
  uint64_t dir_offset = u(tail, eocd + 16, 4);
  if (entries == 0xFFFF || dir_size == 0xFFFFFFFF || dir_offset == 0xFFFFFFFF) {
    // ZIP64: the locator just before, pointing at the 64-bit record.
    if (eocd < 20 || u(tail, eocd - 20, 4) != 0x07064b50) return damaged("no zip64 locator");
    const uint64_t at = u(tail, eocd - 20 + 8, 8);
    if (at > size || size - at < 56) return damaged("the zip64 record lies outside the file");
    std::string record;
    AVIARY_RETURN_IF_ERROR(read_at(at, 56, &record));
    if (u(record, 0, 4) != 0x06064b50) return damaged("no zip64 record");
    entries = u(record, 32, 8);
    dir_size = u(record, 40, 8);
    dir_offset = u(record, 48, 8);
  }
  if (dir_offset > size || dir_size > size - dir_offset) return damaged("the zip directory lies outside the file");
  std::string dir;
  AVIARY_RETURN_IF_ERROR(read_at(dir_offset, static_cast<size_t>(dir_size), &dir));
  std::vector<char> chunk(1 << 20);
  size_t at = 0;
  // The bytes checksummed so far: records that do not overlap hold at most the file's size (a
  // directory listing one large record 65,535 times was hours of CRC work from a 50 MB file).
  uint64_t summed = 0;
  for (uint64_t e = 0; e < entries; ++e) {
    if (dir.size() - at < 46 || u(dir, at, 4) != 0x02014b50) return damaged("a zip directory entry is not one");
    const uint64_t method = u(dir, at + 10, 2);
    const uint32_t crc = static_cast<uint32_t>(u(dir, at + 16, 4));
    uint64_t stored = u(dir, at + 20, 4);
    uint64_t plain = u(dir, at + 24, 4);
    const size_t name_len = u(dir, at + 28, 2), extra_len = u(dir, at + 30, 2), comment_len = u(dir, at + 32, 2);
    uint64_t local = u(dir, at + 42, 4);
    if (dir.size() - at - 46 < name_len + extra_len + comment_len) return damaged("a zip directory entry is cut");
    const std::string name = dir.substr(at + 46, name_len);
    // The ZIP64 extra field: the 64-bit values of the fields set to 0xFFFFFFFF, in this order.
    for (size_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = u(dir, x, 2), len = u(dir, x + 2, 2);
      if (x + 4 + len > at + 46 + name_len + extra_len) break;
      if (id == 0x0001) {
        size_t f = x + 4;
        for (uint64_t* field : {&plain, &stored, &local}) {
          if (*field != 0xFFFFFFFF) continue;
          if (f + 8 > x + 4 + len) return damaged(absl::StrCat("record ", name, ": a short zip64 field"));
          *field = u(dir, f, 8);
          f += 8;
        }
      }
      x += 4 + len;
    }
    at += 46 + name_len + extra_len + comment_len;
    if (parsed_only && IsTensorRecord(name)) continue;
    if (method != 0) continue;  // compressed: torch writes none (and its reader inflates with its own check)
    // 0: none recorded (Python's torch.save with serialization.config.save.compute_crc32 off).
    if (crc == 0) continue;
    if (stored != plain) return damaged(absl::StrCat("record ", name, ": stored and plain sizes differ"));
    std::string header;
    if (local > size || size - local < 30) return damaged(absl::StrCat("record ", name, " lies outside the file"));
    AVIARY_RETURN_IF_ERROR(read_at(local, 30, &header));
    if (u(header, 0, 4) != 0x04034b50) return damaged(absl::StrCat("record ", name, ": no local header"));
    const uint64_t data = local + 30 + u(header, 26, 2) + u(header, 28, 2);
    if (data > size || stored > size - data) return damaged(absl::StrCat("record ", name, " lies outside the file"));
    if (stored > size - summed) return damaged(absl::StrCat("record ", name, ": the records overlap"));
    summed += stored;
    uLong sum = crc32(0L, Z_NULL, 0);
    for (uint64_t done = 0; done < stored;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), stored - done));
      const ssize_t got = ::pread(fd, chunk.data(), n, static_cast<off_t>(data + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return UnreadableCheckpoint(path, errno, "reading the checkpoint");
      if (got == 0) return damaged(absl::StrCat("record ", name, " is cut"));
      sum = crc32(sum, reinterpret_cast<const Bytef*>(chunk.data()), static_cast<uInt>(got));
      done += static_cast<uint64_t>(got);
    }
    if (static_cast<uint32_t>(sum) != crc) {
      return absl::DataLossError(absl::StrFormat(
          "%s: damaged: record %s (%d bytes) has CRC-32 %08x, the archive wrote %08x (bytes changed on disk or in a "
          "copy)",
          path, name, stored, static_cast<uint32_t>(sum), crc));
    }
  }
  return absl::OkStatus();
}

// The whole archive is read here, from one open file: a checkpoint renamed over meanwhile is
// read as it was when opened. A read that fails (EIO, ESTALE on NFS) is UNAVAILABLE, not "not an
// aviary checkpoint": torch's own file reader says only "file read failed", and a resume would
// take the healthy newest checkpoint for a damaged one and go on from an older one.
// The records torch parses (data.pkl, constants.pkl, code/, version: small) are checked against
// their checksums first: its reader has no bounds checks of its own, and one byte changed in
// constants.pkl aborted the process ("free(): invalid size") where a damaged checkpoint must be
// DATA_LOSS, and a resume fall back. `verify`: the tensors' records too, after the read
// (VerifyRecordChecksums: a read of the whole file).
absl::Status OpenArchive(const std::string& path, torch::serialize::InputArchive* archive, bool verify) {
  const int injected = ReadFault() ? ReadFault()(path) : 0;
  // O_NONBLOCK: a FIFO under the name would block the open; pread of a regular file ignores it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT || error == ENOTDIR) return absl::NotFoundError(absl::StrCat(path, ": no such checkpoint"));
    // Not "no such checkpoint": a resume must not fall back past a file it cannot read now.
    return UnreadableCheckpoint(path, error, "cannot read the checkpoint");
  }
  const std::unique_ptr<int, void (*)(int*)> closer(new int(fd), [](int* f) {
    ::close(*f);
    delete f;
  });
  struct stat info {};
  if (::fstat(fd, &info) != 0) return UnreadableCheckpoint(path, errno, "cannot read the checkpoint");
  if (!S_ISREG(info.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not an aviary checkpoint: not a regular file"));
  }
  int read_error = 0;
  auto read = [&](uint64_t pos, void* buf, size_t n) -> size_t {
    if (injected != 0) {
      read_error = injected;
      return 0;
    }
    size_t done = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(pos + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        read_error = errno;
        break;
      }
      if (got == 0) break;  // past the end: a short file, which the archive reader refuses
      done += static_cast<size_t>(got);
    }
    return done;
  };
  const size_t size = static_cast<size_t>(info.st_size);
  if (injected == 0) {
    bool not_zip = false;
    const absl::Status parsed = VerifyRecordChecksums(fd, size, path, /*parsed_only=*/true, &not_zip);
    if (!parsed.ok() && !not_zip) return parsed;  // not a zip: the archive reader says what it is
  }
  // Onto the CPU: a checkpoint written on a GPU holds CUDA tensors, which a host without one
  // could not even open; the readers copy each tensor to where it goes.
  absl::Status st = Guard(absl::StrCat(path, ": not an aviary checkpoint"), [&] {
    archive->load_from(read, [size] { return size; }, torch::Device(torch::kCPU));
  });
  if (read_error != 0) return UnreadableCheckpoint(path, read_error, "reading the checkpoint");
  if (absl::IsResourceExhausted(st)) {
    // Records are stored uncompressed: one larger than the file is a damaged size field, not a
    // host short of memory (which a resume would wait for instead of falling back).
    const std::string message(st.message());
    const size_t at = message.find("tried to allocate ");
    uint64_t wanted = 0;
    if (at != std::string::npos &&
        absl::SimpleAtoi(absl::string_view(message).substr(at + 18, message.find(' ', at + 18) - (at + 18)),
                         &wanted) &&
        wanted > size) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not an aviary checkpoint: a record of ", wanted,
                                                     " bytes in a file of ", size));
    }
    return absl::ResourceExhaustedError(absl::StrCat(path, ": reading the checkpoint (", size, " bytes): ",
                                                     message.substr(message.find("out of memory"))));
  }
  if (st.ok() && verify && injected == 0) {
    bool not_zip = false;
    return VerifyRecordChecksums(fd, size, path, /*parsed_only=*/false, &not_zip);
  }
  return st;
}

absl::StatusOr<CheckpointMeta> ReadMeta(torch::serialize::InputArchive& archive,
                                        const std::string& path) {
  c10::IValue value;
  absl::Status st = Guard(absl::StrCat(path, ": no checkpoint metadata"),
                          [&] { archive.read("meta", value); });
  if (!st.ok()) return st;
  if (!value.isString()) return absl::InvalidArgumentError(absl::StrCat(path, ": bad metadata"));
  return MetaFromYaml(value.toStringRef(), path);
}

}  // namespace

absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& path) {
  torch::serialize::InputArchive archive;
  absl::Status st = OpenArchive(path, &archive, /*verify=*/false);
  if (!st.ok()) return st;
  return ReadMeta(archive, path);
}

namespace {

absl::StatusOr<NamedTensors> ReadModelTensors(torch::serialize::InputArchive& archive, const std::string& path) {
  NamedTensors out;
  absl::Status st = Guard(absl::StrCat(path, ": reading model tensors"), [&] {
    torch::serialize::InputArchive weights;
    archive.read("model", weights);
    for (const std::string& key : weights.keys()) {
      at::Tensor t;
      weights.read(key, t);
      out.emplace_back(key, t);
    }
  });
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<NamedTensors> ReadGroup(torch::serialize::InputArchive& archive, const std::string& path,
                                       const std::string& group) {
  std::vector<std::string> keys = archive.keys();
  if (std::find(keys.begin(), keys.end(), group) == keys.end()) {
    return absl::NotFoundError(absl::StrCat(path, ": holds no ", group));
  }
  NamedTensors out;
  absl::Status st = Guard(absl::StrCat(path, ": reading ", group), [&] {
    torch::serialize::InputArchive g;
    archive.read(group, g);
    for (const std::string& key : g.keys()) {
      at::Tensor t;
      g.read(key, t, /*is_buffer=*/true);
      out.emplace_back(key, t);
    }
  });
  if (!st.ok()) return st;
  return out;
}

}  // namespace

absl::StatusOr<NamedTensors> ReadCheckpointTensors(const std::string& path) {
  torch::serialize::InputArchive archive;
  AVIARY_RETURN_IF_ERROR(OpenArchive(path, &archive, /*verify=*/true));
  return ReadModelTensors(archive, path);
}

absl::StatusOr<NamedTensors> ReadCheckpointGroup(const std::string& path, const std::string& group,
                                                 bool* holds_optimizer) {
  torch::serialize::InputArchive archive;
  AVIARY_RETURN_IF_ERROR(OpenArchive(path, &archive, /*verify=*/true));
  if (holds_optimizer != nullptr) {
    const std::vector<std::string> keys = archive.keys();
    *holds_optimizer = std::find(keys.begin(), keys.end(), "optimizer_state") != keys.end() ||
                       std::find(keys.begin(), keys.end(), "optimizer") != keys.end();
  }
  return ReadGroup(archive, path, group);
}

bool SameCheckpointMeta(const CheckpointMeta& a, const CheckpointMeta& b) { return MetaToYaml(a) == MetaToYaml(b); }

namespace {

// torch::optim keys its state by TensorImpl: a string of the pointer in torch 1.x, the pointer
// itself in 2.x.
template <typename Map>
auto LegacyStateKey(const Map&, c10::TensorImpl* impl) {
  if constexpr (std::is_same_v<typename Map::key_type, std::string>) {
    std::ostringstream key;  // c10::guts::to_string(impl) of torch 1.x
    key << impl;
    return key.str();
  } else {
    return static_cast<void*>(impl);
  }
}

// A checkpoint of aviary 0.1's first wave: torch::optim::Adam's own archive over
// model.parameters(), in order.
absl::Status RestoreLegacyOptimizer(torch::serialize::InputArchive& archive, ClassifierImpl& model,
                                    AdamOptimizer* optimizer, const std::string& path) {
  std::vector<at::Tensor> params = model.parameters();
  torch::optim::Adam legacy(params, torch::optim::AdamOptions(1e-3));
  absl::Status st = Guard(
      absl::StrCat(path, ": its optimizer state was written by torch::optim of another libtorch and "
                         "cannot be read here (train on with --no-resume, or resume it with the build that wrote it)"),
      [&] {
        torch::serialize::InputArchive optim;
        archive.read("optimizer", optim);
        legacy.load(optim);
      });
  if (!st.ok()) return st;
  NamedTensors state;
  auto names = model.named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    auto it = legacy.state().find(LegacyStateKey(legacy.state(), params[i].unsafeGetTensorImpl()));
    if (it == legacy.state().end()) continue;
    auto& s = static_cast<torch::optim::AdamParamState&>(*it->second);
    const std::string& name = names[i].key();
    state.emplace_back(name + ".exp_avg", s.exp_avg());
    state.emplace_back(name + ".exp_avg_sq", s.exp_avg_sq());
    state.emplace_back(name + ".step", at::scalar_tensor(s.step(), at::kLong));
  }
  return optimizer->ImportState(state, path);
}

}  // namespace

absl::StatusOr<CheckpointMeta> RestoreCheckpoint(const std::string& path, ClassifierImpl& model,
                                                 AdamOptimizer* optimizer, const std::string& group,
                                                 absl::StatusOr<NamedTensors>* group_tensors) {
  torch::serialize::InputArchive archive;
  absl::Status st = OpenArchive(path, &archive, /*verify=*/true);
  if (!st.ok()) return st;
  auto meta = ReadMeta(archive, path);
  if (!meta.ok()) return meta.status();
  if (meta->model_name != model.name() || meta->num_classes != model.num_classes() ||
      meta->in_channels != model.in_channels()) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": checkpoint of ", meta->model_name, " with ", meta->num_classes, " classes and ",
        meta->in_channels, " input channels does not fit the model ", model.name(), " with ",
        model.num_classes(), " classes and ", model.in_channels(), " input channels"));
  }
  auto tensors = ReadModelTensors(archive, path);  // the same open file as the metadata
  if (!tensors.ok()) return tensors.status();
  auto report = LoadIntoModule(*tensors, model, LoadOptions{}, path);
  if (!report.ok()) return report.status();
  if (optimizer != nullptr) {
    std::vector<std::string> keys = archive.keys();
    if (std::find(keys.begin(), keys.end(), "optimizer_state") != keys.end()) {
      NamedTensors state;
      st = Guard(absl::StrCat(path, ": reading the optimizer state"), [&] {
        torch::serialize::InputArchive optim;
        archive.read("optimizer_state", optim);
        for (const std::string& key : optim.keys()) {
          at::Tensor t;
          optim.read(key, t, /*is_buffer=*/true);
          state.emplace_back(key, t);
        }
      });
      if (!st.ok()) return st;
      st = optimizer->ImportState(state, path);
    } else if (std::find(keys.begin(), keys.end(), "optimizer") != keys.end()) {
      st = RestoreLegacyOptimizer(archive, model, optimizer, path);
    } else {
      st = absl::InvalidArgumentError(absl::StrCat(path, ": holds no optimizer state (a best.pt?); resume from last.pt"));
    }
    if (!st.ok()) return st;
  }
  if (group_tensors != nullptr) *group_tensors = ReadGroup(archive, path, group);
  return meta;
}

}  // namespace aviary::worker
