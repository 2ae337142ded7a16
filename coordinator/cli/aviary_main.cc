// `aviary`: the user's command-line tool: the gRPC client of the coordinator and the offline
// dataset tools.
#include <iostream>
#include <string>
#include <vector>

#include "coordinator/cli/commands.h"

namespace {

constexpr char kUsage[] =
    "usage: aviary [--coordinator H:P] [--token-file F] [--tls-ca F] [--timeout S] <command> [args]\n"
    "\n"
    "client commands (the coordinator: --coordinator, else $AVIARY_COORDINATOR, else\n"
    "127.0.0.1:7070; token: --token-file, else $AVIARY_TOKEN_FILE, else $AVIARY_TOKEN;\n"
    "TLS: --tls-ca or $AVIARY_TLS_CA; --timeout: seconds per call, default 30):\n"
    "  submit P.yaml [--set k=v ...] [--name N]\n"
    "                                 submit a pipeline; prints the job id last\n"
    "  status JOB [--json]            the job and its tasks\n"
    "  list [--limit N]               jobs, newest first\n"
    "  watch JOB                      live progress; exit 0 when the job succeeds, else 1\n"
    "  cancel JOB\n"
    "  history JOB [--plot out.png] [--csv]\n"
    "                                 epoch rows of every task; --plot: loss, val AUC, lr\n"
    "\n"
    "offline commands:\n"
    "  synth --out DIR --layout L --species N --recordings M --seed S [--max-seconds X]\n"
    "        [--no-broken]            write a synthetic corpus in layout L\n"
    "                                 (2024, 2023, 2022, 2021, 2020, xc)\n"
    "  dataset folds --config P.yaml --stage S --out folds.csv [--set k=v ...]\n"
    "  dataset train-list --config P.yaml --stage S --fold K --out train.csv [--set k=v ...]\n"
    "  dataset summary --config P.yaml [--plot out.png] [--all-classes] [--set k=v ...]\n"
    "  score --solution S.csv --submission P.csv [--json]\n"
    "                                 BirdCLEF macro ROC-AUC, padded cmAP, micro PR-AUC\n"
    "                                 (val_auc) and accuracy of a submission\n"

    "  prepare --config P.yaml [--stage S] [--threads N] [--shard-mb M] [--set k=v ...]\n"
    "                                 decode the stage's audio (default: every enabled\n"
    "                                 stage) into the cache at data.cache_dir; resumable\n"
    "  mel --config P.yaml --audio F [--offset S] --out x.npy [--set k=v ...]\n"
    "                                 the model input of one clip as .npy\n"
    "  predict --checkpoint RUN/best.pt [--checkpoint ...] --audio DIR_OR_FILE --out sub.csv\n"
    "        [--window S] [--batch N] [--tta N] [--smooth w,w,w] [--threads N]\n"
    "        [--decode-threads N] [--device auto|cpu|cuda]\n"
    "        [--memory-format channels_last|contiguous]\n"
    "                                 BirdCLEF submission: one row per window of every file,\n"
    "                                 probabilities per class (an ensemble is averaged)\n"
    "  synth-soundscapes --out DIR --species N [--count M] [--seconds S] [--seed S]\n"
    "                                 long recordings of known calls at known windows plus\n"
    "                                 their BirdCLEF solution.csv\n";

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  // Global flags of the client come before the command.
  std::vector<std::string> global;
  size_t i = 0;
  for (; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.compare(0, 2, "--") != 0) break;
    const std::string name = a.substr(2, a.find('=') == std::string::npos ? std::string::npos
                                                                            : a.find('=') - 2);
    if (name != "coordinator" && name != "token-file" && name != "tls-ca" && name != "timeout") {
      std::cerr << "aviary: unknown global flag " << a
                << " (before the command: --coordinator, --token-file, --tls-ca, --timeout)\n";
      return 2;
    }
    global.push_back(a);
    // "--flag value" unless written "--flag=value".
    if (a.find('=') == std::string::npos && i + 1 < args.size()) global.push_back(args[++i]);
  }
  if (i >= args.size()) {
    std::cerr << "aviary: missing command after the global flags\n\n" << kUsage;
    return 2;
  }
  const std::string command = args[i];
  std::vector<std::string> rest(args.begin() + i + 1, args.end());
  if (aviary::cli::IsClientCommand(command)) return aviary::cli::RunClient(command, global, rest);
  if (!global.empty()) {
    std::cerr << "aviary " << command << ": INVALID_ARGUMENT: " << global[0]
              << " is a flag of the client commands, not of '" << command << "'\n";
    return 2;
  }
  if (command == "synth") return aviary::cli::RunSynth(rest);
  if (command == "dataset") return aviary::cli::RunDataset(rest);
  if (command == "score") return aviary::cli::RunScore(rest);
  if (command == "prepare") return aviary::cli::RunPrepare(rest);
  if (command == "mel") return aviary::cli::RunMel(rest);
  if (command == "predict") return aviary::cli::RunPredict(rest);
  if (command == "synth-soundscapes") return aviary::cli::RunSynthSoundscapes(rest);
  std::cerr << "aviary: unknown command '" << command << "'\n\n" << kUsage;
  return 2;
}
