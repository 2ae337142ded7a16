#include "common/backbone_fit.h"

#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model_shapes.h"

namespace aviary::common {

bool OptionalStateTensor(absl::string_view name) {
  return name == "num_batches_tracked" || absl::EndsWith(name, ".num_batches_tracked");
}

std::string FirstNames(const std::vector<std::string>& names, size_t shown) {
  shown = std::min(names.size(), shown);
  return absl::StrCat(absl::StrJoin(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(shown), ", "),
                      names.size() > shown ? absl::StrCat(", ... (", names.size() - shown, " more)") : "");
}

std::string BackboneFit::Summary() const {
  std::string s = absl::StrCat(fitting.size(), " backbone tensors fit");
  auto list = [&](const char* what, const std::vector<std::string>& names) {
    if (!names.empty()) absl::StrAppend(&s, "; ", names.size(), " ", what, ": ", FirstNames(names));
  };
  list("missing", missing);
  list("unexpected", unexpected);
  list("mismatched", mismatched);
  if (stem_skipped) absl::StrAppend(&s, "; the stem ", kStemWeight, " is for another channel count (left random)");
  return s;
}

namespace {

// Whether a safetensors dtype name holds integers or booleans: values that a float weight would
// take by a cast (a quantized file's int8 codes as the initialisation).
bool IntegerDtype(const std::string& dtype) {
  return dtype == "I64" || dtype == "I32" || dtype == "I16" || dtype == "I8" || dtype == "U8" || dtype == "BOOL";
}

bool FloatDtype(const std::string& dtype) {
  return dtype == "F64" || dtype == "F32" || dtype == "F16" || dtype == "BF16";
}

}  // namespace

BackboneFit CompareBackbone(const TensorIndex& file, const TensorIndex& expected) {
  std::map<std::string, const TensorEntry*> model;
  for (const TensorEntry& e : expected) model[e.name] = &e;
  BackboneFit fit;
  std::map<std::string, bool> seen;
  for (const TensorEntry& f : file) {
    if (f.name.rfind("features.", 0) != 0) continue;
    auto it = model.find(f.name);
    if (it == model.end()) {
      fit.unexpected.push_back(f.name);
      continue;
    }
    seen[f.name] = true;
    const std::vector<int64_t>& want = it->second->shape;
    if (FloatDtype(it->second->dtype) && IntegerDtype(f.dtype)) {
      fit.mismatched.push_back(absl::StrCat(f.name, ": file ", f.dtype, " values vs model ", it->second->dtype));
      continue;
    }
    if (f.shape == want) {
      fit.fitting.push_back(f.name);
      continue;
    }
    // The stem for another number of input planes: every dimension but the channels agrees.
    bool stem = f.name == kStemWeight && f.shape.size() == want.size() && want.size() == 4;
    for (size_t d = 0; stem && d < want.size(); ++d) stem = d == 1 || f.shape[d] == want[d];
    if (stem) {
      fit.stem_skipped = true;
    } else {
      fit.mismatched.push_back(absl::StrCat(f.name, ": file ", ShapeText(f.shape), " vs model ", ShapeText(want)));
    }
  }
  for (const TensorEntry& e : expected) {
    if (!seen.count(e.name) && !OptionalStateTensor(e.name)) fit.missing.push_back(e.name);
  }
  return fit;
}

absl::Status CheckBackboneFit(const BackboneFit& fit, const std::string& path, const std::string& model,
                              int in_channels) {
  if (fit.ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "key 'model.pretrained_weights': '", path, "' does not fit model ", model, " (frontend.in_channels ",
      in_channels, "): ", fit.Summary(),
      fit.fitting.empty() && fit.unexpected.empty()
          ? absl::StrCat("; no `features.*` backbone tensor in the file: `aviary weights import --model ", model,
                         "` turns a torchvision or timm checkpoint into one")
          : ""));
}

absl::Status CheckWeightsFile(const std::string& path, const std::string& model, int in_channels) {
  absl::StatusOr<TensorIndex> file = ReadTensorIndex(path);
  if (absl::IsNotFound(file.status()) || absl::IsPermissionDenied(file.status())) return file.status();
  if (!file.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("key 'model.pretrained_weights': ", file.status().message()));
  }
  absl::StatusOr<TensorIndex> expected = BackboneShapes(model, in_channels);
  if (!expected.ok()) return expected.status();
  return CheckBackboneFit(CompareBackbone(*file, *expected), path, model, in_channels);
}

}  // namespace aviary::common
