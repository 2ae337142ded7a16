// Test helper for tests/parity/check_export.py: writes a checkpoint as the trainer does, of a
// randomly initialised model whose BatchNorm affine parameters and running statistics are
// randomised too (so that eval-mode outputs depend on every tensor), seeded.
//   export_tool MODEL NUM_CLASSES IN_CHANNELS NECK_FEATURES FINAL_ACT SEED OUT.pt
#include <iostream>
#include <string>

#include <torch/nn/modules/batchnorm.h>
#include <torch/utils.h>

#include "absl/strings/str_format.h"
#include "common/config.h"
#include "worker/checkpoint.h"
#include "worker/models.h"

int main(int argc, char** argv) {
  using namespace aviary::worker;
  if (argc != 8 && argc != 9) {
    std::cerr << "usage: export_tool MODEL NUM_CLASSES IN_CHANNELS NECK_FEATURES FINAL_ACT SEED OUT.pt [NORMALIZE]\n";
    return 2;
  }
  aviary::common::PipelineConfig config;
  config.model.name = argv[1];
  const int num_classes = std::stoi(argv[2]);
  const int in_channels = std::stoi(argv[3]);
  config.model.neck_features = std::stoi(argv[4]);
  config.model.final_act = argv[5];
  config.frontend.in_channels = in_channels;
  if (argc == 9) config.frontend.normalize = argv[8];
  config.train.batch_size = 4;
  config.train.infer_bs = 2;
  for (auto& [name, stage] : config.stages) stage.train = config.train;
  torch::manual_seed(std::stoll(argv[6]));
  auto model = BuildClassifier(config.model, in_channels, num_classes);
  if (!model.ok()) {
    std::cerr << model.status().message() << "\n";
    return 1;
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& m : (*model)->modules(/*include_self=*/false)) {
      if (auto* bn = m->as<torch::nn::BatchNorm2d>()) {
        bn->running_mean.uniform_(-0.2, 0.2);
        bn->running_var.uniform_(0.5, 1.5);
        bn->weight.uniform_(0.5, 1.5);
        bn->bias.uniform_(-0.1, 0.1);
        bn->num_batches_tracked.fill_(7);
      }
      // Biases too (they start at 0: an exporter that dropped or misplaced one went unseen).
      if (auto* conv = m->as<torch::nn::Conv2d>(); conv != nullptr && conv->bias.defined()) {
        conv->bias.uniform_(-0.2, 0.2);
      }
      if (auto* linear = m->as<torch::nn::Linear>(); linear != nullptr && linear->bias.defined()) {
        linear->bias.uniform_(-0.2, 0.2);
      }
    }
  }
  CheckpointMeta meta;
  meta.stage = "finetune";
  meta.epoch = 3;
  meta.step = 40;
  meta.monitor = "auc";
  meta.best_value = 0.5;
  meta.best_epoch = 3;
  meta.model_name = config.model.name;
  meta.num_classes = num_classes;
  meta.in_channels = in_channels;
  for (int i = 0; i < num_classes; ++i) meta.class_names.push_back(absl::StrFormat("sp%02d", i));
  meta.config_yaml = aviary::common::PipelineConfigToYaml(config);
  absl::Status st = SaveCheckpoint(argv[7], **model, nullptr, meta);
  if (!st.ok()) {
    std::cerr << st.message() << "\n";
    return 1;
  }
  return 0;
}
