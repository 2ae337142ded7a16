#include "worker/export.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include <torch/nn/module.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/backbone_fit.h"
#include "common/config.h"
#include "common/files.h"
#include "common/utf8.h"
#include "common/status.h"
#include "common/version.h"
#include "worker/checkpoint.h"
#include "worker/ema.h"
#include "worker/models.h"
#include "worker/onnx_export.h"
#include "worker/torch_pickle.h"

namespace aviary::worker {
namespace {

std::string ShapeString(at::IntArrayRef sizes) {
  return absl::StrCat("[", absl::StrJoin(sizes, ", "), "]");
}

// A JSON string literal. Bytes that are not UTF-8 (a Latin-1 file name) become U+FFFD: JSON is
// UTF-8, and json.load refused the whole sidecar.
std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : common::ValidUtf8(s)) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// A number as JSON: the shortest of 6..17 significant digits that reads back exactly; null for
// NaN and infinities, which JSON lacks.
std::string Number(double v) {
  if (!std::isfinite(v)) return "null";
  std::string text;
  for (int p = 6; p <= 17; ++p) {
    std::ostringstream t;
    t.precision(p);
    t << v;
    text = t.str();
    double back = 0;
    if (absl::SimpleAtod(text, &back) && back == v) break;
  }
  return text;
}

// The model's tensors in Python's state_dict() order: per module (depth first), its own
// parameters, then its own buffers.
NamedTensors ModuleStateDict(torch::nn::Module& model) {
  NamedTensors out;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      out.emplace_back(prefix + p.key(), p.value().detach());
    }
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false)) {
      out.emplace_back(prefix + b.key(), b.value().detach());
    }
  }
  return out;
}

int64_t FileSize(const std::string& path) {
  std::error_code ec;
  auto n = std::filesystem::file_size(path, ec);
  return ec ? -1 : static_cast<int64_t>(n);
}

std::string SidecarJson(const ExportOptions& options, const ExportResult& result,
                        const CheckpointMeta& meta, const common::PipelineConfig& config) {
  const common::FrontendConfig& fe = config.frontend;
  const int sr = config.data.sample_rate;
  std::vector<std::string> classes;
  for (const std::string& c : meta.class_names) classes.push_back(Quote(c));
  std::ostringstream j;
  j << "{\n"
    << "  \"format\": \"aviary-export-1\",\n"
    << "  \"aviary_version\": " << Quote(common::Version()) << ",\n"
    << "  \"aviary_commit\": " << Quote(common::GitCommit()) << ",\n"
    << "  \"weights\": " << Quote(std::filesystem::path(options.out).filename().string()) << ",\n"
    << "  \"weights_format\": " << Quote(options.format) << ",\n"
    << "  \"model\": {\n"
    << "    \"name\": " << Quote(meta.model_name) << ",\n"
    << "    \"torchvision\": " << (result.torchvision.empty() ? "null" : Quote(result.torchvision)) << ",\n"
    << "    \"num_classes\": " << meta.num_classes << ",\n"
    << "    \"in_channels\": " << meta.in_channels << ",\n"
    << "    \"neck_features\": " << config.model.neck_features << ",\n"
    << "    \"dropout\": " << Number(config.model.dropout) << ",\n"
    << "    \"final_act\": " << Quote(config.model.final_act) << "\n"
    << "  },\n"
    << "  \"class_names\": [" << absl::StrJoin(classes, ", ") << "],\n"
    << "  \"sample_rate\": " << sr << ",\n"
    << "  \"channels\": " << Quote(config.data.channels) << ",\n"
    << "  \"window_s\": " << Number(options.window_s) << ",\n"
    << "  \"window_samples\": " << static_cast<int64_t>(std::llround(options.window_s * sr)) << ",\n"
    << "  \"frontend\": {\n"
    << "    \"stft\": {\"n_fft\": " << fe.n_fft << ", \"win_length\": " << fe.n_fft
    << ", \"hop_length\": " << fe.hop_length
    << ", \"window\": \"hann_periodic\", \"center\": true, \"pad_mode\": \"reflect\", \"power\": 2},\n"
    << "    \"mel\": {\"n_mels\": " << fe.n_mels << ", \"f_min\": " << Number(fe.fmin)
    << ", \"f_max\": " << Number(fe.fmax) << ", \"mel_scale\": \"htk\", \"norm\": null},\n"
    << "    \"db\": {\"amin\": 1e-10, \"top_db\": " << Number(fe.top_db) << ", \"clamp\": \"per_clip\"},\n"
    << "    \"normalize\": " << Quote(fe.normalize) << ",\n"
    << "    \"in_channels\": " << fe.in_channels << "\n"
    << "  },\n"
    << "  \"checkpoint\": {\"path\": " << Quote(options.checkpoint) << ", \"stage\": " << Quote(meta.stage)
    << ", \"fold\": " << meta.fold << ", \"epoch\": " << meta.epoch << ", \"step\": " << meta.step
    << ", \"monitor\": " << Quote(meta.monitor) << ", \"best_value\": " << Number(meta.best_value)
    << ", \"best_epoch\": " << meta.best_epoch << ", \"ema\": " << (result.ema ? "true" : "false") << "}\n"
    << "}\n";
  return j.str();
}

// Writes the weights and the sidecar JSON to the given paths; fills `out`'s sizes and names.
absl::Status WriteExportPair(const ExportOptions& options, const common::PipelineConfig& config,
                             const CheckpointMeta& meta, ClassifierImpl& model, const NamedTensors& tensors,
                             const std::string& weights_path, const std::string& sidecar_path,
                             ExportResult* out);

}  // namespace

std::string SidecarPath(const std::string& out) {
  return std::filesystem::path(out).replace_extension(".json").string();
}

absl::StatusOr<ExportResult> ExportCheckpoint(const ExportOptions& options) {
  if (options.format != "state_dict" && options.format != "safetensors" && options.format != "onnx") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--format: expected state_dict, safetensors or onnx, got '", options.format, "'"));
  }
  if (!(options.window_s > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("--window: must be > 0 seconds, got ", options.window_s));
  }
  ExportResult result;
  // A symbolic link as --out (or as its sidecar) is written through, as a shell's `>` would: the
  // staged files and the renames are beside the link's target, which they replace (a rename
  // onto the link replaced the link with a file, and its target kept the old weights). The
  // sidecar is named after --out as given (OUT with .json: where the notebook looks for it),
  // and written through when it is a link itself.
  absl::StatusOr<std::string> weights = common::ResolveOutputPath(options.out);
  if (!weights.ok()) return common::Annotate(weights.status(), "--out");
  result.weights_path = *weights;
  absl::StatusOr<std::string> sidecar = common::ResolveOutputPath(SidecarPath(options.out));
  if (!sidecar.ok()) return common::Annotate(sidecar.status(), "--out's sidecar");
  result.sidecar_path = *sidecar;
  // One file under two spellings ("m.json -> ./m.pt"): compared as normalized absolute paths.
  auto same_file = [](const std::string& a, const std::string& b) {
    std::error_code ec;
    const std::filesystem::path pa = std::filesystem::absolute(a, ec).lexically_normal();
    const std::filesystem::path pb = std::filesystem::absolute(b, ec).lexically_normal();
    return pa == pb || std::filesystem::equivalent(a, b, ec);
  };
  if (same_file(result.sidecar_path, result.weights_path)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--out ", options.out, ": the JSON sidecar would overwrite the weights; name the weights "
        "file with another extension (.pt, .pth, .safetensors)"));
  }
  // The sidecar's path too (a folder named like it would fail its rename after the weights'),
  // and a link's target.
  // The weights' path always (the CLI checks --out, a caller of this function may not: a folder
  // as --out was found out at the rename, after the whole model was read and written).
  AVIARY_RETURN_IF_ERROR(common::CheckOutputPath(
      result.weights_path != options.out ? absl::StrCat("--out ", options.out, ": its link's target") : "--out",
      result.weights_path));
  AVIARY_RETURN_IF_ERROR(common::CheckOutputPath("--out's sidecar", result.sidecar_path));
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(options.out, "--out", options.checkpoint, "checkpoint"));
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(result.weights_path, "--out", options.checkpoint, "checkpoint"));
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(result.sidecar_path, "--out's sidecar",
                                          options.checkpoint, "checkpoint"));
  // The metadata, the tensors and the EMA group are read in three opens: of one file.
  const std::optional<common::FileVersion> version = common::VersionOf(options.checkpoint);
  AVIARY_ASSIGN_OR_RETURN(CheckpointMeta meta, ReadCheckpointMeta(options.checkpoint));
  AVIARY_ASSIGN_OR_RETURN(
      common::PipelineConfig config,
      common::ParsePipelineConfig(meta.config_yaml, absl::StrCat(options.checkpoint, " (config_yaml)")));
  // Every format's window goes through the front end's reflect padding (the sidecar tells the
  // notebook the window; torch.stft refuses one of n_fft / 2 samples or fewer).
  const int sr = config.data.sample_rate;
  AVIARY_RETURN_IF_ERROR(common::CheckWindowIsWholeSamples(options.window_s, sr, "--window"));
  const int64_t min_samples = config.frontend.n_fft / 2 + 1;
  if (std::llround(options.window_s * sr) < min_samples) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--window: %g s is %d samples at %d Hz, fewer than the front end needs (%d for n_fft %d: at least %g s)",
        options.window_s, std::llround(options.window_s * sr), sr, min_samples, config.frontend.n_fft,
        static_cast<double>(min_samples) / sr));
  }
  // small_cnn's pools need frames the training clip had and a shorter window may not: the
  // export would load and fail at inference ("Output size is too small").
  AVIARY_RETURN_IF_ERROR(common::CheckWindowFitsModel(config, std::llround(options.window_s * sr),
                                                      absl::StrFormat("--window: %g s", options.window_s)));
  if (static_cast<int>(meta.class_names.size()) != meta.num_classes) {
    return absl::FailedPreconditionError(absl::StrCat(
        options.checkpoint, ": ", meta.class_names.size(), " class names for ", meta.num_classes,
        " model outputs; the export would not name its outputs"));
  }
  AVIARY_ASSIGN_OR_RETURN(std::shared_ptr<ClassifierImpl> model,
                          BuildClassifier(config.model, meta.in_channels, meta.num_classes));
  // Restoring checks that the tensors fit the model the metadata names, every one of them.
  AVIARY_RETURN_IF_ERROR(RestoreCheckpoint(options.checkpoint, *model, nullptr).status());
  // The weights the run validated: a last.pt of an ema_eval run holds them as its EMA state.
  common::TrainConfig stage_train = config.train;
  if (auto stage = common::GetStage(config, meta.stage); stage.ok()) stage_train = (*stage)->train;
  AVIARY_ASSIGN_OR_RETURN(result.ema, UseValidatedWeights(options.checkpoint, stage_train, *model));
  AVIARY_RETURN_IF_ERROR(common::CheckUnchanged(options.checkpoint, version));
  NamedTensors tensors = ModuleStateDict(*model);
  // The front end must give the first convolution the planes it takes; only an edited config or
  // checkpoint gets here, and every format would carry the mismatch (the ONNX graph's Concat, the
  // sidecar the notebook expands by).
  for (const auto& [name, t] : tensors) {
    if (t.dim() != 4) continue;
    if (t.size(1) != config.frontend.in_channels) {
      return absl::FailedPreconditionError(absl::StrCat(
          options.checkpoint, ": frontend.in_channels ", config.frontend.in_channels,
          " (its config_yaml) does not fit the model: the first convolution ", name, " ",
          ShapeString(t.sizes()), " takes ", t.size(1), " input channels"));
    }
    break;
  }
  // An ONNX file has no state dict to load into torchvision: its sidecar says null.
  if (meta.model_name.rfind("efficientnet_", 0) == 0 && config.model.neck_features == 0 &&
      options.format != "onnx") {
    result.torchvision = meta.model_name;
  }
  // The weights and their sidecar are a pair (the sidecar names the outputs and the window):
  // both are written in full under temporary names first and then renamed into place, so a
  // failed write never leaves new weights beside an earlier export's sidecar. Only the sidecar's
  // rename failing after the weights' (its path was checked above) could, and its error says so.
  // Named by this process (TemporarySuffix): two exports to one --out never share a staged file,
  // nor can an input named like it (`export m.pt.partial --out m.pt`) be moved into place.
  const std::string staged_weights = absl::StrCat(result.weights_path, ".partial.", common::TemporarySuffix());
  const std::string staged_sidecar = absl::StrCat(result.sidecar_path, ".partial.", common::TemporarySuffix());
  absl::Status written = WriteExportPair(options, config, meta, *model, tensors, staged_weights,
                                         staged_sidecar, &result);
  if (written.ok() && std::rename(staged_weights.c_str(), result.weights_path.c_str()) != 0) {
    written = absl::InternalError(absl::StrCat("cannot rename ", staged_weights, " to ", result.weights_path, ": ",
                                               common::ErrnoText(errno)));
  }
  if (written.ok() && std::rename(staged_sidecar.c_str(), result.sidecar_path.c_str()) != 0) {
    written = absl::InternalError(absl::StrCat("cannot rename ", staged_sidecar, " to ", result.sidecar_path,
                                               ": ", common::ErrnoText(errno), " (", result.weights_path,
                                               " is written; its sidecar is not)"));
  }
  std::remove(staged_weights.c_str());
  std::remove(staged_sidecar.c_str());
  AVIARY_RETURN_IF_ERROR(written);
  // The renames on disk (as WriteFileAtomically's): both files lie in one folder, unless the
  // sidecar's name is a link elsewhere.
  const std::string weights_dir = std::filesystem::path(result.weights_path).parent_path().string();
  const std::string sidecar_dir = std::filesystem::path(result.sidecar_path).parent_path().string();
  AVIARY_RETURN_IF_ERROR(common::SyncFolder(weights_dir));
  if (sidecar_dir != weights_dir) AVIARY_RETURN_IF_ERROR(common::SyncFolder(sidecar_dir));
  return result;
}

namespace {

absl::Status WriteExportPair(const ExportOptions& options, const common::PipelineConfig& config,
                             const CheckpointMeta& meta, ClassifierImpl& model, const NamedTensors& tensors,
                             const std::string& weights_path, const std::string& sidecar_path,
                             ExportResult* out) {
  ExportResult& result = *out;
  int64_t onnx_initializers = 0;
  if (options.format == "state_dict") {
    AVIARY_RETURN_IF_ERROR(WriteTorchSaveTensors(tensors, weights_path));
  } else if (options.format == "safetensors") {
    AVIARY_RETURN_IF_ERROR(WriteSafetensors(tensors, weights_path));
  } else {
    model.eval();
    OnnxGraphInfo info;
    AVIARY_ASSIGN_OR_RETURN(
        std::string bytes,
        OnnxModelBytes(model, config.frontend, config.data.sample_rate,
                       static_cast<int64_t>(std::llround(options.window_s * config.data.sample_rate)),
                       common::Version(), &info));
    AVIARY_RETURN_IF_ERROR(common::WriteOutputFileAtomically(weights_path, bytes));
    result.onnx_nodes = info.num_nodes;
    onnx_initializers = info.num_initializers;
  }
  // An ONNX file's tensors are its initializers (BatchNorm folded in, the front end's constants).
  result.num_tensors = options.format == "onnx" ? onnx_initializers : static_cast<int64_t>(tensors.size());
  result.num_bytes = FileSize(weights_path);
  result.model_name = meta.model_name;
  result.num_classes = meta.num_classes;
  result.in_channels = meta.in_channels;
  return common::WriteOutputFileAtomically(sidecar_path, SidecarJson(options, result, meta, config));
}

}  // namespace

std::string TimmToTorchvisionName(const std::string& name) {
  auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
  auto rest = [&](const char* p) { return name.substr(std::string(p).size()); };
  if (starts("conv_stem.")) return "features.0.0." + rest("conv_stem.");
  if (starts("bn1.")) return "features.0.1." + rest("bn1.");
  if (starts("conv_head.")) return "features.8.0." + rest("conv_head.");
  if (starts("bn2.")) return "features.8.1." + rest("bn2.");
  if (!starts("blocks.")) return "";
  // blocks.S.I.<layer>.<param>
  std::vector<std::string> parts = absl::StrSplit(name, '.');
  int stage = 0, index = 0;
  if (parts.size() < 5 || !absl::SimpleAtoi(parts[1], &stage) || !absl::SimpleAtoi(parts[2], &index) ||
      stage < 0 || stage > 6 || index < 0) {
    return "";
  }
  std::string layer = parts[3];
  size_t param_at = 4;
  if (layer == "se" && parts.size() >= 6) {
    layer = "se." + parts[4];
    param_at = 5;
  }
  // timm's depthwise-separable first stage (conv_dw, bn1, se, conv_pw, bn2) and inverted
  // residuals (conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3) against torchvision's MBConv
  // `block` Sequential (no expansion conv when the expand ratio is 1).
  static const std::map<std::string, std::string> kDs{
      {"conv_dw", "0.0"}, {"bn1", "0.1"}, {"se.conv_reduce", "1.fc1"}, {"se.conv_expand", "1.fc2"},
      {"conv_pw", "2.0"}, {"bn2", "2.1"}};
  static const std::map<std::string, std::string> kIr{
      {"conv_pw", "0.0"},        {"bn1", "0.1"},          {"conv_dw", "1.0"}, {"bn2", "1.1"},
      {"se.conv_reduce", "2.fc1"}, {"se.conv_expand", "2.fc2"}, {"conv_pwl", "3.0"}, {"bn3", "3.1"}};
  const auto& table = stage == 0 ? kDs : kIr;
  auto it = table.find(layer);
  if (it == table.end()) return "";
  std::vector<std::string> param(parts.begin() + static_cast<std::ptrdiff_t>(param_at), parts.end());
  if (param.empty()) return "";
  return absl::StrCat("features.", stage + 1, ".", index, ".block.", it->second, ".",
                      absl::StrJoin(param, "."));
}

std::string ImportReport::Summary() const {
  auto list = [](const char* what, const std::vector<std::string>& names) -> std::string {
    if (names.empty()) return absl::StrCat("0 ", what);
    std::vector<std::string> first(names.begin(), names.begin() + std::min<size_t>(names.size(), 5));
    return absl::StrCat(names.size(), " ", what, " (", absl::StrJoin(first, ", "),
                        names.size() > first.size() ? ", ..." : "", ")");
  };
  return absl::StrCat(mapped.size(), " mapped, ", list("skipped", skipped), ", ",
                      list("mismatched", mismatched), ", ", list("missing", missing));
}

absl::StatusOr<ImportReport> ImportWeights(const ImportOptions& options) {
  if (options.format != "safetensors" && options.format != "state_dict") {
    return absl::InvalidArgumentError(
        absl::StrCat("--format: expected safetensors or state_dict, got '", options.format, "'"));
  }
  if (options.model.rfind("efficientnet_", 0) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model: ImageNet backbones exist for efficientnet_b0..b3 only, got '", options.model, "'"));
  }
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(options.out, "--out", options.in, "input"));
  // A symbolic link as --out is written through (its target replaced, as by a shell's `>`).
  absl::StatusOr<std::string> out_file = common::ResolveOutputPath(options.out);
  if (!out_file.ok()) return common::Annotate(out_file.status(), "--out");
  AVIARY_RETURN_IF_ERROR(common::CheckNotTheInput(*out_file, "--out", options.in, "input"));
  AVIARY_RETURN_IF_ERROR(common::CheckOutputPath(
      *out_file == options.out ? std::string("--out") : absl::StrCat("--out ", options.out, ": its link's target"),
      *out_file));
  common::ModelConfig mc;
  mc.name = options.model;
  AVIARY_ASSIGN_OR_RETURN(std::shared_ptr<ClassifierImpl> model,
                          BuildClassifier(mc, options.in_channels, /*num_classes=*/1));
  AVIARY_ASSIGN_OR_RETURN(NamedTensors file, ReadStateDict(options.in));

  ImportReport report;
  // Wrappers: DataParallel's "module.", and checkpoints that nest the state dict.
  for (const char* prefix : {"module.", "state_dict.", "model.", "model_ema."}) {
    bool all = !file.empty();
    for (const auto& [name, t] : file) all = all && name.rfind(prefix, 0) == 0;
    if (!all) continue;
    for (auto& [name, t] : file) name = name.substr(std::string(prefix).size());
    report.stripped_prefix = prefix;
    break;
  }
  bool timm = false;
  for (const auto& [name, t] : file) {
    timm = timm || name.rfind("conv_stem.", 0) == 0 || name.rfind("blocks.", 0) == 0;
  }
  report.naming = timm ? "timm" : "torchvision";

  std::map<std::string, at::Tensor> targets;
  for (const auto& p : model->named_parameters(true)) targets[p.key()] = p.value();
  for (const auto& b : model->named_buffers(true)) targets[b.key()] = b.value();
  std::set<std::string> seen;
  NamedTensors out;
  std::vector<std::string> extra_backbone;  // backbone names the model lacks: a deeper variant
  for (const auto& [name, tensor] : file) {
    std::string target = timm ? TimmToTorchvisionName(name) : name;
    const bool backbone = !target.empty() && target.rfind("features.", 0) == 0;
    auto it = backbone ? targets.find(target) : targets.end();
    if (it == targets.end()) {
      report.skipped.push_back(name);
      if (backbone) extra_backbone.push_back(name);
      continue;
    }
    if (!seen.insert(target).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(options.in, ": two tensors map to ", target, " (the second is ", name, ")"));
    }
    if (it->second.is_floating_point() && !tensor.is_floating_point()) {
      // A quantized file's integer codes would be cast to weights (CompareBackbone's rule).
      report.mismatched.push_back(absl::StrCat(target, ": file ", c10::toString(tensor.scalar_type()),
                                               " values vs model ", c10::toString(it->second.scalar_type())));
    } else if (tensor.sizes() != it->second.sizes()) {
      report.mismatched.push_back(absl::StrCat(target, ": file ", ShapeString(tensor.sizes()), " vs model ",
                                               ShapeString(it->second.sizes())));
    } else {
      report.mapped.push_back(timm ? absl::StrCat(name, " -> ", target) : name);
    }
    out.emplace_back(target, tensor.to(it->second.scalar_type()).contiguous());
  }
  for (const auto& [name, t] : targets) {
    if (name.rfind("features.", 0) != 0 || seen.count(name)) continue;
    if (common::OptionalStateTensor(name)) {
      out.emplace_back(name, at::zeros_like(t));  // as PyTorch's load_state_dict fills it in
    } else {
      report.missing.push_back(name);
    }
  }
  // A first convolution of another channel count is expected (frontend.in_channels 1); any
  // other shape difference means another variant or architecture.
  bool other_mismatch = false;
  for (const std::string& m : report.mismatched) other_mismatch = other_mismatch || m.rfind("features.0.0.weight: file [", 0) != 0;
  if (report.mapped.empty() || !report.missing.empty() || other_mismatch || !extra_backbone.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        options.in, ": does not hold the ", options.model, " backbone (read as ", report.naming,
        " names", report.stripped_prefix.empty() ? "" : absl::StrCat(" after stripping '", report.stripped_prefix, "'"),
        "): ", report.Summary(),
        extra_backbone.empty() ? "" : absl::StrCat("; ", extra_backbone.size(), " backbone tensors the model lacks (first: ",
                                                   extra_backbone.front(), ")"),
        "; ", options.out, " not written"));
  }
  // What the trainer will do with it (worker/trainer.cc, model.pretrain: imagenet).
  LoadOptions check;
  check.only_prefix = "features.";
  check.allow_unexpected = true;
  check.skip_mismatched = true;
  AVIARY_RETURN_IF_ERROR(LoadIntoModule(out, *model, check, options.in).status());
  if (options.format == "state_dict") {
    AVIARY_RETURN_IF_ERROR(WriteTorchSaveTensors(out, *out_file));
  } else {
    AVIARY_RETURN_IF_ERROR(WriteSafetensors(out, *out_file));
  }
  report.written = static_cast<int64_t>(out.size());
  return report;
}

}  // namespace aviary::worker
