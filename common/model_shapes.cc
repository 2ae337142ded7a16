#include "common/model_shapes.h"

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace aviary::common {

absl::StatusOr<TensorIndex> BackboneShapes(const std::string& model, int in_channels) {
  TensorIndex out;
  std::set<std::string> models;
  for (int i = 0; i < kModelShapeRowCount; ++i) {
    const ModelShapeRow& row = kModelShapeRows[i];
    models.insert(row.model);
    if (model != row.model) continue;
    TensorEntry entry{row.name, row.dtype, std::vector<int64_t>(row.dims, row.dims + row.rank)};
    if (entry.name == kStemWeight && entry.shape.size() == 4) entry.shape[1] = in_channels;
    out.push_back(std::move(entry));
  }
  if (out.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("key 'model.name': no backbone shapes for '", model,
                                                   "' (the table has ", absl::StrJoin(models, ", "), ")"));
  }
  return out;
}

absl::StatusOr<int64_t> SmallestNormPlane(const std::string& model, int64_t height, int64_t width) {
  if (absl::StartsWith(model, "efficientnet_")) {
    constexpr int64_t kReduction = 32;
    return ((height + kReduction - 1) / kReduction) * ((width + kReduction - 1) / kReduction);
  }
  if (model == "small_cnn") return (height / 8) * (width / 8);
  return absl::InvalidArgumentError(absl::StrCat("key 'model.name': no BatchNorm plane known for '", model, "'"));
}

}  // namespace aviary::common
