// Typed pipeline configuration (configs/pipeline.yaml) and its validation.
//
// A config is loaded from YAML, patched with `--set dotted.key=value` overrides, converted to
// the structs below and validated, all before any work starts. Every error names the file, the
// line, the dotted key, the bad value and what was expected; unknown keys are errors and carry a
// did-you-mean suggestion when a known key is close. Keys set through `--set` are reported as
// coming from "--set dotted.key=value" instead of a file line.
//
// The structs are plain values: copyable, no hidden state, not synchronised.
#ifndef AVIARY_COMMON_CONFIG_H_
#define AVIARY_COMMON_CONFIG_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::common {

// One dataset source: a layout ("2024", "2023", "2022", "2021", "2020", "xc") and its root.
struct SourceConfig {
  std::string layout;
  std::string root;
};

struct DataConfig {
  int sample_rate = 32000;         // Hz, > 0
  double duration = 10.0;          // seconds per training clip, > 0
  SourceConfig target{"2024", "data/birdclef-2024"};
  std::vector<SourceConfig> pretrain_sources{{"2021", "data/birdclef-2021"},
                                             {"2022", "data/birdclef-2022"},
                                             {"2023", "data/birdclef-2023"},
                                             {"xc", "data/xeno-canto-extended"}};
  std::string corrupt_files;       // optional JSON array of paths to drop ("" = none)
  std::string channels = "first";  // "first" (the notebook) or "mean"
  std::string cache_dir;           // decoded-audio cache ("" = decode on the fly)
  // > 0: only the first this many seconds of each recording are used, cached or decoded on the
  // fly (0 = whole recordings); 0 or >= duration.
  double cache_max_seconds = 0.0;
};

struct FoldsConfig {
  int pretrain_splits = 25;        // >= 2
  int finetune_splits = 5;         // >= 2
  std::vector<int> selected_folds{0};  // each in [0, finetune_splits)
  bool cv_filter = true;
  int cv_filter_thr = 5;           // >= 1
};

struct SamplingConfig {
  int upsample_thr = 50;    // >= 0 (0 disables)
  int downsample_thr = 500; // >= 0 (0 disables); must be >= upsample_thr when both are set
};

struct FrontendConfig {
  int n_fft = 2028;
  int hop_length = 835;
  int n_mels = 128;
  double fmin = 20.0;
  double fmax = 16000.0;           // <= sample_rate / 2
  double top_db = 80.0;
  std::string normalize = "per_sample";  // "per_sample", "per_batch" or "none"
  int in_channels = 3;             // 1 or 3
};

// The notebook's waveform and spectrogram augmentation. Probabilities in [0, 1].
struct AugmentConfig {
  double audio_augment_prob = 0.5;
  double noise_prob = 0.35;
  double noise_std_min = 0.0025;
  double noise_std_max = 0.025;
  double timeshift_prob = 0.0;
  double timeshift_max = 0.5;      // fraction of the clip
  double mixup_prob = 0.65;
  double mixup_alpha = 0.5;
  double cutmix_prob = 0.65;
  double cutmix_alpha = 2.5;
  double time_mask_prob = 0.5;
  int num_time_masks = 2;
  int time_mask_param = 25;        // frames
  double freq_mask_prob = 0.5;
  int num_freq_masks = 1;
  int freq_mask_param = 10;        // mel bins
};

struct ModelConfig {
  std::string name = "efficientnet_b1";  // efficientnet_b0..b3, small_cnn
  std::string pretrain = "none";         // "none" or "imagenet"
  std::string pretrained_weights;        // required when pretrain == "imagenet"
  int neck_features = 0;                 // >= 0
  std::string final_act = "softmax";     // "softmax" or "sigmoid"
  double dropout = 0.2;                  // [0, 1)
};

// Training settings. `stages.<name>` may override any of these per stage.
struct TrainConfig {
  int batch_size = 32;             // per replica, >= 1
  int epochs = 25;                 // >= 1
  std::string optimizer = "Adam";  // "Adam" or "AdamW"
  double lr = 1.0e-3;              // > 0
  double weight_decay = 0.0;       // >= 0
  std::string scheduler = "cos";   // "cos", "exp", "step" or "none"
  double lr_start = 5.0e-6;
  double lr_max_per_sample = 1.4e-6;  // lr_max = this x global batch (the notebook)
  double lr_min = 1.0e-6;
  int lr_ramp_epochs = 5;
  double lr_decay = 0.8;           // "exp"/"step" decay factor
  int lr_step_epochs = 2;          // "step": epochs between decays
  bool lr_per_step = false;        // evaluate the schedule at fractional epochs, every step
  std::string loss = "CCE";        // "CCE" or "BCE"
  double label_smoothing = 0.05;   // [0, 1)
  bool drop_remainder = true;
  std::string monitor = "auc";     // "auc", "roc_auc", "cmap", "acc", "loss"
  std::string precision = "auto";  // "auto", "fp32", "bf16"
  int infer_bs = 2;                // >= 1
  int tta = 1;                     // >= 1
  bool skip_nonfinite = false;
  int num_workers = 2;             // loader threads, >= 1
  // CUDA: deterministic cuDNN/cuBLAS algorithms (bit-identical reruns and resumes, slower);
  // false: cuDNN picks the fastest algorithms for the shapes (benchmark mode). CPU: no effect
  // (the CPU kernels are deterministic).
  bool deterministic = false;
  // Exponential moving average of the weights (worker/ema.h): 0 = off, else the decay in
  // (0, 1); its warm-up ramps the decay from 0 over the first this many optimizer steps; with
  // ema_eval validation, the monitor and best.pt use the averaged weights.
  double ema_decay = 0.0;          // [0, 1)
  int ema_warmup_steps = 0;        // >= 0
  bool ema_eval = false;           // needs ema_decay > 0
  double grad_clip_norm = 0.0;     // > 0: clip the all-reduced gradient to this L2 norm; 0 = off
  int grad_accum_steps = 1;        // micro-batches per optimizer step, >= 1
  // CUDA, one rank: forward, loss and backward captured once as a CUDA graph and replayed every
  // step (worker/cuda_graph_step.h); the same numbers as the eager step, fewer kernel launches.
  // Needs grad_accum_steps 1; refused on a CPU device and in groups of more than one rank.
  bool cuda_graph = false;
  // Early stopping: stop when the monitor has not improved by more than early_stop_min_delta
  // for early_stop_patience epochs (0 = off).
  int early_stop_patience = 0;     // >= 0
  double early_stop_min_delta = 0.0;  // >= 0
};

struct StageConfig {
  bool enabled = true;
  TrainConfig train;               // train.* with this stage's overrides applied
};

struct CommConfig {
  std::string backend = "auto";    // "auto", "nccl" or "mpi"
  double bucket_mb = 25.0;         // > 0
  double timeout_s = 300.0;        // > 0
};

struct PipelineConfig {
  uint32_t seed = 42;
  bool debug = false;
  DataConfig data;
  FoldsConfig folds;
  SamplingConfig sampling;
  FrontendConfig frontend;
  AugmentConfig augment;
  ModelConfig model;
  TrainConfig train;
  // Keyed by stage name: "pretrain" and "finetune" (both always present after loading; a
  // default-constructed config has both, with the default train settings).
  std::map<std::string, StageConfig> stages{{"pretrain", StageConfig{}},
                                            {"finetune", StageConfig{}}};
  CommConfig comm;

  std::string source_path;         // the file it was loaded from ("<string>" for text)
};

// Stage names, in pipeline order.
inline const std::vector<std::string>& StageNames() {
  static const std::vector<std::string> kNames{"pretrain", "finetune"};
  return kNames;
}

// The most a config file may hold, pipeline or coordinator (and a SubmitJob's pipeline_yaml):
// a recipe is a few KB; a path given by mistake (a dataset, /dev/zero) is refused, not read.
inline constexpr size_t kMaxConfigBytes = size_t{4} << 20;

// Loads `path`, applies `overrides` ("dotted.key=value"; list items by index, e.g.
// "data.pretrain_sources.0.root=/x"), converts and validates. Overrides patch the YAML tree
// before conversion, in order; the value is parsed as YAML ("[0,1]", "true", "{layout: xc,
// root: /x}"). A path into a section or list the file leaves out starts from the default value
// (so the example works on a file without `pretrain_sources`); an index past the end of a list
// is an error. `stages.<name>` takes `enabled` and any train.* key directly
// (stages.pretrain.epochs). Relative data roots stay relative (to the working directory).
// Errors: NOT_FOUND for a missing file, INVALID_ARGUMENT otherwise (a file over kMaxConfigBytes
// among them).
absl::StatusOr<PipelineConfig> LoadPipelineConfig(const std::string& path,
                                                  const std::vector<std::string>& overrides = {});

// The same from YAML text; `source_name` stands in for the path in messages.
absl::StatusOr<PipelineConfig> ParsePipelineConfig(const std::string& yaml_text,
                                                   const std::string& source_name,
                                                   const std::vector<std::string>& overrides = {});

// Cross-field checks (ranges, enums, dependencies). Called by Load/Parse; exposed for code that
// builds a config by hand.
absl::Status ValidatePipelineConfig(const PipelineConfig& config);

// Whether each stage's train.loss trains model.final_act, which validation, predict and the ONNX
// export apply: BCE independent sigmoids, CCE a softmax. INVALID_ARGUMENT naming the key and
// `source_name`. Checked where a run starts (`aviary-worker train`, SubmitJob), not by Parse:
// checkpoints written before the check carry such configs and must still load.
// `stage`, when given, is the one stage to check (`aviary-worker train --stage S` trains S also
// when it is disabled); else the enabled stages.
absl::Status CheckLossMatchesActivation(const PipelineConfig& config, const std::string& source_name,
                                        const std::string& stage = "");

// The STFT frames the front end (center=True, reflect pad of n_fft / 2) makes of `samples`:
// 1 + (samples - n_fft % 2) / hop_length (one fewer for an odd n_fft when hop_length divides
// samples), as worker/frontend.h's NumFrames.
int64_t MelFrames(int64_t samples, const FrontendConfig& frontend);
// The fewest STFT frames (MelFrames) a model takes: small_cnn's four 2x2 max-pools need 16
// (torch refuses an empty pool output); 1 for the EfficientNets (their adaptive pooling takes
// any size).
int MinModelFrames(const std::string& model_name);
// INVALID_ARGUMENT naming `what` ("--window: 0.2 s") when a window of `samples` makes fewer
// frames than config.model takes: an export or predict window shorter than the training clip.
absl::Status CheckWindowFitsModel(const PipelineConfig& config, int64_t samples, const std::string& what);
// INVALID_ARGUMENT naming `what` ("--window") when `window_s` at `sample_rate` is not a whole
// number of samples: the windows would be the rounded length while the row ids count whole
// window_s steps, drifting apart (0.25 s at 22050 Hz: 5513 samples, 0.33 s off after an hour).
// It names the nearest windows that are.
absl::Status CheckWindowIsWholeSamples(double window_s, int sample_rate, const std::string& what);

// What a run checks before it starts (`aviary-worker train`, SubmitJob), beyond Parse's checks,
// INVALID_ARGUMENT naming the key and `source_name`: CheckLossMatchesActivation, and no
// model.pretrained_weights while model.pretrain is 'none' (the file would not be loaded: the
// run would start from random weights while its config names a backbone).
absl::Status CheckBeforeRun(const PipelineConfig& config, const std::string& source_name,
                            const std::string& stage = "");

// `train` with the keys its run does not read set back to their defaults: train.lr is read only
// by scheduler 'none'; lr_start, lr_max_per_sample, lr_ramp_epochs and lr_per_step only by the
// others, lr_min by 'cos' and 'exp', lr_decay by 'exp' and 'step', lr_step_epochs by 'step';
// early_stop_min_delta only with early_stop_patience > 0; ema_warmup_steps only with ema_decay
// > 0. Two stages equal after it train alike (a sweep over train.lr under 'cos' is one run).
TrainConfig WithoutUnreadKeys(const TrainConfig& train);

// The resolved config as YAML (every key, overrides applied); Parse(ToYaml(c)) == c. Each stage
// is written as `enabled` plus the train.* keys where it differs from `train`; doubles are
// written with the fewest digits that read back exactly.
std::string PipelineConfigToYaml(const PipelineConfig& config);

// One key whose value differs between two configs: the dotted key ("train.lr",
// "stages.finetune.epochs") and both values as YAML flow text ("(absent)" on the side without it).
struct ConfigDifference {
  std::string key;
  std::string before;
  std::string after;
};
// The differences between two configs, compared as PipelineConfigToYaml writes them (a stage
// lists only its overrides of train.*), in key order.
std::vector<ConfigDifference> DiffPipelineConfigs(const PipelineConfig& before, const PipelineConfig& after);

// The stage's settings; INVALID_ARGUMENT naming the stage when it is not a known stage.
absl::StatusOr<const StageConfig*> GetStage(const PipelineConfig& config, const std::string& stage);

// Field-by-field equality of settings. PipelineConfig's `source_path` records where a config
// came from and is not compared, so that Parse(ToYaml(c)) == c holds.
bool operator==(const SourceConfig& a, const SourceConfig& b);
bool operator==(const DataConfig& a, const DataConfig& b);
bool operator==(const FoldsConfig& a, const FoldsConfig& b);
bool operator==(const SamplingConfig& a, const SamplingConfig& b);
bool operator==(const FrontendConfig& a, const FrontendConfig& b);
bool operator==(const AugmentConfig& a, const AugmentConfig& b);
bool operator==(const ModelConfig& a, const ModelConfig& b);
bool operator==(const TrainConfig& a, const TrainConfig& b);
bool operator==(const StageConfig& a, const StageConfig& b);
bool operator==(const CommConfig& a, const CommConfig& b);
bool operator==(const PipelineConfig& a, const PipelineConfig& b);
inline bool operator!=(const SourceConfig& a, const SourceConfig& b) { return !(a == b); }
inline bool operator!=(const DataConfig& a, const DataConfig& b) { return !(a == b); }
inline bool operator!=(const FoldsConfig& a, const FoldsConfig& b) { return !(a == b); }
inline bool operator!=(const SamplingConfig& a, const SamplingConfig& b) { return !(a == b); }
inline bool operator!=(const FrontendConfig& a, const FrontendConfig& b) { return !(a == b); }
inline bool operator!=(const AugmentConfig& a, const AugmentConfig& b) { return !(a == b); }
inline bool operator!=(const ModelConfig& a, const ModelConfig& b) { return !(a == b); }
inline bool operator!=(const TrainConfig& a, const TrainConfig& b) { return !(a == b); }
inline bool operator!=(const StageConfig& a, const StageConfig& b) { return !(a == b); }
inline bool operator!=(const CommConfig& a, const CommConfig& b) { return !(a == b); }
inline bool operator!=(const PipelineConfig& a, const PipelineConfig& b) { return !(a == b); }

// Levenshtein-based suggestion: the candidate closest to `key` within a small edit distance
// (at most max(2, key.size() / 3); the first of equally close ones), or "" when none is close.
std::string DidYouMean(const std::string& key, const std::vector<std::string>& candidates);

// The Levenshtein distance of `a` and `b` (insertions, deletions and substitutions of bytes).
size_t EditDistance(const std::string& a, const std::string& b);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_CONFIG_H_
