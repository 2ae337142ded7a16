// aviary export RUN/best.pt [--format state_dict|safetensors|onnx] --out F [--window S]
// aviary weights import FILE --model efficientnet_bN --out F [--in-channels N] [--format ...]
//
// Models in and out of aviary (worker/export.h): a trained checkpoint as a plain PyTorch state
// dict or safetensors file with a JSON sidecar for notebooks (docs/INFERENCE.md), and a
// downloaded torchvision/timm EfficientNet checkpoint as the backbone file that
// model.pretrained_weights takes.
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/export.h"
#include "worker/models.h"
#include "worker/tools/tools.h"

namespace aviary::cli {
namespace {

int Fail(const char* command, const absl::Status& status) {
  std::cerr << "aviary " << command << ": " << status.message() << "\n";
  return ExitCodeFor(status);
}

// Makes the missing folders above `path` (`flag` names it in the error), as `aviary-worker train
// --out` makes its run folder; `*made` gets those it made, the deepest first. A path on the way
// that exists and is not a folder is refused (INVALID_ARGUMENT, exit 2), as is one that cannot be
// made.
absl::Status MakeParentFolders(const std::string& flag, const std::string& path,
                               std::vector<std::filesystem::path>* made) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> missing;  // the deepest first
  for (fs::path p = fs::path(path).parent_path(); !p.empty(); p = p.parent_path()) {
    const fs::file_status st = fs::status(p, ec);
    if (fs::is_directory(st)) break;
    if (fs::exists(st)) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " ", path, ": ", p.string(), " is not a folder"));
    }
    missing.push_back(p);
    if (p == p.parent_path()) break;  // the root
  }
  if (missing.empty()) return absl::OkStatus();
  fs::create_directories(missing.front(), ec);
  if (ec) {
    // The ones it made before it failed (the deepest first; each only when empty), none else:
    // every folder in `missing` did not exist.
    for (const fs::path& p : missing) {
      std::error_code ignored;
      fs::remove(p, ignored);
    }
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": cannot create the folder ", missing.front().string(), ": ", ec.message()));
  }
  *made = std::move(missing);
  return absl::OkStatus();
}

int RunExport(const worker::ExportOptions& options) {
  std::vector<std::filesystem::path> made;
  if (absl::Status folders = MakeParentFolders("--out", options.out, &made); !folders.ok()) {
    return Fail("export", folders);
  }
  // A refused export leaves none of the folders it made behind (a folder is removed only when
  // empty).
  auto undo = [&made](const absl::Status& status) {
    for (const std::filesystem::path& folder : made) {
      std::error_code ec;
      std::filesystem::remove(folder, ec);
    }
    return Fail("export", status);
  };
  if (absl::Status out = CheckOutputPath("--out", options.out); !out.ok()) return undo(out);
  auto result = worker::ExportCheckpoint(options);
  if (!result.ok()) return undo(result.status());
  const worker::ExportResult& r = *result;
  std::cout << "wrote " << r.weights_path << " (" << options.format << ", " << r.num_tensors
            << (options.format == "onnx" ? " initializers, " : " tensors, ") << (r.onnx_nodes > 0 ? absl::StrCat(r.onnx_nodes, " nodes, ") : "") << r.num_bytes << " bytes) and "
            << r.sidecar_path << ": " << r.model_name << ", "
            << r.num_classes << " classes" << (r.ema ? ", the EMA weights (ema_eval)" : "") << "\n";
  if (!r.torchvision.empty() && options.format != "onnx") {
    std::cout << "loads with strict=True into torchvision.models." << r.torchvision << "(num_classes="
              << r.num_classes << ")"
              << (r.in_channels != 3 ? absl::StrCat(" once its features[0][0] is a Conv2d(", r.in_channels,
                                                    ", C, 3, 2, 1, bias=False) (docs/INFERENCE.md)")
                                     : "")
              << "\n";
  }
  return 0;
}

int RunImport(const worker::ImportOptions& options, bool verbose) {
  if (absl::Status out = CheckOutputPath("--out", options.out); !out.ok()) return Fail("weights import", out);
  auto report = worker::ImportWeights(options);
  if (!report.ok()) return Fail("weights import", report.status());
  const worker::ImportReport& r = *report;
  std::cout << options.in << ": " << r.naming << " names"
            << (r.stripped_prefix.empty() ? "" : absl::StrCat(" (prefix '", r.stripped_prefix, "' stripped)"))
            << "; " << r.mapped.size() << " mapped, " << r.skipped.size() << " skipped, " << r.mismatched.size()
            << " mismatched, " << r.missing.size() << " missing\n";
  if (!r.skipped.empty()) {
    std::vector<std::string> first(r.skipped.begin(), r.skipped.begin() + std::min<size_t>(r.skipped.size(), 5));
    std::cout << "skipped (not part of the " << options.model << " backbone): " << absl::StrJoin(first, ", ")
              << (r.skipped.size() > first.size() ? ", ..." : "") << "\n";
  }
  for (const std::string& m : r.mismatched) {
    std::cout << "mismatched (written; training keeps its random init): " << m << "\n";
  }
  if (verbose) {
    for (const std::string& m : r.mapped) std::cout << "mapped " << m << "\n";
  }
  std::cout << "wrote " << options.out << " (" << options.format << ", " << r.written
            << " tensors): set model.pretrain: imagenet and model.pretrained_weights: " << options.out
            << " (model.name: " << options.model << ")\n";
  return 0;
}

}  // namespace

void AddExportCommands(CLI::App* app, common::CommandRunner* run) {
  auto ex = std::make_shared<worker::ExportOptions>();
  CLI::App* e = common::AddCommand(
      app, "export", "a checkpoint as a PyTorch state dict, safetensors or ONNX file, with a JSON sidecar",
      "The sidecar (OUT with the extension .json) holds the class names, sample rate, window, mel front end "
      "parameters and the aviary version; docs/INFERENCE.md runs the export in a notebook.");
  e->add_option("checkpoint", ex->checkpoint, "a trained checkpoint")
      ->type_name("RUN/best.pt")
      ->required()
      ->check(common::NonEmpty("a checkpoint"));
  e->add_option("--format", ex->format, "the file's format (onnx: the whole path, waveform to probabilities)")
      ->type_name("state_dict|safetensors|onnx")
      ->check(common::OneOf({"state_dict", "safetensors", "onnx"}))
      ->capture_default_str();
  e->add_option("--out", ex->out, "the weights file to write")->type_name("F")->required()->check(common::NonEmpty("a path"));
  common::AddNumber(e, "--window", &ex->window_s, "S", "seconds per prediction row, for the sidecar", 0.01, 3600.0)
      ->capture_default_str();
  e->callback([run, ex] { *run = [ex] { return RunExport(*ex); }; });

  CLI::App* weights = common::AddCommand(app, "weights", "ImageNet weights for model.pretrained_weights");
  weights->require_subcommand(1);
  auto im = std::make_shared<worker::ImportOptions>();
  auto verbose = std::make_shared<bool>(false);
  CLI::App* i = common::AddCommand(
      weights, "import", "a torchvision or timm EfficientNet checkpoint as a backbone file",
      "FILE: a state dict (.pth/.pt, torch.save) or .safetensors of torchvision's or timm's efficientnet_b0..b3; "
      "timm's names are mapped to torchvision's. The output holds the features.* tensors that "
      "model.pretrain: imagenet loads.");
  i->add_option("file", im->in, "the downloaded checkpoint")
      ->type_name("FILE")
      ->required()
      ->check(common::NonEmpty("a file"));
  i->add_option("--model", im->model, "the aviary model it is for")
      ->type_name("efficientnet_b0..b3")
      ->check(common::OneOf({"efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"}))
      ->required();
  i->add_option("--out", im->out, "the backbone file to write")->type_name("F")->required()->check(common::NonEmpty("a path"));
  // 1 or 3, as frontend.in_channels takes (a 2-channel file fit no run).
  i->add_option("--in-channels", im->in_channels, "frontend.in_channels of the runs that use it")
      ->type_name("1|3")
      ->check(common::OneOf({"1", "3"}))
      ->capture_default_str();
  i->add_option("--format", im->format, "the output's format")
      ->type_name("safetensors|state_dict")
      ->check(common::OneOf({"safetensors", "state_dict"}))
      ->capture_default_str();
  i->add_flag("--verbose", *verbose, "list every mapped tensor");
  i->callback([run, im, verbose] { *run = [im, verbose] { return RunImport(*im, *verbose); }; });
}

}  // namespace aviary::cli
