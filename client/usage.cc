#include "client/usage.h"

#include <array>

#include "absl/strings/str_cat.h"

namespace aviary::cli {
namespace {

constexpr char kGlobal[] =
    "usage: aviary [--coordinator H:P] [--token-file F] [--tls-ca F] [--timeout S] <command> [args]\n"
    "       aviary <command> --help | aviary --version\n";

constexpr char kClientIntro[] =
    "client commands (the coordinator: --coordinator, else $AVIARY_COORDINATOR, else\n"
    "127.0.0.1:7070; token: --token-file, else $AVIARY_TOKEN_FILE, else $AVIARY_TOKEN;\n"
    "TLS: --tls-ca or $AVIARY_TLS_CA; --timeout: seconds per call, default 30):\n";

constexpr char kOfflineIntro[] = "offline commands:\n";

constexpr char kToolIntro[] =
    "offline commands that need libtorch (run by the aviary-worker program next to aviary):\n";

constexpr std::array<CommandUsage, 14> kCommands{{
    {"submit", CommandKind::kClient,
     "  submit P.yaml [--set k=v ...] [--name N]\n"
     "                                 submit a pipeline; prints the job id last\n"},
    {"status", CommandKind::kClient,
     "  status JOB [--json]            the job and its tasks\n"},
    {"list", CommandKind::kClient,
     "  list [--limit N]               jobs, newest first\n"},
    {"watch", CommandKind::kClient,
     "  watch JOB                      live progress; exit 0 when the job succeeds, else 1\n"},
    {"cancel", CommandKind::kClient, "  cancel JOB\n"},
    {"history", CommandKind::kClient,
     "  history JOB [--plot out.png] [--csv]\n"
     "                                 epoch rows of every task; --plot: loss, val AUC, lr\n"},
    {"synth", CommandKind::kOffline,
     "  synth --out DIR --layout L --species N --recordings M --seed S [--max-seconds X]\n"
     "        [--no-broken]            write a synthetic corpus in layout L\n"
     "                                 (2024, 2023, 2022, 2021, 2020, xc)\n"},
    {"synth-soundscapes", CommandKind::kOffline,
     "  synth-soundscapes --out DIR --species N [--count M] [--seconds S] [--window W]\n"
     "        [--seed S]               long recordings of known calls at known windows plus\n"
     "                                 their BirdCLEF solution.csv\n"},
    {"dataset", CommandKind::kOffline,
     "  dataset folds --config P.yaml --stage S --out folds.csv [--set k=v ...]\n"
     "  dataset train-list --config P.yaml --stage S --fold K --out train.csv [--set k=v ...]\n"
     "  dataset summary --config P.yaml [--plot out.png] [--all-classes] [--set k=v ...]\n"
     "                                 the stratified folds, one fold's training list, the\n"
     "                                 enabled stages' sources and classes\n"},
    {"score", CommandKind::kOffline,
     "  score --solution S.csv --submission P.csv [--json]\n"
     "                                 BirdCLEF macro ROC-AUC, padded cmAP, micro PR-AUC\n"
     "                                 (val_auc) and accuracy of a submission\n"},
    {"prepare", CommandKind::kOffline,
     "  prepare --config P.yaml [--stage S] [--threads N] [--shard-mb M] [--set k=v ...]\n"
     "                                 decode the stage's audio (default: every enabled\n"
     "                                 stage) into the cache at data.cache_dir; resumable\n"},
    {"mel", CommandKind::kTool,
     "  mel --config P.yaml --audio F [--offset S] --out x.npy [--set k=v ...]\n"
     "                                 the model input of one clip as .npy\n"},
    {"predict", CommandKind::kTool,
     "  predict --checkpoint RUN/best.pt [--checkpoint ...] --audio DIR_OR_FILE --out sub.csv\n"
     "        [--window S] [--batch N] [--tta N] [--smooth w,w,w] [--threads N]\n"
     "        [--decode-threads N] [--device auto|cpu|cuda]\n"
     "        [--memory-format channels_last|contiguous]\n"
     "                                 BirdCLEF submission: one row per window of every file,\n"
     "                                 probabilities per class (an ensemble is averaged)\n"},
    {"help", CommandKind::kOffline,
     "  help [COMMAND]                 this text, or one command's\n"},
}};

}  // namespace

const CommandUsage* FindCommand(absl::string_view name) {
  for (const CommandUsage& c : kCommands) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

std::string Usage() {
  std::string out = absl::StrCat(kGlobal, "\n", kClientIntro);
  for (CommandKind kind : {CommandKind::kClient, CommandKind::kOffline, CommandKind::kTool}) {
    if (kind == CommandKind::kOffline) absl::StrAppend(&out, "\n", kOfflineIntro);
    if (kind == CommandKind::kTool) absl::StrAppend(&out, "\n", kToolIntro);
    for (const CommandUsage& c : kCommands) {
      if (c.kind == kind) absl::StrAppend(&out, c.text);
    }
  }
  return out;
}

std::string CommandHelp(const CommandUsage& command) {
  std::string out = "usage: aviary ";
  if (command.kind == CommandKind::kClient) {
    absl::StrAppend(&out, "[--coordinator H:P] [--token-file F] [--tls-ca F] [--timeout S] ", command.name,
                    " ...\n\n", kClientIntro);
  } else {
    absl::StrAppend(&out, command.name, " ...\n\n");
  }
  absl::StrAppend(&out, command.text);
  return out;
}

}  // namespace aviary::cli
