// `aviary`: the user's command-line tool: the gRPC client of the coordinator and the offline
// dataset tools. It links neither libtorch nor MPI: `mel` and `predict` run the sibling
// aviary-worker program (RunTool).
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "client/commands.h"
#include "client/usage.h"
#include "common/flags.h"
#include "common/version.h"

namespace {

using aviary::cli::CommandKind;

// Runs `aviary-worker COMMAND ARGS...` in place of this process (git-style): the commands that
// need libtorch live in the worker program, found in the folder this program was started from,
// so that every other command starts without loading torch or MPI. The exit code and the error
// lines ("aviary COMMAND: ...") are the worker's.
int RunTool(const std::string& command, const std::vector<std::string>& args) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) {
    std::cerr << "aviary " << command << ": cannot find this program's folder (/proc/self/exe: "
              << ec.message() << ")\n";
    return 1;
  }
  const std::string worker = (self.parent_path() / "aviary-worker").string();
  if (::access(worker.c_str(), X_OK) != 0) {
    std::cerr << "aviary " << command << ": needs the aviary-worker program (libtorch) next to aviary: "
              << worker << ": " << std::strerror(errno) << "\n";
    return 1;
  }
  std::vector<char*> argv;
  std::string arg0 = "aviary-worker";
  std::string cmd = command;
  argv.push_back(arg0.data());
  argv.push_back(cmd.data());
  std::vector<std::string> copy = args;
  for (std::string& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(worker.c_str(), argv.data());
  std::cerr << "aviary " << command << ": cannot run " << worker << ": " << std::strerror(errno) << "\n";
  return 1;
}

int PrintVersion() {
  std::cout << "aviary " << aviary::common::Version() << " (git " << aviary::common::GitCommit() << ")\n"
            << "gRPC " << grpc::Version() << "; no libtorch in this program: mel and predict run\n"
            << "aviary-worker (its libtorch, CUDA and NCCL: aviary-worker --version)\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using aviary::cli::FindCommand;
  using aviary::cli::Usage;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    std::cout << Usage();
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") return PrintVersion();
  if (args[0] == "help") {
    if (args.size() < 2 || aviary::common::HelpRequested(args)) {
      std::cout << Usage();
      return 0;
    }
    const aviary::cli::CommandUsage* c = FindCommand(args[1]);
    if (c == nullptr) {
      std::cerr << "aviary help: unknown command '" << args[1] << "'\n\n" << Usage();
      return 2;
    }
    std::cout << aviary::cli::CommandHelp(*c);
    return 0;
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
    std::cerr << "aviary: missing command after the global flags\n\n" << Usage();
    return 2;
  }
  const std::string command = args[i];
  std::vector<std::string> rest(args.begin() + i + 1, args.end());
  const aviary::cli::CommandUsage* usage = FindCommand(command);
  if (usage == nullptr || command == "help") {
    std::cerr << "aviary: unknown command '" << command << "'\n\n" << Usage();
    return 2;
  }
  if (aviary::common::HelpRequested(rest)) {
    std::cout << aviary::cli::CommandHelp(*usage);
    return 0;
  }
  if (usage->kind == CommandKind::kClient) return aviary::cli::RunClient(command, global, rest);
  if (!global.empty()) {
    std::cerr << "aviary " << command << ": INVALID_ARGUMENT: " << global[0]
              << " is a flag of the client commands, not of '" << command << "'\n";
    return 2;
  }
  if (usage->kind == CommandKind::kTool) return RunTool(command, rest);
  if (command == "synth") return aviary::cli::RunSynth(rest);
  if (command == "dataset") return aviary::cli::RunDataset(rest);
  if (command == "score") return aviary::cli::RunScore(rest);
  if (command == "prepare") return aviary::cli::RunPrepare(rest);
  if (command == "synth-soundscapes") return aviary::cli::RunSynthSoundscapes(rest);
  std::cerr << "aviary: command '" << command << "' has no handler\n";
  return 1;
}
