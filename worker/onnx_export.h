// The whole inference path of a checkpoint as one ONNX model, written from C++ without Python
// or the onnx library: the protobuf wire format of the onnx.proto messages it needs
// (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto) is written
// field by field (field numbers from onnx/onnx.proto, IR version 8, opset 17).
//
//   input  "waveform"      float32 [batch, window_samples]   (batch dynamic)
//   output "probabilities" float32 [batch, num_classes]
//
// The graph, in the ONNX operators' documented semantics:
//   - STFT: Pad (reflect, n_fft/2 each side; torch.stft's center=True), then the DFT as two
//     Convs of n_fft/2 + 1 kernels of length n_fft each (periodic Hann x cos, and x -sin),
//     stride hop_length; power = re^2 + im^2 (Mul, Add);
//   - mel: MatMul with the filterbank (the front end's own, [n_mels, n_freqs]);
//   - dB: 10 / ln(10) x Log(Max(x, 1e-10)), floored at ReduceMax over the clip - top_db;
//   - normalisation: (x - min) / (max - min) per clip ("per_sample") or over the batch
//     ("per_batch"), Where max == min gives 0; nothing for "none"; Concat to in_channels planes;
//   - the network: each Conv with its following BatchNorm folded into its weights and bias
//     (eval mode), SiLU as x * Sigmoid(x), squeeze-excitation as GlobalAveragePool, Conv, SiLU,
//     Conv, Sigmoid, Mul, residual Add where the block keeps shape, MaxPool for small_cnn,
//     GlobalAveragePool + Flatten + Gemm for the head (and the neck), Softmax or Sigmoid.
//
// Thread-compatible.
#ifndef AVIARY_WORKER_ONNX_EXPORT_H_
#define AVIARY_WORKER_ONNX_EXPORT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/config.h"
#include "worker/models.h"

namespace aviary::worker {

struct OnnxGraphInfo {
  int64_t num_nodes = 0;         // the final Identity included
  int64_t num_initializers = 0;
};

// Serialises `model` (eval mode is assumed: BatchNorm uses its running statistics) behind the
// mel front end of `frontend` at `sample_rate` for windows of `window_samples` samples.
// INVALID_ARGUMENT naming the module for a layer this writer does not know.
absl::StatusOr<std::string> OnnxModelBytes(ClassifierImpl& model, const common::FrontendConfig& frontend,
                                           int sample_rate, int64_t window_samples,
                                           const std::string& producer_version, OnnxGraphInfo* info);

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_ONNX_EXPORT_H_
