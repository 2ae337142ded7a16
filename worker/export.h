// Models in and out of aviary (`aviary export`, `aviary weights import`).
//
// Export: a trained checkpoint (best.pt / last.pt) -> the model's weights as a plain PyTorch
// state dict (a torch.save archive that `torch.load(F, weights_only=True)` reads) or a
// safetensors file, plus a JSON sidecar (SidecarPath) with what inference needs besides the
// weights: class names (the output order), sample rate and channel mode, the window, the mel
// front end's parameters, the model's name, head and final activation, the checkpoint's
// provenance and the aviary version. Tensor names are the model's, which are torchvision's
// for EfficientNet B0-B3 without a neck (worker/models.h): such a state dict loads with
// strict=True into torchvision.models.efficientnet_bN(num_classes=K) (with a 1-channel
// first convolution when frontend.in_channels is 1). ONNX: the whole inference path of one
// window, waveform -> mel front end -> model -> probabilities, with a dynamic batch
// (worker/onnx_export.h).
//
// Import: a torchvision or timm EfficientNet checkpoint (.pth/.pt state dict or .safetensors)
// -> the backbone file `model.pretrained_weights` takes: the `features.*` tensors under
// torchvision's names, safetensors by default. timm's names (conv_stem, bn1, blocks.S.I.*,
// conv_head, bn2) are mapped where the architectures agree (timm's efficientnet_bN and
// torchvision's share block order, channels and depths; the tf_* ports use "same" padding and
// load, but compute other values). The report lists mapped, skipped (not part of the backbone:
// the ImageNet classifier, unknown names) and mismatched (the model's name, another shape)
// tensors.
//
// Thread-compatible; no global state.
#ifndef AVIARY_WORKER_EXPORT_H_
#define AVIARY_WORKER_EXPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/weights.h"

namespace aviary::worker {

struct ExportOptions {
  std::string checkpoint;            // RUN/best.pt
  std::string format = "state_dict";  // "state_dict", "safetensors" or "onnx"
  std::string out;                   // the weights file; the sidecar is `out` with .json
  double window_s = 5.0;             // recorded in the sidecar: seconds per prediction row
};

struct ExportResult {
  std::string weights_path;
  std::string sidecar_path;
  int64_t num_tensors = 0;      // the state dict's; --format onnx: the graph's initializers
  int64_t onnx_nodes = 0;       // --format onnx: the graph's nodes
  int64_t num_bytes = 0;        // of the weights file
  // "efficientnet_b0" when the state dict loads into it (its first convolution replaced for
  // in_channels other than 3, as docs/INFERENCE.md says); else ""
  std::string torchvision;
  std::string model_name;
  int num_classes = 0;
  int in_channels = 3;
  bool ema = false;             // the weights are the run's EMA average (ema_eval: best.pt, or last.pt's group)
};

// `out` with its extension replaced by ".json" ("model.pt" -> "model.json").
std::string SidecarPath(const std::string& out);

// Reads and checks the checkpoint (it must load into the model its metadata names), takes the
// weights the run validated (worker/ema.h UseValidatedWeights: a last.pt's EMA average with
// train.ema_eval), writes the
// weights and the sidecar atomically. A symbolic link as `out` is written through (its target
// replaced, as by a shell's `>`; common::ResolveOutputPath); the sidecar is `out` with .json
// (beside the name given, where the notebook looks; written through too when it is a link), and
// its "weights" is `out`'s file name: weights_path and sidecar_path are the files written. INVALID_ARGUMENT for an unknown
// format or an --out whose sidecar would be itself; the checkpoint's errors naming its path;
// FAILED_PRECONDITION naming the path and both counts when its config's frontend.in_channels
// differs from the input channels of the model's first convolution (nothing written).
absl::StatusOr<ExportResult> ExportCheckpoint(const ExportOptions& options);

struct ImportOptions {
  std::string in;                        // a torchvision/timm state dict or safetensors file
  std::string model = "efficientnet_b0"; // the aviary model the backbone is for
  int in_channels = 3;                   // frontend.in_channels of the runs that will use it
  std::string out;
  std::string format = "safetensors";    // "safetensors" or "state_dict"
};

struct ImportReport {
  std::string naming;                     // "torchvision" or "timm"
  std::string stripped_prefix;            // e.g. "module." when every name had it
  std::vector<std::string> mapped;        // "file name -> features.x" (or just the name)
  std::vector<std::string> skipped;       // file names outside the backbone
  std::vector<std::string> mismatched;    // "features.x: file [a, b] vs model [c, d]"
  std::vector<std::string> missing;       // backbone tensors the file lacks
  int64_t written = 0;                    // tensors in the output
  std::string Summary() const;            // counts, and the first few names of each list
};

// Maps a timm EfficientNet parameter name to torchvision's (for the B0-B3 layout: 7 stages,
// the first of depthwise-separable blocks); "" for a name outside the backbone (classifier.*)
// or one this mapping does not know.
std::string TimmToTorchvisionName(const std::string& timm_name);

// Converts `options.in` into the backbone file at `options.out`. Writes mapped and mismatched
// tensors under torchvision's names (the trainer loads the first and skips the second, keeping
// their random initialisation, as for a first convolution of another channel count).
// FAILED_PRECONDITION, with the report's summary, when the file lacks backbone tensors of the
// model, backbone tensors the model lacks, any other than the first convolution
// (features.0.0.weight) in another shape (another variant, not an EfficientNet) or no tensor
// fits; the output is then not written. A symbolic link as `out` is written through.
absl::StatusOr<ImportReport> ImportWeights(const ImportOptions& options);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_EXPORT_H_
