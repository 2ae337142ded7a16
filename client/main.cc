// `aviary`: the user's command-line tool: the gRPC client of the coordinator and the offline
// dataset tools. It links neither libtorch nor MPI: `mel` and `predict` run the sibling
// aviary-worker program (RunTool).
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include <grpc/support/log.h>
#include <grpcpp/grpcpp.h>

#include "client/commands.h"
#include "client/output.h"
#include "common/cli.h"
#include "common/version.h"

namespace {

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
  std::string arg0 = "aviary";  // aviary-worker then names its help "aviary mel", as typed
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
            << "gRPC " << grpc::Version() << "; no libtorch in this program: mel, predict, export and weights run\n"
            << "aviary-worker (its libtorch, CUDA and NCCL: aviary-worker --version)\n";
  return 0;
}

constexpr char kFooter[] =
    "Client commands talk to a coordinator: --coordinator, else $AVIARY_COORDINATOR, else\n"
    "127.0.0.1:7070; token: --token-file, else $AVIARY_TOKEN_FILE, else $AVIARY_TOKEN; TLS:\n"
    "--tls-ca or $AVIARY_TLS_CA. The global flags come before the command.\n"
    "aviary COMMAND --help: the command's flags.\n";

// mel, predict, export and weights pass their arguments, --help included, to aviary-worker, which defines and
// parses their flags (worker/tools/tools.h).
void AddToolCommands(CLI::App* app, aviary::cli::Runner* run) {
  for (const auto& [name, description] :
       {std::pair<const char*, const char*>{"mel", "the model input of one clip as .npy"},
        {"predict", "BirdCLEF submission: one row per window of every file, probabilities per class"},
        {"export", "a checkpoint as a PyTorch state dict, safetensors or ONNX file, with a JSON sidecar"},
        {"weights", "ImageNet weights for model.pretrained_weights (weights import)"}}) {
    CLI::App* tool = app->add_subcommand(name, description)->group(aviary::cli::kToolGroup)->prefix_command();
    tool->set_help_flag();
    tool->callback([run, tool] {
      *run = [tool] { return RunTool(tool->get_name(), tool->remaining()); };
    });
  }
}

// `aviary completion bash` and `aviary help [COMMAND]`: about the program itself.
void AddHelpCommands(CLI::App* app, aviary::cli::Runner* run) {
  CLI::App* completion = aviary::common::AddCommand(
      app, "completion", "a shell completion script",
      "bash: source <(aviary completion bash), or install it as "
      "/usr/share/bash-completion/completions/aviary (the .deb does).");
  completion->group(aviary::cli::kOfflineGroup);
  auto shell = std::make_shared<std::string>();
  completion->add_option("shell", *shell, "the shell")->type_name("bash")->required()->check(
      aviary::common::OneOf({"bash"}));
  completion->callback([run, app] {
    *run = [app] {
      std::cout << aviary::common::BashCompletion(*app);
      return 0;
    };
  });
  // `aviary help dataset folds`: a command and its subcommands, as typed.
  auto topic = std::make_shared<std::vector<std::string>>();
  CLI::App* help = app->add_subcommand("help", "this text, or one command's")->group(aviary::cli::kOfflineGroup);
  help->add_option("command", *topic, "a command (and subcommand)")->type_name("COMMAND");
  help->callback([run, app, topic] {
    *run = [app, topic] {
      const CLI::App* shown = app;
      std::string path = "aviary";
      for (size_t w = 0; w < topic->size(); ++w) {
        const std::string& word = (*topic)[w];
        const CLI::App* next = nullptr;
        for (const CLI::App* sub : shown->get_subcommands({})) {
          if (sub->get_name() == word) next = sub;
        }
        if (next == nullptr) {
          std::cerr << "aviary help: unknown command '" << word << "'" << (shown == app ? "" : " of '" + path + "'")
                    << " (" << path << " --help lists them)\n";
          return 2;
        }
        if (next->get_group() == aviary::cli::kToolGroup) {
          // The worker's command with the rest of the words (`help weights import`).
          std::vector<std::string> rest(topic->begin() + static_cast<std::ptrdiff_t>(w) + 1, topic->end());
          rest.push_back("--help");
          return RunTool(word, rest);
        }
        shown = next;
        path += " " + word;
      }
      // App::help() shows the selected subcommand's help, and `help` itself is selected here.
      std::cout << (shown == app ? app->get_formatter()->make_help(app, app->get_name(), CLI::AppFormatMode::Normal)
                                 : shown->help());
      return 0;
    };
  });
}

// The program after the signal setup; *command becomes the command's path ("aviary dataset folds")
// once the command line names one.
int Run(const std::vector<std::string>& args, std::string* command_path) {
  CLI::App app("aviary: submit and watch training jobs on an aviary coordinator, and the offline "
               "dataset tools.",
               "aviary");
  aviary::common::ConfigureApp(&app);
  app.require_subcommand(0, 1);
  std::string coordinator, token_file, tls_ca;
  double timeout_s = 30;
  bool version = false;
  CLI::Option* coordinator_flag =
      app.add_option("--coordinator", coordinator, "the coordinator's address")->type_name("H:P");
  CLI::Option* token_flag =
      app.add_option("--token-file", token_file, "a file whose first line is the bearer token")->type_name("F");
  CLI::Option* tls_flag =
      app.add_option("--tls-ca", tls_ca, "CA certificate (PEM) of a coordinator that serves TLS")->type_name("F");
  CLI::Option* timeout_flag =
      aviary::common::AddNumber(&app, "--timeout", &timeout_s, "S", "seconds per call (default 30)", 0.001, 86400.0);
  app.add_flag("--version", version, "the version, git commit and gRPC version");

  aviary::cli::GlobalOptions global;
  aviary::cli::Runner run;
  aviary::cli::AddClientCommands(&app, &global, &run);
  aviary::cli::AddSynthCommands(&app, &run);
  aviary::cli::AddDatasetCommand(&app, &run);
  aviary::cli::AddScoreCommand(&app, &run);
  aviary::cli::AddPrepareCommand(&app, &run);
  AddToolCommands(&app, &run);
  AddHelpCommands(&app, &run);
  app.footer(kFooter);  // after the subcommands, which would inherit it
  if (args.empty()) {
    std::cout << app.help();
    return 2;
  }
  if (std::optional<int> code = aviary::common::ParseCommandLine(&app, args)) return *code;
  if (version) return PrintVersion();
  CLI::App* command = aviary::common::SelectedSubcommand(&app);
  if (command == nullptr || !run) {
    std::cerr << "aviary: missing command (aviary --help lists them)\n";
    return 2;
  }
  for (const CLI::App* sub = command; sub != nullptr; sub = aviary::common::SelectedSubcommand(sub)) {
    *command_path = aviary::common::CommandPath(sub);
  }
  if (command->get_group() != aviary::cli::kClientGroup) {
    for (const CLI::Option* flag : {coordinator_flag, token_flag, tls_flag, timeout_flag}) {
      if (flag->count() > 0) {
        std::cerr << "aviary " << command->get_name() << ": " << flag->get_name()
                  << " is a flag of the client commands, not of '" << command->get_name() << "'\n";
        return 2;
      }
    }
  }
  if (coordinator_flag->count() > 0) global.coordinator = coordinator;
  if (token_flag->count() > 0) global.token_file = token_file;
  if (tls_flag->count() > 0) global.tls_ca = tls_ca;
  if (timeout_flag->count() > 0) global.timeout_s = timeout_s;
  return run();
}

}  // namespace

int main(int argc, char** argv) {
  // gRPC's own log lines (a failed TLS handshake, each reconnection) repeat what the call's status
  // says, ahead of the one error line the commands print, and in the middle of `watch`'s redrawn
  // block on a terminal. Kept when asked for (GRPC_VERBOSITY, GRPC_TRACE).
  if (std::getenv("GRPC_VERBOSITY") == nullptr && std::getenv("GRPC_TRACE") == nullptr) {
    gpr_set_log_function([](gpr_log_func_args*) {});
  }
  aviary::cli::SetUpStdout();  // before gRPC starts its threads
  std::string command_path = "aviary";
  const int code = Run(std::vector<std::string>(argv + 1, argv + argc), &command_path);
  return aviary::cli::FinishStdout(command_path, code);
}
