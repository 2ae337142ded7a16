// Whether a weights file fits a model's backbone: the one rule the trainer applies when it
// loads `model.pretrained_weights` (model.pretrain: imagenet) and the coordinator applies at
// submit, so the two cannot disagree. Torch-free: it compares names and shapes only.
//
// The rule (only `features.*` names count; the ImageNet classifier and other keys are ignored):
//   - every backbone tensor of the model is in the file (else: missing);
//   - every `features.*` tensor of the file is in the model (else: unexpected, e.g. a deeper
//     variant's extra blocks);
//   - shapes agree, except the stem convolution for another input-channel count, which the
//     trainer leaves randomly initialised (else: mismatched, e.g. a wider variant).
//
// Thread-safe (pure functions).
#ifndef AVIARY_COMMON_BACKBONE_FIT_H_
#define AVIARY_COMMON_BACKBONE_FIT_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/tensor_index.h"

namespace aviary::common {

struct BackboneFit {
  std::vector<std::string> fitting;     // names that load
  std::vector<std::string> missing;     // in the model, not in the file
  std::vector<std::string> unexpected;  // `features.*` in the file, not in the model
  std::vector<std::string> mismatched;  // "name: file [a, b] vs model [c, d]"
  bool stem_skipped = false;            // the stem conv is for another channel count

  bool ok() const { return !fitting.empty() && missing.empty() && unexpected.empty() && mismatched.empty(); }
  // "N backbone tensors fit; M missing: a, b, c, d, ... (k more); ..." (the first 4 names of
  // each list, as worker::LoadReport::Summary).
  std::string Summary() const;
};

// Compares the file's tensors with the model's backbone (`expected`, e.g. BackboneShapes).
BackboneFit CompareBackbone(const TensorIndex& file, const TensorIndex& expected);

// OK when `fit` loads; else INVALID_ARGUMENT "key 'model.pretrained_weights': '<path>' does not
// fit model <model> (frontend.in_channels N): <summary>".
absl::Status CheckBackboneFit(const BackboneFit& fit, const std::string& path, const std::string& model,
                              int in_channels);

// Reads `path`'s tensor index (common/tensor_index.h) and applies the rule against `model`'s
// backbone (common/model_shapes.h). OK when it fits; INVALID_ARGUMENT naming the key, the path
// and the model when it does not or is no weights file; NOT_FOUND / PERMISSION_DENIED when this
// process cannot open it (the coordinator then leaves the check to the trainer).
absl::Status CheckWeightsFile(const std::string& path, const std::string& model, int in_channels);

// A tensor a weights file may leave out: BatchNorm's `num_batches_tracked` counter, which
// PyTorch's load_state_dict fills in when absent (files from before PyTorch 0.4.1, exports that
// drop buffers of no use for inference). The model then keeps its own (0 for a fresh one).
bool OptionalStateTensor(absl::string_view name);

// The first `shown` names of a list, then "... (N more)".
std::string FirstNames(const std::vector<std::string>& names, size_t shown = 4);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_BACKBONE_FIT_H_
