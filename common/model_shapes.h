// The shapes of every model's backbone (`features.*` parameters and buffers), without libtorch:
// what BuildClassifier (worker/models.h) makes, as a table generated from it. The coordinator
// checks `model.pretrained_weights` against it at submit (common/backbone_fit.h).
//
// common/model_shapes_table.cc is generated: tests/worker/model_shapes_test.cc builds every model and
// fails when the table differs, printing the command that regenerates it.
//
// Thread-safe (constant data).
#ifndef AVIARY_COMMON_MODEL_SHAPES_H_
#define AVIARY_COMMON_MODEL_SHAPES_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/tensor_index.h"

namespace aviary::common {

// The stem convolution, the one backbone tensor whose shape depends on the input channels
// (dimension 1 is frontend.in_channels).
inline constexpr char kStemWeight[] = "features.0.0.weight";

// One row of the generated table: a tensor of `model` built for 3 input channels.
struct ModelShapeRow {
  const char* model;
  const char* name;
  const char* dtype;
  int rank;
  int64_t dims[4];
};
// The generated rows, model by model in the model's own order; kModelShapeRowCount of them.
extern const ModelShapeRow kModelShapeRows[];
extern const int kModelShapeRowCount;

// The backbone tensors of `model` (a model.name) built for `in_channels` input planes, in the
// model's order. INVALID_ARGUMENT naming model.name for a model the table lacks.
absl::StatusOr<TensorIndex> BackboneShapes(const std::string& model, int in_channels);

// Values per channel of the smallest BatchNorm input of `model`'s backbone for one mel image of
// `height` x `width` (n_mels x frames): its height times its width. torch's BatchNorm refuses a
// training batch with one value per channel, so a per-rank training batch of b images trains only
// when b x this >= 2. EfficientNet halves the image five times (stride-2 convolutions with k / 2
// padding, ceil(n / 2) each) and normalizes after the last: ceil(h / 32) x ceil(w / 32);
// small_cnn normalizes before its fourth 2x2 max-pool: floor(h / 8) x floor(w / 8).
// INVALID_ARGUMENT naming model.name for another model.
absl::StatusOr<int64_t> SmallestNormPlane(const std::string& model, int64_t height, int64_t width);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_MODEL_SHAPES_H_
