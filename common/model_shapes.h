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

}  // namespace aviary::common

#endif  // AVIARY_COMMON_MODEL_SHAPES_H_
