#include "worker/weights.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/backbone_fit.h"
#include "common/csv.h"
#include "common/files.h"
#include "common/status.h"
#include "common/tensor_index.h"
#include "worker/torch_pickle.h"
#include "yaml-cpp/yaml.h"

namespace aviary::worker {
namespace {

std::string ShapeString(at::IntArrayRef sizes) {
  return absl::StrCat("[", absl::StrJoin(sizes, ", "), "]");
}

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
const DtypeName kDtypes[] = {{"F64", at::kDouble}, {"F32", at::kFloat},  {"F16", at::kHalf},
                             {"BF16", at::kBFloat16}, {"I64", at::kLong}, {"I32", at::kInt},
                             {"I16", at::kShort},  {"I8", at::kChar},    {"U8", at::kByte},
                             {"BOOL", at::kBool}};

}  // namespace

absl::StatusOr<NamedTensors> ReadSafetensors(const std::string& path) {
  // Told apart by the header (a torch.save archive is a zip), as the index does; then the
  // coordinator's reader (common/tensor_index.h) lists the tensors and checks every length the
  // header gives (its size, JSON only, names, shapes, ranges that overlap nothing), and the
  // values are read by the offsets it found (ReadWeightsFile).
  std::string head(9, '\0');
  if (std::ifstream in(path, std::ios::binary); in && (!in.read(head.data(), 9) || head[8] != '{')) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a safetensors file (no JSON header)"));
  }
  return ReadWeightsFile(path, /*torch_save_only=*/false);
}

absl::Status WriteSafetensors(const NamedTensors& tensors, const std::string& path) {
  YAML::Emitter header;
  header << YAML::Flow << YAML::BeginMap;
  uint64_t offset = 0;
  std::string data;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.contiguous().cpu();
    const char* dtype = nullptr;
    for (const auto& d : kDtypes) {
      if (t.scalar_type() == d.type) dtype = d.name;
    }
    if (!dtype) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors: unsupported dtype for ", name));
    }
    const uint64_t n = t.numel() * t.element_size();
    // Every key double-quoted: the header must be JSON (safetensors' Python reader and
    // json.loads refuse YAML's plain scalars).
    header << YAML::Key << YAML::DoubleQuoted << name << YAML::Value << YAML::BeginMap;
    header << YAML::Key << YAML::DoubleQuoted << "dtype" << YAML::Value << YAML::DoubleQuoted
           << dtype;
    header << YAML::Key << YAML::DoubleQuoted << "shape" << YAML::Value << YAML::Flow
           << YAML::BeginSeq;
    for (int64_t d : t.sizes()) header << d;
    header << YAML::EndSeq;
    header << YAML::Key << YAML::DoubleQuoted << "data_offsets" << YAML::Value << YAML::Flow
           << YAML::BeginSeq << offset
           << offset + n << YAML::EndSeq << YAML::EndMap;
    data.append(static_cast<const char*>(t.data_ptr()), n);
    offset += n;
  }
  header << YAML::EndMap;
  std::string json = header.c_str();
  while ((8 + json.size()) % 8 != 0) json.push_back(' ');
  uint64_t len = json.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &len, 8);
  bytes += json;
  bytes += data;
  return common::WriteOutputFileAtomically(path, bytes);  // a link as the output is written through
}

absl::StatusOr<NamedTensors> ReadStateDict(const std::string& path) {
  // One reader for both formats, the coordinator's (it tells them apart as LooksLikeSafetensors
  // did: a plausible header length and a '{'), so that both refuse the same files.
  AVIARY_ASSIGN_OR_RETURN(NamedTensors tensors, ReadWeightsFile(path, /*torch_save_only=*/false));
  if (tensors.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": the state dict holds no tensors"));
  return tensors;
}

std::string LoadReport::Summary() const {
  std::string s = absl::StrCat(loaded.size(), " tensors loaded");
  // The first few names of each list: a checkpoint of another model misses hundreds, and this
  // text reaches `aviary status` and `watch` (a task's error) whole.
  auto list = [&](const char* what, const std::vector<std::string>& names) {
    if (!names.empty()) absl::StrAppend(&s, "; ", names.size(), " ", what, ": ", common::FirstNames(names));
  };
  list("missing", missing);
  list("unexpected", unexpected);
  list("mismatched", mismatched);
  return s;
}

absl::StatusOr<LoadReport> LoadIntoModule(const NamedTensors& tensors, torch::nn::Module& module,
                                          const LoadOptions& options, const std::string& source) {
  std::map<std::string, at::Tensor> targets;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) targets[p.key()] = p.value();
  for (const auto& b : module.named_buffers(/*recurse=*/true)) targets[b.key()] = b.value();
  auto wanted = [&](const std::string& name) {
    return options.only_prefix.empty() || name.rfind(options.only_prefix, 0) == 0;
  };
  LoadReport report;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (destination, source)
  std::map<std::string, bool> seen;
  std::set<std::string> names;
  for (const auto& [name, tensor] : tensors) {
    if (!names.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": two tensors are named '", name, "': which one is meant is ambiguous"));
    }
    auto it = targets.find(name);
    if (it == targets.end() || !wanted(name)) {
      report.unexpected.push_back(name);
      continue;
    }
    seen[name] = true;
    if (it->second.sizes() != tensor.sizes()) {
      report.mismatched.push_back(absl::StrCat(name, ": file ", ShapeString(tensor.sizes()),
                                               " vs model ", ShapeString(it->second.sizes())));
      continue;
    }
    copies.emplace_back(it->second, tensor);
    report.loaded.push_back(name);
  }
  for (const auto& [name, t] : targets) {
    if (wanted(name) && !seen.count(name) && !common::OptionalStateTensor(name)) report.missing.push_back(name);
  }
  const bool fail = (!report.mismatched.empty() && !options.skip_mismatched) ||
                    (!report.missing.empty() && options.require_all) ||
                    (!report.unexpected.empty() && !options.allow_unexpected);
  if (fail) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": weights do not fit the model: ", report.Summary()));
  }
  torch::NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst.copy_(src.to(dst.device(), dst.scalar_type()));
  return report;
}

common::TensorIndex IndexOf(const NamedTensors& tensors) {
  common::TensorIndex out;
  for (const auto& [name, t] : tensors) {
    const char* dtype = "?";
    for (const auto& d : kDtypes) {
      if (t.scalar_type() == d.type) dtype = d.name;
    }
    out.push_back(common::TensorEntry{name, dtype, t.sizes().vec()});
  }
  return out;
}

common::TensorIndex BackboneIndex(torch::nn::Module& module) {
  NamedTensors backbone;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    if (p.key().rfind("features.", 0) == 0) backbone.emplace_back(p.key(), p.value());
  }
  for (const auto& b : module.named_buffers(/*recurse=*/true)) {
    if (b.key().rfind("features.", 0) == 0) backbone.emplace_back(b.key(), b.value());
  }
  return IndexOf(backbone);
}

}  // namespace aviary::worker
