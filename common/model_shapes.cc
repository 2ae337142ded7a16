#include "common/model_shapes.h"

#include <set>

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

}  // namespace aviary::common
