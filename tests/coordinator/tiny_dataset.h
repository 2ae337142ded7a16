// A tiny BirdCLEF-like dataset for coordinator tests: hand-written metadata and empty audio
// files (the catalog only checks that files exist), and a pipeline over it whose relative roots
// resolve against the directory the dataset was written to.
#ifndef AVIARY_TESTS_COORDINATOR_TINY_DATASET_H_
#define AVIARY_TESTS_COORDINATOR_TINY_DATASET_H_

#include <filesystem>
#include <fstream>
#include <string>

#include "coordinator/coordinator_config.h"

namespace aviary::coordinator {

// A small pipeline over the dataset written by WriteTinyDataset(); relative roots resolve against
// the request's working_dir.
inline constexpr char kPipeline[] =
    "seed: 42\n"
    "data:\n"
    "  target: {layout: \"2024\", root: t24}\n"
    "  pretrain_sources:\n"
    "    - {layout: \"2021\", root: p21}\n"
    "    - {layout: \"xc\", root: xc}\n"
    "  corrupt_files: corrupt.json\n"
    "folds: {pretrain_splits: 2, finetune_splits: 2, selected_folds: [0, 1], cv_filter_thr: 2}\n"
    "sampling: {upsample_thr: 3, downsample_thr: 4}\n"
    "train: {epochs: 3}\n";

// Writes the dataset under `root`.
inline void WriteTinyDataset(const std::string& root) {
  auto Write = [&](const std::string& rel, const std::string& text) {
    const std::filesystem::path p = std::filesystem::path(root) / rel;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << text;
  };
  Write("t24/train_metadata.csv",
        "primary_label,secondary_labels,author,rating,filename\n"
        "a,[],ann,4.0,a/XC1.ogg\n"
        "a,[],ann,3.5,a/XC2.ogg\n"
        "b,[],bob,5.0,b/XC3.ogg\n"
        "a,[],cy,2.0,a/XC4.ogg\n"
        "b,[],bob,1.0,b/XC5.ogg\n"
        "a,[],cy,2.0,a/XC6.ogg\n");
  for (const char* f : {"a/XC1.ogg", "a/XC2.ogg", "b/XC3.ogg", "a/XC4.ogg", "b/XC5.ogg", "a/XC6.ogg"}) {
    Write(std::string("t24/train_audio/") + f, "");
  }
  Write("p21/train_metadata.csv",
        "primary_label,secondary_labels,author,filename\n"
        "c,[],x,XC10.ogg\n"
        "c,[],x,XC11.ogg\n"
        "c,[],x,XC12.ogg\n"
        "d,[],y,XC20.ogg\n"
        "d,[],y,XC21.ogg\n");
  for (const char* f : {"c/XC10.ogg", "c/XC11.ogg", "c/XC12.ogg", "d/XC20.ogg", "d/XC21.ogg"}) {
    Write(std::string("p21/train_short_audio/") + f, "");
  }
  Write("xc/train_extended.csv",
        "ebird_code,filename,author,primary_label,secondary_labels\n"
        "c,XC13.mp3,x,Sci c_Common c,[]\n"
        "c,XC14.mp3,x,Sci c_Common c,[]\n"
        "nuthat,XC30.mp3,n,Sci n_Common n,[]\n"
        "nuthat,XC31.mp3,n,Sci n_Common n,[]\n");
  for (const char* f : {"A-M/c/XC13.mp3", "A-M/c/XC14.mp3", "N-Z/nuthat/XC30.mp3", "N-Z/nuthat/XC31.mp3"}) {
    Write(std::string("xc/") + f, "");
  }
  Write("corrupt.json", "[]");
}

// A coordinator's configuration for tests: loopback ports (0: the system picks), its database,
// runs/ and the token files "token" and "worker.token" under `root` (the caller writes those),
// data under `root`, heartbeats every 0.2 s and a 20 s timeout.
inline CoordinatorConfig LoopbackTestConfig(const std::string& root) {
  CoordinatorConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "127.0.0.1:0";
  config.database = root + "/aviary.db";
  config.work_dir = root + "/runs";
  config.data_roots = {root};
  config.token_file = root + "/token";
  config.worker_token_file = root + "/worker.token";
  config.heartbeat_interval_s = 0.2;
  config.heartbeat_timeout_s = 20;
  return config;
}

}  // namespace aviary::coordinator

#endif  // AVIARY_TESTS_COORDINATOR_TINY_DATASET_H_
